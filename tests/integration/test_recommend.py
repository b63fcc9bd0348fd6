"""The served repository against the in-process reference: same users, same answers."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from recserve.client import RecClient
from recserve.errors import ClientError
from recserve.reference import Reference

PROTOCOLS = ("grpc", "http")
SCORE_RTOL = 1e-4   # ONNX Runtime vs PyTorch through the whole pipeline


@pytest.fixture(scope="module")
def reference(served):
    return Reference(served.artifacts, target=None, candidates=served.manifest["candidates"])


def user_ids(served, n=6):
    return np.load(served.repository / "retrieval" / "1" / "users.npz")["user_ids"][:n].tolist()


def test_every_model_in_the_manifest_is_ready(served):
    client = grpcclient.InferenceServerClient(served.url("grpc"))
    assert client.is_server_ready()
    for name in served.manifest["models"]:
        assert client.is_model_ready(name), f"{name} is not READY"
    assert set(served.manifest["models"]) == {"recommend", "retrieval", "ranker", "item_tower", "catalogue"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ensemble_and_client_pipeline_return_the_same_items_in_the_same_order(served, protocol):
    with RecClient(served.url(protocol), protocol) as client:
        for user in user_ids(served):
            ens = client.recommend(user, k=10, hour=20, weekday=4, mode="ensemble")
            pipe = client.recommend(user, k=10, hour=20, weekday=4, mode="pipeline")
            assert len(ens.items) == 10
            assert [i.item_id for i in ens.items] == [i.item_id for i in pipe.items]
            np.testing.assert_allclose([i.score for i in ens.items], [i.score for i in pipe.items], rtol=1e-6)


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores):
    """Same items in the same order; a swap is only tolerated between scores equal within SCORE_RTOL."""
    np.testing.assert_allclose(got_scores, want_scores, rtol=SCORE_RTOL, atol=1e-4)
    for pos, (g, w) in enumerate(zip(got_ids, want_ids)):
        if g != w:
            j = list(want_ids).index(g) if g in want_ids else None
            assert j is not None and abs(want_scores[j] - want_scores[pos]) <= 1e-4 * max(1, abs(want_scores[pos])), \
                f"position {pos}: served {g}, reference {w}"


def test_served_recommendations_equal_the_pytorch_exact_search_reference(served, reference):
    users = user_ids(served)
    idx = np.searchsorted(reference.ds.user_ids, users)
    want = reference.recommend(idx, hour=np.full(len(idx), 9), weekday=np.full(len(idx), 1), k=10)
    with RecClient(served.url("grpc"), "grpc") as client:
        for user, (items, scores) in zip(users, want):
            got = client.recommend(user, k=10, hour=9, weekday=1, titles=True)
            assert_same_ranking([i.item_id for i in got.items], [i.score for i in got.items],
                                reference.ds.item_ids[items].tolist(), scores.tolist())
            assert [i.title for i in got.items] == reference.ds.titles[items].tolist()


def test_recommendations_exclude_items_the_user_already_has(served, reference):
    user = user_ids(served, 1)[0]
    u = int(np.searchsorted(reference.ds.user_ids, user))
    seen = set(reference.ds.item_ids[reference.tables.seen_of(u)].tolist())
    with RecClient(served.url("http"), "http") as client:
        got = {i.item_id for i in client.recommend(user, k=30).items}
    assert got and not (got & seen)


def test_dynamic_batching_forms_batches_under_concurrent_requests(served):
    client = grpcclient.InferenceServerClient(served.server.admin_grpc_url)   # statistics: Triton's own port

    def before(model):
        admin = served.server.admin_grpc_headers     # statistics are an admin API (tests/reliability)
        s = client.get_inference_statistics(model, as_json=True, headers=admin)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    models = ("recommend",)      # the embedded flavor's one-process path
    canaries = served.server.supervisor.canaries_answered    # the supervisor's own requests count too
    canaries_before = {m: canaries.get(m, 0) for m in models}
    start = {m: before(m) for m in models}
    users = user_ids(served, 20)

    def call(job):
        u, hour = job
        with RecClient(served.url("grpc"), "grpc") as c:
            return len(c.recommend(u, k=5, hour=hour).items)

    # every request distinct (hour), so Triton's response cache answers none of them
    with cf.ThreadPoolExecutor(16) as pool:
        assert all(n == 5 for n in pool.map(call, [(u, h) for h in range(8) for u in users]))
    for m in models:
        inferences, executions = (a - b for a, b in zip(before(m), start[m]))
        extra = canaries.get(m, 0) - canaries_before[m]
        # one canary may straddle a snapshot: counted by Triton in the window, answered after it
        assert len(users) * 8 <= inferences <= len(users) * 8 + extra + 1, (m, inferences, extra)
        assert executions < inferences, f"{m}: {executions} executions for {inferences} inferences: no batching"


def test_http_json_request_as_in_the_readme_curl_example(served):
    user = user_ids(served, 1)[0]
    body = {"inputs": [
        {"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user]},
        {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [5]},
        {"name": "hour", "shape": [1, 1], "datatype": "INT64", "data": [12]},
        {"name": "weekday", "shape": [1, 1], "datatype": "INT64", "data": [0]},
    ]}
    r = requests.post(f"http://{served.url('http')}/v2/models/recommend/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["item_ids"]["shape"] == [1, 5] and len(outputs["scores"]["data"]) == 5
    assert min(outputs["item_ids"]["data"]) >= 0


def test_context_is_optional_and_defaults_to_the_current_utc_time(served):
    from recserve.serving.steps.retrieval import now_context

    user = user_ids(served, 1)[0]
    url = f"http://{served.url('http')}/v2/models/recommend/infer"

    def post(extra):
        inputs = [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user]},
                  {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [5]}] + extra
        r = requests.post(url, json={"inputs": inputs}, timeout=30)
        assert r.status_code == 200, r.text
        return {o["name"]: o["data"] for o in r.json()["outputs"]}

    before = now_context()
    implicit = post([])
    hour, weekday = now_context()
    explicit = post([{"name": "hour", "shape": [1, 1], "datatype": "INT64", "data": [hour]},
                     {"name": "weekday", "shape": [1, 1], "datatype": "INT64", "data": [weekday]}])
    if before == (hour, weekday):          # the hour did not turn between the two requests
        assert implicit["item_ids"] == explicit["item_ids"]
        np.testing.assert_allclose(implicit["scores"], explicit["scores"], rtol=1e-6)
    bad = requests.post(url, json={"inputs": [
        {"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user]},
        {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [5]},
        {"name": "hour", "shape": [1, 1], "datatype": "INT64", "data": [24]}]}, timeout=30)
    assert bad.status_code == 400 and "hour=24 is out of range" in bad.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_user_in_pipeline_mode_gets_the_cold_start_and_bad_k_a_clear_typed_error(served, protocol):
    with RecClient(served.url(protocol), protocol) as client:
        cold = client.recommend(987654321, k=5, hour=3, weekday=2, mode="pipeline")
        assert cold.source == "popular" and len(cold.items) == 5 and cold.mode == "pipeline"
        assert cold.item_ids == client.recommend(987654321, k=5, hour=3, weekday=2).item_ids
        for bad_k in (0, served.manifest["k_max"] + 1):
            with pytest.raises(ClientError, match=f"k={bad_k}"):
                client.recommend(user_ids(served, 1)[0], k=bad_k)
        assert len(client.recommend(user_ids(served, 1)[0], k=3).items) == 3   # server still healthy


def test_server_refuses_an_index_built_from_another_item_tower(served, tmp_path):
    import json
    import shutil

    from recserve.errors import ServerError
    from recserve.server import TritonServer, free_port

    repo = tmp_path / "repo"
    shutil.copytree(served.repository, repo)
    meta_path = repo / "retrieval" / "1" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["item_tower_sha256"] = "0" * 64          # as if the index came from another export
    meta_path.write_text(json.dumps(meta))
    # verify=False: the manifest check would refuse this repository first (tests/reliability); this is the
    # retrieval step's own check, for repositories served without verification
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=tmp_path / "log.txt", verify=False)
    # both `retrieval` and `recommend` run the check; whichever loads first names itself
    with pytest.raises(ServerError, match=r"'(retrieval|recommend)' failed to load: .*FAISS index was built from "
                                          r"item tower 0{12} but the repository serves item tower"):
        with server:
            pass
    assert not server.is_alive
    assert "item tower" in (tmp_path / "log.txt").read_text()


def test_manifest_holds_the_sha256_of_every_file_and_the_index_recall(served):
    from recserve.serving.steps.retrieval import sha256_of

    # __pycache__ is the python backend's runtime cache, not an artifact
    files = {str(p.relative_to(served.repository)) for p in served.repository.rglob("*")
             if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts}
    assert set(served.manifest["sha256"]) == files
    for rel, digest in served.manifest["sha256"].items():
        assert sha256_of(served.repository / rel) == digest, rel
    assert served.manifest["index"]["recall_vs_exact"] == 1.0     # flat index below 100k items


def test_native_flavor_repository_is_written_and_every_config_parses(artifacts, tmp_path):
    from recserve.serving.repository import RepoOptions, parse, write_repository

    manifest = write_repository(artifacts, tmp_path / "native", RepoOptions(flavor="native", candidates=40))
    platforms = {}
    for name in manifest["models"]:
        cfg = parse((tmp_path / "native" / name / "config.pbtxt").read_text())
        assert cfg.name == name
        platforms[name] = cfg.platform or cfg.backend
    assert platforms["ranker"] == platforms["item_tower"] == "onnxruntime_onnx"
    assert platforms["recommend"] == "python" and platforms["retrieval"] == "python"   # BLS to the ranker
    assert not (tmp_path / "native" / "ranker" / "1" / "model.py").exists()
    ensemble = write_repository(artifacts, tmp_path / "ensemble", RepoOptions(flavor="native", candidates=40,
                                                                             native_recommend="ensemble"))
    cfg = parse((tmp_path / "ensemble" / "recommend" / "config.pbtxt").read_text())
    assert cfg.platform == "ensemble" and [s.model_name for s in cfg.ensemble_scheduling.step] == ensemble["path"]


def test_the_readme_tritonclient_example_runs_against_the_server(served, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "InferenceServerClient" in b)
    exec(block.replace("127.0.0.1:8001", served.url("grpc")), {})   # the README's user 1 exists in the data
    printed = capsys.readouterr().out
    assert printed.count("[[") == 2     # item ids and scores came back


def test_the_served_path_scores_what_evaluate_reports_on_the_test_split(artifacts, tmp_path):
    """Served = evaluated: the exported graphs and FAISS index, fed the test-time view of the data, give
    evaluate's served row's ndcg@10 and recall@50 (metrics.json) within 1e-3."""
    import json

    from recserve.data.dataset import TEST, Dataset
    from recserve.evaluate import Evaluator, ranking_metrics
    from recserve.serving.local import LocalPipeline
    from recserve.serving.repository import RepoOptions, write_repository

    write_repository(artifacts, tmp_path / "repo", RepoOptions(view="test"))
    pipeline = LocalPipeline(tmp_path / "repo")
    ds = Dataset.load(artifacts / "dataset.npz")
    ev = Evaluator(ds, TEST)
    raw = pipeline.recommend(ds.user_ids[ev.users], 50, ev.hour, ev.weekday)
    served = ranking_metrics(np.where(raw >= 0, np.searchsorted(ds.item_ids, raw), -1), ev.truth, ds.n_items)
    metrics = json.loads((artifacts / "metrics.json").read_text())
    offline = metrics["models"][metrics["served"]]        # blend+ranker, or blend when the ranker did not ship
    for metric in ("ndcg@10", "recall@50"):
        assert served[metric] == pytest.approx(offline[metric], abs=1e-3), metric
    assert (raw >= 0).sum(axis=1).min() == min(50, ds.n_items - np.diff(ev.seen.indptr).max())
