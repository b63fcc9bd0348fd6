"""Versions of a served repository: `recserve deploy` adds one, `recserve rollback` goes back to an earlier one.

A repository holds numbered versions of every model (`MODEL/V/`, as `export repository` writes them). Each
model's `config.pbtxt` loads exactly one of them (`version_policy specific`); `manifest.json`'s `model_version`
names that live version, and its `versions` keeps every version's own manifest.

deploy    builds a complete repository for the new version in a temporary directory beside the served one,
          moves its version directories in next to the old ones, replaces each config (atomic renames), and
          replaces the manifest last (an atomic rename too). Older versions beyond `keep` are removed; the live
          one before the new one always stays, for a rollback.
rollback  puts the configs of an earlier version back (each version directory keeps a copy of its config),
          then the manifest.

A running `recserve serve` notices the manifest's new live version (its supervisor looks every 0.5 s),
verifies every file, and loads each model's new version through Triton's EXPLICIT model control: Triton
starts the new version's instances while the old version keeps serving, then unloads the old one, so no
request fails (`tests/reliability/test_versions.py` counts them under load). Each response names its version
(`model_version` in Triton's answer).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from recserve.errors import ArtifactError

KEEP = 3                           # versions a repository keeps after a deploy
TOP_LEVEL = ("fallback.json", "README.md")   # files of the live version at the repository's top
# Swap order: the step models first, the request's entry point (`recommend`, which may be an ensemble of them) last.
SWAP_ORDER = ("catalogue", "item_tower", "ranker", "retrieval", "recommend")


LOCK_TIMEOUT_S = 60.0               # how long a command waits for another one changing the same directory


@contextlib.contextmanager
def exclusive(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of a directory that commands change (a repository, artifacts): `.NAME.lock` beside it, not in
    it (the repository's files are all hashed). The kernel releases it when the holder exits, even killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout is None else timeout)
    with open(lock, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise ArtifactError(f"{path} is being changed by another command ({holder} holds {lock}); "
                                        "run one deploy, rollback, ab, update or items add at a time") from None
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def locked(arg: str):
    """Run the function holding `exclusive(<its argument named arg>)`: one change of a directory at a time."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with exclusive(Path(sig.bind(*args, **kwargs).arguments[arg])):
                return fn(*args, **kwargs)
        return inner
    return wrap


def read_manifest(repository: Path) -> dict:
    path = Path(repository) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: write the repository with `recserve export repository` first")
    manifest = json.loads(path.read_text())
    if int(manifest.get("format", 0)) < 3 or "versions" not in manifest:
        raise ArtifactError(f"{repository} was written by an older recserve (no versions in its manifest); "
                            "write it again with `recserve export repository`")
    return manifest


def live_version(repository: Path) -> int:
    """The version every model's config loads (the manifest's `model_version`)."""
    path = Path(repository) / "manifest.json"
    return int(json.loads(path.read_text()).get("model_version", 1)) if path.is_file() else 1


def live_dir(repository: Path, model: str) -> Path:
    """`REPOSITORY/MODEL/V` of the live version."""
    return Path(repository) / model / str(live_version(repository))


def version_entry(manifest: dict) -> dict:
    """What a version's own manifest keeps in `versions` (everything but the repository-wide hashes)."""
    return {k: v for k, v in manifest.items() if k not in ("sha256", "code_sha256", "versions")}


def _write_manifest(repository: Path, manifest: dict, hashes: dict[str, str]) -> None:
    """Replace the manifest atomically. `hashes` are carried over from the verified old manifest and the new
    version's own build, never read back off the disk, so a file changed behind our back is never blessed."""
    from recserve.integrity import code_hashes

    manifest = {**manifest, "sha256": dict(sorted(hashes.items())), "code_sha256": code_hashes()}
    _write_text(Path(repository) / "manifest.json", json.dumps(manifest, indent=2))


