"""Versions: `recserve deploy` and `rollback` switch a running server under load, failing no request."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
from guarded import record
from load import recommend_body, run_load_apart

from recserve.deploy import deploy, live_version, rollback
from recserve.errors import ArtifactError
from recserve.server import TritonServer, free_port
from recserve.serving.frontdoor import access_log_times
from recserve.serving.repository import RepoOptions

CANDIDATES = 60
SWITCH_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def versioned(artifacts, tmp_path_factory):
    repository = tmp_path_factory.mktemp("versions") / "model_repository"
    deploy(artifacts, repository, RepoOptions(candidates=CANDIDATES))      # a new repository: version 1
    logs = tmp_path_factory.mktemp("versions_log")
    server = TritonServer(repository, free_port(), free_port(), free_port(), log_file=logs / "triton.log",
                          access_log=logs / "frontdoor.log")
    with server:
        yield server, repository


def _answer(server, user: int) -> tuple[str, list[int]]:
    r = requests.post(f"{server.url('http')}/v2/models/recommend/infer", data=recommend_body(user, 5), timeout=10)
    r.raise_for_status()
    doc = r.json()
    return doc["model_version"], next(o["data"] for o in doc["outputs"] if o["name"] == "item_ids")


def _plain_grpc(server, user: int, pin: bool = False, version: str = "") -> tuple[str, str, list[int]]:
    """A bare tritonclient call, as any gRPC client makes it: (the `version` output, the version Triton routed the
    request to, item ids)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = [grpcclient.InferInput("user_id", [1, 1], "INT64"), grpcclient.InferInput("k", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[user]], np.int64))
    inputs[1].set_data_from_numpy(np.array([[5]], np.int32))
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("item_ids", "version")]
    r = client.infer("recommend", inputs, model_version=version, outputs=wanted,
                     parameters={"recserve_pin": True} if pin else None)
    client.close()
    return r.as_numpy("version")[0, 0].decode(), r.get_response().model_version, r.as_numpy("item_ids")[0].tolist()


def _metric(server, name: str) -> float:
    """The sum of a metric's series on the server's /metrics (custom metrics reach it within a second)."""
    time.sleep(1.2)
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _wait_switched(server, version: int, since: int) -> dict:
    sup = server.supervisor
    deadline = time.monotonic() + SWITCH_WITHIN_S
    while len(sup.swaps) <= since or sup.swaps[-1]["seconds"] is None:
        assert time.monotonic() < deadline, f"the server did not switch to version {version}: {sup.swaps}"
        time.sleep(0.05)
    swap = sup.swaps[-1]
    assert swap["to"] == version and swap["ok"], swap
    return swap


def _p99_ms(rows) -> float:
    return round(float(np.percentile([dt for _, dt, _, _ in rows], 99)) * 1000, 1) if rows else float("nan")


def test_deploy_under_load_switches_to_the_new_version_with_no_failed_request_and_rollback_returns(
        versioned, artifacts):
    server, repository = versioned
    users = np.load(repository / "retrieval" / "1" / "users.npz")["user_ids"][:20].tolist()
    before = {u: _answer(server, u) for u in users[:5]}
    assert {v for v, _ in before.values()} == {"1"}
    load: dict = {}
    loader = threading.Thread(target=lambda: load.setdefault("r", run_load_apart(
        "127.0.0.1", server.http_port, 8, 16.0, [recommend_body(u) for u in users])), daemon=True)
    loader.start()
    time.sleep(3.0)
    t_deploy, wall_deploy = time.monotonic(), time.time()
    manifest = deploy(artifacts, repository, RepoOptions(candidates=CANDIDATES))
    t_written, wall_written = time.monotonic(), time.time()
    assert manifest["model_version"] == 2 and sorted(manifest["versions"]) == ["1", "2"]
    swap = _wait_switched(server, 2, 0)
    t_switched, wall_switched = time.monotonic(), time.time()
    loader.join(60)
    r = load["r"]
    time.sleep(1.2)                       # nginx flushes its access log each second
    # the front door's own clock too (the load generator is a process of its own, as a client is)
    door = {name: round(access_log_times(server.access_log, infer_only=True, since=a, until=b)[200]["p99_ms"], 1)
            for name, a, b in (("steady", 0, wall_deploy), ("swap", wall_written, wall_switched))}
    steady = [row for row in r.timeline if row[0] < t_deploy]
    during = [row for row in r.timeline if t_written <= row[0] <= t_switched]
    after = [row for row in r.timeline if row[0] > t_switched + 0.5]
    record("deploy under load", requests=r.total, failed=r.total - r.count(200), write_s=round(t_written - t_deploy, 2),
           switch_s=swap["seconds"], steady_p99_ms=_p99_ms(steady), swap_p99_ms=_p99_ms(during),
           after_p99_ms=_p99_ms(after), versions_during=sorted({v for *_, v in during}),
           server_steady_p99_ms=door["steady"], server_swap_p99_ms=door["swap"],
           loads_s={model: seconds for model, _, seconds in swap["loads"]})
    assert set(r.statuses) == {200} and not r.errors, r.summary()
    assert {v for *_, v in steady} == {"1"}
    assert after and {v for *_, v in after} == {"2"}, "every answer after the switch comes from the new version"
    assert requests.get(f"{server.url('http')}/v2/health/ready", timeout=5).status_code == 200
    # the same artifacts: version 2 answers exactly as version 1 did
    assert {u: _answer(server, u) for u in before} == {u: ("2", items) for u, (_, items) in before.items()}

    restored = rollback(repository)
    assert restored["model_version"] == 1 and live_version(repository) == 1
    _wait_switched(server, 1, 1)
    assert {u: _answer(server, u) for u in before} == before
    with pytest.raises(ArtifactError, match="oldest"):
        rollback(repository)


