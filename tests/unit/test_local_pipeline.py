"""The embedded `recommend`'s answer in-process (`LocalPipeline.serve`): every row answered, its source, the
fallback chain when a step fails, and the options checked before any work."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.serving.local import LocalPipeline
from recserve.serving.repository import RepoOptions, write_repository
from recserve.serving.steps.base import RequestError
from recserve.serving.steps.retrieval import check_request


@pytest.fixture(scope="module")
def pipeline(tiny_artifacts, tmp_path_factory) -> LocalPipeline:
    repo = tmp_path_factory.mktemp("local") / "repo"
    write_repository(tiny_artifacts, repo, RepoOptions(candidates=60))
    return LocalPipeline(repo, ranker_timeout=0.25)      # as the served model runs it


def _request(p: LocalPipeline, users, k=5, **options) -> dict:
    n = len(users)
    r = {"user_id": np.array(users, np.int64).reshape(n, 1), "k": np.full((n, 1), k, np.int32),
         "hour": np.full((n, 1), 12, np.int64), "weekday": np.full((n, 1), 2, np.int64), **options}
    check_request(r, p.retriever.user_ids, p.k_max, allow_unknown=True)
    for row in range(n):
        p.options(r, row)
    return r


def test_known_and_unknown_users_in_one_batch_each_get_an_answer_and_a_source(pipeline):
    known = int(pipeline.retriever.user_ids[0])
    out = pipeline.serve([_request(pipeline, [known, 987654321])])[0]
    assert [s.decode() for s in out["source"][:, 0]] == ["personalized", "popular"]
    assert (out["item_ids"] >= 0).sum(1).tolist() == [5, 5]
    assert np.all(out["propensity"][out["item_ids"] >= 0] == 1.0)


def test_without_options_the_answer_is_the_served_path_unchanged(pipeline):
    users = pipeline.retriever.user_ids[:4]
    plain = pipeline({"user_id": users.reshape(-1, 1), "k": np.full((4, 1), 5, np.int32),
                      "hour": np.full((4, 1), 12), "weekday": np.full((4, 1), 2)})["item_ids"][:, :5]
    served = pipeline.serve([_request(pipeline, users.tolist())])[0]["item_ids"]
    assert np.array_equal(served, plain)


def test_a_failing_ranker_serves_the_retrieval_order_and_counts_the_fallback(pipeline, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "on_fallback", seen.append)
    known = int(pipeline.retriever.user_ids[1])
    req = _request(pipeline, [known], k=8)
    tensors = pipeline.retriever({"user_idx": req["user_idx"], "hour": req["hour"], "weekday": req["weekday"]})
    want = pipeline._retrieval_order(tensors["cand_idx"], tensors["cand_src"])[0][0, :8]

    class Broken:
        def run(self, *a, **k):
            raise RuntimeError("ranker died")
    monkeypatch.setattr(pipeline, "ranker", Broken())
    out = pipeline.serve([req])[0]
    assert out["source"][0, 0] == b"fallback" and seen == ["ranker"]
    assert out["item_ids"][0].tolist() == want.tolist()


def test_a_failing_retrieval_serves_popular_items(pipeline, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "on_fallback", seen.append)
    popular = pipeline.serve([_request(pipeline, [987654321], k=6)])[0]["item_ids"][0]

    def broken(*a, **k):
        raise RuntimeError("index gone")
    monkeypatch.setattr(pipeline, "retriever", type("R", (), {"__call__": broken,
                                                              "user_ids": pipeline.retriever.user_ids})())
    known = int(pipeline.retriever.user_ids[2])
    r = {"user_id": np.array([[known]]), "k": np.array([[6]], np.int32), "hour": np.array([[12]]),
         "weekday": np.array([[2]]), "user_idx": np.array([[2]])}
    out = pipeline.serve([r])[0]
    assert out["source"][0, 0] == b"fallback" and seen == ["retrieval"]
    assert out["item_ids"][0].tolist() == popular.tolist()


@pytest.mark.parametrize("options, words", [
    ({"explore": np.array([[1]], np.int32)}, "explore needs a seed"),
    ({"explore": np.array([[3]], np.int32), "seed": np.array([[1]])}, "explore=3"),
    ({"explore": np.array([[2]], np.int32), "explore_param": np.array([[0.0]], np.float32),
      "seed": np.array([[1]])}, "temperature"),
    ({"mmr_lambda": np.array([[1.5]], np.float32)}, "mmr_lambda"),
    ({"max_per_genre": np.array([[-1]], np.int32)}, "max_per_genre"),
])
def test_bad_options_are_refused_naming_the_field(pipeline, options, words):
    with pytest.raises(RequestError, match=words):
        _request(pipeline, [int(pipeline.retriever.user_ids[0])], **options)


def test_a_ranker_past_its_timeout_is_cut_short_and_the_retrieval_order_served(pipeline, monkeypatch):
    """The watchdog sets ONNX Runtime's RunOptions.terminate; a run that honours it ends and the fallback serves."""
    import time

    seen = []
    monkeypatch.setattr(pipeline, "on_fallback", seen.append)
    monkeypatch.setattr(pipeline, "ranker_timeout", 0.05)

    class Slow:                      # behaves as ONNX Runtime does when terminate is set mid-run
        def run(self, outputs, feed, run_options=None):
            t0 = time.monotonic()
            while not run_options.terminate:
                if time.monotonic() - t0 > 5:
                    return None      # the watchdog never fired: the test fails below
                time.sleep(0.001)
            raise RuntimeError("Exiting due to terminate flag being set to true.")

    monkeypatch.setattr(pipeline, "ranker", Slow())
    t0 = time.monotonic()
    out = pipeline.serve([_request(pipeline, [int(pipeline.retriever.user_ids[3])], k=4)])[0]
    assert out["source"][0, 0] == b"fallback" and seen == ["ranker_timeout"]
    assert time.monotonic() - t0 < 1.0
