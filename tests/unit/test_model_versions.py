"""`recserve deploy` / `rollback` on disk: numbered versions, configs that load one, hashes that still verify."""

from __future__ import annotations

import json

import pytest

from recserve.deploy import deploy, live_dir, live_version, rollback
from recserve.errors import ArtifactError
from recserve.export.index import IndexSpec
from recserve.integrity import verify_repository
from recserve.serving.repository import RepoOptions, parse

OPTS = RepoOptions(candidates=60, index=IndexSpec("flat"))


def _configs(repository) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted(repository.glob("*/config.pbtxt"))}


def _loaded_versions(repository) -> dict[str, tuple[int, ...]]:
    return {m: tuple(parse(text).version_policy.specific.versions) for m, text in _configs(repository).items()}


@pytest.fixture(scope="module")
def repository(tiny_artifacts, tmp_path_factory):
    repo = tmp_path_factory.mktemp("versions") / "model_repository"
    deploy(tiny_artifacts, repo, OPTS)
    return repo


def test_a_new_repository_is_version_1_and_every_config_loads_exactly_that_version(repository):
    manifest = verify_repository(repository)
    assert manifest["model_version"] == 1 and list(manifest["versions"]) == ["1"]
    assert set(_loaded_versions(repository).values()) == {(1,)}
    for model, text in _configs(repository).items():
        assert (repository / model / "1" / "config.pbtxt").read_text() == text, "each version keeps its config"
    assert live_dir(repository, "retrieval") == repository / "retrieval" / "1"


def test_deploy_adds_the_next_version_keeps_the_newest_and_the_repository_still_verifies(repository, tiny_artifacts):
    m2 = deploy(tiny_artifacts, repository, OPTS, keep=2)
    assert (m2["model_version"], m2["previous_version"]) == (2, 1)
    m3 = deploy(tiny_artifacts, repository, OPTS, keep=2)
    assert m3["model_version"] == 3 and sorted(m3["versions"]) == ["2", "3"]
    assert not list(repository.glob("*/1")), "version 1 was pruned (keep=2)"
    assert set(_loaded_versions(repository).values()) == {(3,)}
    manifest = verify_repository(repository)
    assert not [f for f in manifest["sha256"] if f.split("/")[1:2] == ["1"]], "no hash of a removed file remains"
    assert json.loads((repository / "fallback.json").read_text()) == json.loads(
        (repository / "catalogue" / "3" / "fallback.json").read_text())


def test_rollback_restores_the_earlier_configs_byte_for_byte_and_stops_at_the_oldest(repository):
    live = live_version(repository)
    before = sorted(int(v) for v in json.loads((repository / "manifest.json").read_text())["versions"])
    older = max(v for v in before if v < live)
    restored = rollback(repository)
    assert restored["model_version"] == older and restored["previous_version"] == live
    for model, text in _configs(repository).items():
        assert text == (repository / model / str(older) / "config.pbtxt").read_text()
    verify_repository(repository)
    with pytest.raises(ArtifactError, match="oldest"):
        rollback(repository)
    with pytest.raises(ArtifactError, match=r"version 99 is not in .* it keeps"):
        rollback(repository, to=99)
    rollback(repository, to=live)          # forward again, to a kept version
    assert live_version(repository) == live


def test_a_repository_that_does_not_match_its_manifest_is_left_as_it_is(repository, tiny_artifacts):
    manifest_before = (repository / "manifest.json").read_text()
    victim = live_dir(repository, "ranker") / "model.onnx"
    original = victim.read_bytes()
    victim.write_bytes(original + b"\0")
    try:
        with pytest.raises(ArtifactError, match=r"ranker/\d+/model.onnx was changed after export"):
            deploy(tiny_artifacts, repository, OPTS)
        with pytest.raises(ArtifactError, match="changed after export"):
            rollback(repository)
        assert (repository / "manifest.json").read_text() == manifest_before
    finally:
        victim.write_bytes(original)
    verify_repository(repository)