def test_an_ab_split_sends_each_user_to_the_arm_its_salted_hash_names_and_the_report_compares_them(
        versioned, tmp_path):
    from recserve import ab
    from recserve.client import RecClient

    server, repository = versioned
    sup = server.supervisor
    assert live_version(repository) == 1
    swaps = len(sup.swaps)
    split = ab.start(repository, b=2, share=0.5, salt="test")
    assert (split["a"], split["b"]) == (1, 2)
    _wait_switched(server, 1, swaps)              # the live version stays; recommend loads version 2 beside it
    users = np.load(repository / "retrieval" / "1" / "users.npz")["user_ids"][:40].tolist()
    arms = {}
    for u in users:
        r = requests.post(f"{server.url('http')}/v2/models/recommend/infer", data=recommend_body(u), timeout=10)
        assert r.status_code == 200, r.text
        arms[u] = (r.headers.get("recserve-arm"), r.json()["model_version"])
    want = {u: (ab.arm(u, 0.5, "test"), "2" if ab.arm(u, 0.5, "test") == "b" else "1") for u in users}
    assert arms == want, {u: (arms[u], want[u]) for u in users if arms[u] != want[u]}
    assert 5 < sum(a == "b" for a, _ in arms.values()) < 35
    # an explicit version is served as asked, outside the split
    r = requests.post(f"{server.url('http')}/v2/models/recommend/versions/1/infer", data=recommend_body(users[0]),
                      timeout=10)
    assert r.json()["model_version"] == "1" and not r.headers.get("recserve-arm")

    log = tmp_path / "events.jsonl"
    with RecClient(server.url("http"), protocol="http", event_log=log) as client:
        for u in users:
            rec = client.recommend(u, k=5)
            assert rec.version == want[u][1] and rec.request_id
            if ab.arm(u, 0.5, "test") == "b" or u % 3 == 0:
                client.click(rec, rec.item_ids[0])
    with RecClient(server.url("grpc")) as client:      # gRPC: the client splits, from recommend's config
        assert {u: client.recommend(u, k=5).version for u in users} == {u: v for u, (_, v) in want.items()}
    # any other gRPC client, naming no version: Triton hands it to the newest (2), which forwards arm a's users
    third_party = {u: _plain_grpc(server, u) for u in users}
    assert {u: v for u, (v, _, _) in third_party.items()} == {u: v for u, (_, v) in want.items()}
    assert {reached for _, reached, _ in third_party.values()} == {"2"}
    assert all(items == _answer(server, u)[1] for u, (_, _, items) in third_party.items())
    assert {_plain_grpc(server, u, pin=True)[0] for u in users} == {"2"}     # pinned: served where it landed
    assert _plain_grpc(server, users[0], version="1")[0] == "1"            # the older arm never forwards
    assert _metric(server, "recserve_ab_forwarded_total") >= 1    # counted (an instance hands on its counts in batches)
    from recserve.events import read_events

    events = list(read_events(log))
    impressions = [e for e in events if e["type"] == "impression"]
    assert [(e["user"], e["arm"]) for e in impressions] == [(u, ab.arm(u, 0.5, "test")) for u in users]
    assert {e["position"] for e in events if e["type"] == "click"} == {0}      # each click was the first item
    report = ab.report(log)
    shown = {v: sum(1 for _, ver in want.values() if ver == v) for v in ("1", "2")}
    assert {v: a["impressions"] for v, a in report["versions"].items()} == shown
    assert report["versions"]["2"]["ctr"] == 1.0 and report["comparison"]["b"] == "2"
    assert report["comparison"]["ctr_lift"] > 0
    record("ab split", users=len(users), arm_b=shown["2"], ctr=dict((v, round(a["ctr"], 3))
                                                                    for v, a in report["versions"].items()))

    swaps = len(sup.swaps)
    ab.stop(repository)
    _wait_switched(server, 1, swaps)
    r = requests.post(f"{server.url('http')}/v2/models/recommend/infer", data=recommend_body(users[0]), timeout=10)
    assert not r.headers.get("recserve-arm"), "the front door still splits after ab stop"
    assert {_answer(server, u)[0] for u in users[:10]} == {"1"}