def _write_text(dst: Path, text: str) -> None:
    """Write `dst` atomically (a reader sees the old file or the new one, never half of one)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)


def _replace_file(src: Path, dst: Path) -> None:
    """Copy `src` over `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@locked("repository")
def deploy(artifacts: Path, repository: Path, opts=None, keep: int = KEEP) -> dict:
    """Add the artifacts as the repository's next version and make it live; a new repository gets version 1.

    Returns the new manifest."""
    from recserve.serving.repository import write_repository

    artifacts, repository = Path(artifacts), Path(repository)
    if keep < 2:
        raise ArtifactError(f"keep={keep}: keep at least 2 versions (the live one and the one to roll back to)")
    if not (repository / "manifest.json").exists():
        return write_repository(artifacts, repository, opts, version=1)
    old = _verified(repository)
    version = max(int(v) for v in old["versions"]) + 1
    build = Path(tempfile.mkdtemp(prefix=f".{repository.name}.deploy-", dir=repository.parent))
    try:
        new = write_repository(artifacts, build / "repository", opts, version=version)
        if set(new["models"]) != set(old["models"]):
            raise ArtifactError(f"the new version serves {sorted(new['models'])}, the repository "
                                f"{sorted(old['models'])}: a deploy keeps the same models; export a new repository")
        staged = build / "repository"
        for model in new["models"]:
            (staged / model / str(version)).rename(repository / model / str(version))
        for model in new["models"]:
            _replace_file(staged / model / "config.pbtxt", repository / model / "config.pbtxt")
        for name in TOP_LEVEL:
            if (staged / name).exists():
                _replace_file(staged / name, repository / name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    versions = {**old["versions"], str(version): version_entry(new)}
    removable = sorted(int(v) for v in versions if int(v) not in (version, int(old["model_version"])))
    hashes = {**old["sha256"], **new["sha256"]}    # the new version's files, configs and top-level files
    for stale in removable[:max(0, len(versions) - keep)]:     # the oldest first; never the two that matter
        for model in new["models"]:
            shutil.rmtree(repository / model / str(stale), ignore_errors=True)
        del versions[str(stale)]
        hashes = {f: h for f, h in hashes.items() if Path(f).parts[1:2] != (str(stale),)}
    manifest = {**version_entry(new), "versions": versions, "previous_version": int(old["model_version"])}
    _write_manifest(repository, manifest, hashes)
    return manifest


def _verified(repository: Path) -> dict:
    """The manifest, once every file on disk matches it (a tampered repository is not changed further)."""
    from recserve.errors import ServerError
    from recserve.integrity import verify_repository

    manifest = read_manifest(repository)
    try:
        verify_repository(repository)
    except ServerError as exc:
        raise ArtifactError(f"{repository} does not match its manifest, so it is left as it is: {exc}") from None
    return manifest


@locked("repository")
def rollback(repository: Path, to: int | None = None) -> dict:
    """Make an earlier version live again: `to`, or the newest version older than the live one."""
    repository = Path(repository)
    manifest = _verified(repository)
    live = int(manifest["model_version"])
    kept = sorted(int(v) for v in manifest["versions"])
    if to is None:
        older = [v for v in kept if v < live]
        if not older:
            raise ArtifactError(f"version {live} is the oldest this repository keeps ({kept}): nothing to roll "
                                "back to")
        to = older[-1]
    if to not in kept:
        raise ArtifactError(f"version {to} is not in {repository}: it keeps {kept}")
    if to == live:
        raise ArtifactError(f"version {to} is already live")
    entry = manifest["versions"][str(to)]
    for model in entry["models"]:
        copy = repository / model / str(to) / "config.pbtxt"
        if not copy.is_file():
            raise ArtifactError(f"{copy} is missing: version {to} cannot be restored")
    hashes = dict(manifest["sha256"])
    for model in entry["models"]:
        _replace_file(repository / model / str(to) / "config.pbtxt", repository / model / "config.pbtxt")
        hashes[f"{model}/config.pbtxt"] = hashes[f"{model}/{to}/config.pbtxt"]
    if f"catalogue/{to}/fallback.json" in hashes:
        _replace_file(repository / "catalogue" / str(to) / "fallback.json", repository / "fallback.json")
        hashes["fallback.json"] = hashes[f"catalogue/{to}/fallback.json"]
    restored = {**entry, "versions": manifest["versions"], "previous_version": live}
    _write_manifest(repository, restored, hashes)
    return restored
