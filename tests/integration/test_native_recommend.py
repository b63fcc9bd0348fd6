"""The native flavor's `recommend`: the embedded model's code with the ranker asked as a model of its own (BLS).

On the pip server the `ranker` model is the python step over the same graph (no onnxruntime backend here); in the
NGC container it is Triton's onnxruntime or TensorRT backend. The answers must be the embedded ones, options and
cold start included, and a ranker that is gone must give the retrieval order, not an error.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from recserve.client import RecClient
from recserve.server import TritonServer, free_port
from recserve.serving.repository import RepoOptions, parse, render_proto, write_repository

CANDIDATES = 60


@pytest.fixture(scope="module")
def bls(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("bls")
    repository = root / "model_repository"
    write_repository(artifacts, repository, RepoOptions(candidates=CANDIDATES))
    # the native flavor's recommend config (fused_config with `ranker_model`), over this server's python ranker
    native = root / "native"
    write_repository(artifacts, native, RepoOptions(flavor="native", candidates=CANDIDATES))
    cfg = parse((native / "recommend" / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.parameters["ranker_model"].string_value == "ranker"
    for path in (repository / "recommend" / "config.pbtxt", repository / "recommend" / "1" / "config.pbtxt"):
        here = parse(path.read_text())
        here.parameters["ranker_model"].string_value = "ranker"
        path.write_text(render_proto(here))
    logs = tmp_path_factory.mktemp("bls_log")
    # no supervisor: it would load the ranker again that the fallback test unloads
    server = TritonServer(repository, free_port(), free_port(), free_port(), log_file=logs / "triton.log",
                          verify=False, supervise=False)
    with server:
        yield server, repository


def test_the_native_recommend_answers_as_the_embedded_one(bls, served):
    server, repository = bls
    users = np.load(repository / "retrieval" / "1" / "users.npz")["user_ids"][:6].tolist()
    with RecClient(server.url("grpc")) as native, RecClient(served.url("grpc")) as embedded:
        for user in users:
            for options in ({}, {"exclude": [users[0]], "max_per_genre": 2}, {"explore": "epsilon:0.2", "seed": 5}):
                a = native.recommend(user, k=8, hour=5, weekday=3, **options)
                b = embedded.recommend(user, k=8, hour=5, weekday=3, **options)
                assert a.item_ids == b.item_ids and a.source == b.source == "personalized"
                np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], rtol=1e-5)
        cold = native.recommend(987654321, k=5, hour=5, weekday=3)
        assert cold.source == "popular" and cold.item_ids == embedded.recommend(987654321, k=5, hour=5,
                                                                                 weekday=3).item_ids


def test_a_native_ranker_that_is_gone_gives_the_retrieval_order_counted_as_a_fallback(bls):
    server, repository = bls
    user = int(np.load(repository / "retrieval" / "1" / "users.npz")["user_ids"][0])
    r = requests.post(f"{server.admin_url}/v2/repository/models/ranker/unload", headers=server.admin_headers,
                      timeout=30)
    assert r.status_code == 200, r.text
    try:
        with RecClient(server.url("http"), protocol="http") as client:
            rec = client.recommend(user, k=5, hour=5, weekday=3)
        assert rec.source == "fallback" and len(rec.items) == 5
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:      # counts reach /metrics with the next request after 0.5 s
            time.sleep(0.6)
            with RecClient(server.url("http"), protocol="http") as client:
                client.recommend(user, k=5, hour=5, weekday=3)
            lines = [line for line in requests.get(server.url("metrics"), timeout=10).text.splitlines()
                     if line.startswith("recserve_fallbacks_total") and 'kind="ranker"' in line]
            if lines and float(lines[0].rsplit(" ", 1)[1]) >= 1:
                break
        else:
            raise AssertionError("no recserve_fallbacks_total{kind=\"ranker\"} after the ranker was unloaded")
    finally:
        requests.post(f"{server.admin_url}/v2/repository/models/ranker/load", headers=server.admin_headers,
                      timeout=60)


def test_triton_2_51s_response_cache_still_answers_a_repeated_bad_request_with_an_empty_200(artifacts, tmp_path):
    """Why `recommend` has no `response_cache`: with it, Triton 2.51 stores a rejected request as an empty answer.
    When this fails, the Triton in use no longer does that, and the cache can be switched on (repository.py)."""
    repository = tmp_path / "model_repository"
    write_repository(artifacts, repository, RepoOptions(candidates=CANDIDATES))
    for path in (repository / "recommend" / "config.pbtxt", repository / "recommend" / "1" / "config.pbtxt"):
        cfg = parse(path.read_text())
        cfg.response_cache.enable = True
        path.write_text(render_proto(cfg))
    user = int(np.load(repository / "retrieval" / "1" / "users.npz")["user_ids"][0])
    bad = {"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user]},
                      {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [5]},
                      {"name": "hour", "shape": [1, 1], "datatype": "INT64", "data": [24]}]}
    with TritonServer(repository, free_port(), free_port(), free_port(), log_file=tmp_path / "triton.log",
                      verify=False, supervise=False, front_door=False,
                      extra_args=["--cache-config=local,size=10485760"]) as server:
        url = f"{server.url('http')}/v2/models/recommend/infer"
        first, second = (requests.post(url, json=bad, timeout=30) for _ in range(2))
    assert first.status_code == 400 and "hour=24" in first.text
    assert second.status_code == 200 and second.json()["outputs"] == []
