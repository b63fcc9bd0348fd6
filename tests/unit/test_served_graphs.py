"""The served ranker graph's epilogue computes the order `recserve.ranking.new_item_order` defines."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.export.graphs import ServingTables, ranker_graph
from recserve.ranking import PAD_ID, PAD_SCORE, new_item_order

N_ITEMS, D, K, KMAX, G = 90, 4, 24, 10, 3


def _tables(rng) -> ServingTables:
    return ServingTables(
        user_ids=np.arange(5, dtype=np.int64), user_cats=np.zeros((5, 1), np.int64),
        history=np.full((5, 2), N_ITEMS, np.int64), seen_indptr=np.zeros(6, np.int64), seen=np.zeros(0, np.int64),
        item_ids=np.sort(rng.choice(10_000, N_ITEMS, replace=False)).astype(np.int64), titles=np.array(["t"] * N_ITEMS),
        genres=np.zeros((N_ITEMS, G), np.float32), year=np.zeros(N_ITEMS, np.int64), pop=np.zeros(N_ITEMS, np.float32),
        item_vec=np.zeros((N_ITEMS, D), np.float32))


def _inner():
    """A stand-in ranker whose scores are the ALS column of cand_src: an order other than the blend's."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["cand_src", "als_column"], ["scores"], axis=2)], "stand_in",
        [helper.make_tensor_value_info("cand_src", TensorProto.FLOAT, ["batch", "candidates", 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "candidates"])],
        [numpy_helper.from_array(np.array(1, np.int64), "als_column")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("share_new", [0.0, 0.15, 0.5, 1.0])
def test_the_ranker_graph_keeps_new_items_at_their_retrieval_rank_as_the_numpy_rule_does(share_new):
    rng = np.random.default_rng(int(share_new * 100))
    t = _tables(rng)
    new = rng.random(N_ITEMS) < share_new
    graph = ranker_graph(_inner(), t, K, KMAX, new=new)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    B = 9
    cand = np.stack([rng.permutation(N_ITEMS)[:K] for _ in range(B)]).astype(np.int64)
    cand[2, 18:] = PAD_ID                                             # fewer candidates than K
    src = rng.integers(0, 5, (B, K, 3)).astype(np.float32)            # ties in both orders
    k = rng.integers(1, KMAX + 1, (B, 1)).astype(np.int32)
    ids, scores = sess.run(["item_ids", "scores"], {
        "user_idx": np.zeros((B, 1), np.int64), "user_vec": np.zeros((B, D), np.float32),
        "context_hour": np.zeros((B, 1), np.int64), "context_weekday": np.zeros((B, 1), np.int64),
        "cand_idx": cand, "cand_src": src, "k": k})
    want_idx, want_scores = new_item_order(src[..., 1], src[..., 0], cand, new[np.maximum(cand, 0)] & (cand >= 0),
                                           KMAX)
    within = np.arange(KMAX)[None, :] < k
    want_ids = np.where(within & (want_idx >= 0), t.item_ids[np.maximum(want_idx, 0)], PAD_ID)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, np.where(within & (want_idx >= 0), want_scores, PAD_SCORE))
    if share_new in (0.15, 0.5):        # new items do move: the ranker's own order differs
        plain = np.argsort(-np.where(cand >= 0, src[..., 1], -np.inf), axis=1, kind="stable")[:, :KMAX]
        assert (np.take_along_axis(cand, plain, 1) != want_idx).any()