def test_items_add_makes_new_items_servable_on_the_running_server_without_retraining(versioned, artifacts,
                                                                                      tmp_path):
    from recserve.client import RecClient
    from recserve.items import items_add

    server, repository = versioned
    swaps = len(server.supervisor.swaps)
    before = live_version(repository)
    (tmp_path / "new.csv").write_text("item_id,title,genres,year\n0,Brand New,cat00|cat03,2020\n"
                                      "1000,Also New,cat01,2021\n")
    r = items_add(repository, tmp_path / "new.csv", artifacts=artifacts, out=tmp_path / "grown",
                  opts=RepoOptions(candidates=CANDIDATES))
    assert r["added"] == 2 and r["model_version"] > before
    _wait_switched(server, r["model_version"], swaps)
    client = RecClient(server.url("http"), protocol="http")
    assert client.titles([0, 1000, 5])[:2] == ["Brand New", "Also New"]
    users = np.load(repository / "retrieval" / str(r["model_version"]) / "users.npz")["user_ids"][:40].tolist()
    served = {u: [i.item_id for i in client.recommend(u, k=client.k_max()).items] for u in users}
    assert any({0, 1000} & set(items) for items in served.values()), "no user was served a new item"
    assert all(rec.version == str(r["model_version"]) for rec in [client.recommend(users[0], k=3)])
    # an unknown user who just clicked a new item is personalised from it; a new item can be excluded
    rec = client.recommend(10 ** 9, k=5, history=[0])
    assert rec.source == "history" and len(rec.items) == 5
    holder = next(u for u, items in served.items() if {0, 1000} & set(items))
    kept = [i.item_id for i in client.recommend(holder, k=client.k_max(), exclude=[0, 1000]).items]
    assert not {0, 1000} & set(kept)


def test_deploy_keeps_the_newest_versions_and_a_tampered_version_is_not_loaded(versioned, artifacts):
    server, repository = versioned
    sup = server.supervisor
    live = live_version(repository)
    swaps = len(sup.swaps)
    m = deploy(artifacts, repository, RepoOptions(candidates=CANDIDATES), keep=2)
    assert sorted(int(v) for v in m["versions"]) == [live, m["model_version"]]
    removed = [v for v in range(1, m["model_version"]) if str(v) not in m["versions"]]
    assert removed and not any((repository / model / str(v)).exists() for v in removed for model in m["models"])
    _wait_switched(server, m["model_version"], swaps)
    # a file of an older version changed on disk: rollback refuses to touch the repository, and the server,
    # asked to switch to it anyway, verifies first and keeps serving the version it serves
    onnx = repository / "ranker" / str(live) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=rf"ranker/{live}/model.onnx was changed after export"):
        rollback(repository)
    assert live_version(repository) == m["model_version"]
    serving = sup.version
    assert not sup.swap(live)
    assert "changed after export" in sup.swaps[-1]["error"], sup.swaps[-1]
    assert sup.version == serving
    user = int(np.load(repository / "retrieval" / str(serving) / "users.npz")["user_ids"][0])
    assert _answer(server, user)[0] == str(serving), "the version that served still serves"