def test_deploy_refuses_a_repository_written_before_versions(tmp_path, repository):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((repository / "manifest.json").read_text())
    manifest.pop("versions")
    manifest["format"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="older recserve"):
        rollback(old)
    with pytest.raises(ArtifactError, match="keep at least 2"):
        deploy(tmp_path, repository, OPTS, keep=1)


def test_an_ab_split_lists_both_versions_in_recommends_config_and_stop_restores_it(repository):
    from recserve import ab

    live = live_version(repository)
    other = max(int(v) for v in json.loads((repository / "manifest.json").read_text())["versions"] if int(v) != live)
    before = (repository / "recommend" / "config.pbtxt").read_text()
    with pytest.raises(ArtifactError, match="between 0 and 1"):
        ab.start(repository, b=other, share=1.5)
    with pytest.raises(ArtifactError, match=f"{live} is live"):
        ab.start(repository, b=live, share=0.1)
    split = ab.start(repository, b=other, share=0.25, salt="x")
    assert split == {"model": "recommend", "a": live, "b": other, "share": 0.25, "salt": "x"}
    assert _loaded_versions(repository)["recommend"] == tuple(sorted({live, other}))
    assert {m: v for m, v in _loaded_versions(repository).items() if m != "recommend"} == {
        m: (live,) for m in _configs(repository) if m != "recommend"}, "the other models stay on the live version"
    assert verify_repository(repository)["ab"] == split
    ab.stop(repository)
    assert (repository / "recommend" / "config.pbtxt").read_text() == before
    assert "ab" not in verify_repository(repository)
    with pytest.raises(ArtifactError, match="no A/B split"):
        ab.stop(repository)


def test_verifying_survives_another_server_removing_byte_code_caches_meanwhile(repository):
    import shutil
    import threading

    stop = threading.Event()

    def churn() -> None:      # what a second `recserve serve` verifying the same repository does
        cache = live_dir(repository, "retrieval") / "__pycache__"
        while not stop.is_set():
            try:
                cache.mkdir(exist_ok=True)
                (cache / "model.cpython-311.pyc").write_bytes(b"x")
            except OSError:   # verify_repository removed it first
                pass
            shutil.rmtree(cache, ignore_errors=True)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        for _ in range(30):
            verify_repository(repository)
    finally:
        stop.set()
        t.join(5)


def test_one_change_of_a_repository_at_a_time_and_the_waiting_one_is_told_why(tmp_path, monkeypatch):
    """deploy, rollback, ab and update take a lock beside the directory; a second one waits, then says who holds it."""
    import os
    import threading

    import recserve.deploy as deploy_module
    from recserve.deploy import exclusive
    from recserve.update import update

    monkeypatch.setattr(deploy_module, "LOCK_TIMEOUT_S", 0.3)
    repo = tmp_path / "model_repository"
    with exclusive(repo):
        assert (tmp_path / ".model_repository.lock").read_text() == f"pid {os.getpid()}"
        for call in (lambda: rollback(repo), lambda: deploy(tmp_path / "artifacts", repo)):
            with pytest.raises(ArtifactError, match=r"is being changed by another command \(pid \d+ holds"):
                call()
    assert not (tmp_path / "model_repository").exists(), "nothing was written while the lock was held"
    with exclusive(tmp_path / "artifacts"), pytest.raises(ArtifactError, match="being changed"):
        update(tmp_path / "artifacts", tmp_path / "events.jsonl")
    # released: the next one goes ahead (and fails on its own merits, here a missing repository)
    with pytest.raises(ArtifactError) as err:
        rollback(repo)
    assert "being changed" not in str(err.value)
    # a holder that lets go within the timeout is waited for
    lock = exclusive(repo)
    lock.__enter__()
    threading.Timer(0.1, lambda: lock.__exit__(None, None, None)).start()
    monkeypatch.setattr(deploy_module, "LOCK_TIMEOUT_S", 5.0)
    with pytest.raises(ArtifactError) as err:
        rollback(repo)
    assert "being changed" not in str(err.value)
