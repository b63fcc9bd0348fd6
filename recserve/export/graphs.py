"""The served graphs: each model graph wrapped with the lookup tables and the top-k it needs, in ONNX.

`export onnx` writes the model graphs with feature inputs (what training, INT8 calibration and the
ONNX-vs-PyTorch checks work on). The repository serves them wrapped, so that one request needs no python
step to gather features:

  user tower  user_idx [B, 1] -> Gather(user attributes), Gather(recent items) -> tower -> user_vec [B, D]
  ranker      user_idx, user_vec, context_hour, context_weekday [B, 1|D], cand_idx [B, K], cand_src [B, K, S],
              k [B, 1]
              -> Gather each candidate's features from the item tables -> ranker -> scores [B, K]
              -> padding (cand_idx < 0) dropped, new items at their retrieval rank -> TopK(KMAX) -> raw item ids;
              ranks >= k become -1

The wrapping works on any graph with the model's input names, so the INT8 (QDQ) files are wrapped the same
way. Only Gather, GatherElements, ScatterElements, Where, TopK, CumSum, ReduceSum, Expand, Cast, Reshape,
arithmetic and comparisons are added: operators TensorRT builds too. The tables are initializers: the graph
is the whole model, data included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from recserve.ranking import PAD_ID, PAD_SCORE
from recserve.sources import SRC_FEATURES, VIEWS

N_SRC = len(SRC_FEATURES)

INNER = "inner/"   # prefix of the wrapped graph's own inputs and output


@dataclass
class ServingTables:
    """What the served graphs and steps look up, for one view of the data (which interactions are known)."""

    user_ids: np.ndarray      # (U,) raw ids, sorted
    user_cats: np.ndarray     # (U, C) int64
    history: np.ndarray       # (U, H) int64, newest first, padded with n_items
    seen_indptr: np.ndarray   # (U + 1,) CSR of each user's known items
    seen: np.ndarray          # (nnz,)
    item_ids: np.ndarray      # (I,) raw ids
    titles: np.ndarray        # (I,) str
    genres: np.ndarray        # (I, G) float32
    year: np.ndarray          # (I,) int64 bucket
    pop: np.ndarray           # (I,) float32 log(1 + training count)
    item_vec: np.ndarray      # (I, D) float32, the index's vectors


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array).reshape(np.shape(array)), name)   # 0-d stays 0-d


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for info in graph.value_info:
        if info.name == old:
            info.name = new


def _wrap(inner: onnx.ModelProto, inputs: list, outputs: list, prelude: list, epilogue: list,
          tables: dict[str, np.ndarray], output_name: str) -> onnx.ModelProto:
    """`inner` with its inputs fed by `prelude` and its output consumed by `epilogue`."""
    model = onnx.ModelProto()
    model.CopyFrom(inner)
    g = model.graph
    for value in g.input:
        _rename(g, value.name, INNER + value.name)
    _rename(g, output_name, INNER + output_name)
    del g.input[:]
    del g.output[:]
    g.input.extend(inputs)
    g.output.extend(outputs)
    g.initializer.extend(_tensor(n, a) for n, a in tables.items())
    body = list(g.node)
    del g.node[:]
    g.node.extend([*prelude, *body, *epilogue])
    onnx.checker.check_model(model, full_check=True)
    return model


def user_graph(inner: onnx.ModelProto, t: ServingTables) -> onnx.ModelProto:
    """user_idx [B, 1] -> user_vec [B, D], the user's attributes and recent items gathered in the graph."""
    dim = t.item_vec.shape[1]
    n = helper.make_node
    prelude = [
        n("Reshape", ["user_idx", "flat"], [INNER + "user_idx"]),
        n("Gather", ["user_cats_table", INNER + "user_idx"], [INNER + "user_cats"], axis=0),
        n("Gather", ["history_table", INNER + "user_idx"], [INNER + "history"], axis=0),
    ]
    epilogue = [n("Identity", [INNER + "user_vec"], ["user_vec"])]
    return _wrap(inner,
                 [helper.make_tensor_value_info("user_idx", TensorProto.INT64, ["batch", 1])],
                 [helper.make_tensor_value_info("user_vec", TensorProto.FLOAT, ["batch", dim])],
                 prelude, epilogue,
                 {"flat": np.array([-1], np.int64), "user_cats_table": t.user_cats.astype(np.int64),
                  "history_table": t.history.astype(np.int64)}, "user_vec")


def retrieval_order(opset: int = 18) -> onnx.ModelProto:
    """A ranker graph that keeps the retrieval order: score = the blend score, column 0 of `cand_src`.

    Served instead of the trained ranker when that one did not beat its retrieval order on validation.
    """
    n = helper.make_node
    graph = helper.make_graph(
        [n("Gather", ["cand_src", "blend_column"], ["scores"], axis=2)],
        "retrieval_order",
        [helper.make_tensor_value_info("cand_src", TensorProto.FLOAT, ["batch", "candidates", "sources"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "candidates"])],
        [numpy_helper.from_array(np.array(0, np.int64), "blend_column")])   # a scalar index drops the axis
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def ranker_graph(inner: onnx.ModelProto, t: ServingTables, candidates: int, k_max: int,
                 new: np.ndarray | None = None) -> onnx.ModelProto:
    """The served ranker: candidates in, the best k_max raw item ids and their scores out. `new` (I,) bool: items
    the view has no interaction with, which keep their retrieval rank (`recserve.ranking.new_item_order`)."""
    dim = t.item_vec.shape[1]
    n = helper.make_node
    prelude = [
        n("Reshape", ["user_idx", "flat"], [INNER + "user_idx"]),
        n("Reshape", ["context_hour", "flat"], [INNER + "hour"]),
        n("Reshape", ["context_weekday", "flat"], [INNER + "weekday"]),
        n("Identity", ["user_vec"], [INNER + "user_vec"]),
        n("Identity", ["cand_src"], [INNER + "cand_src"]),
        n("Gather", ["user_cats_table", INNER + "user_idx"], [INNER + "user_cats"], axis=0),
        n("GreaterOrEqual", ["cand_idx", "zero"], ["cand_valid"]),
        n("Where", ["cand_valid", "cand_idx", "zero"], [INNER + "cand_idx"]),           # padding -> item 0
        n("Gather", ["genres_table", INNER + "cand_idx"], [INNER + "cand_genres"], axis=0),   # (B, K, G)
        n("Gather", ["year_table", INNER + "cand_idx"], [INNER + "cand_year"], axis=0),       # (B, K)
        n("Gather", ["pop_table", INNER + "cand_idx"], [INNER + "cand_pop"], axis=0),         # (B, K)
        n("Gather", ["item_vec_table", INNER + "cand_idx"], [INNER + "cand_vec"], axis=0),    # (B, K, D)
    ]
    k_max = min(k_max, candidates)
    if 2 * candidates * (candidates + 1) + candidates >= 2 ** 24:
        raise ValueError(f"K = {candidates} candidates: the order keys would not be exact in float32 (K < 2890)")
    with_new = new is not None and bool(np.any(new))
    if with_new:
        order = _new_item_order(n)
    else:   # no item without interactions: the ranker's order (the rule's extra TopKs cost 7-12% of the graph)
        order = [n("Where", ["cand_valid", INNER + "scores", "pad_score"], ["masked_scores"]),
                 n("TopK", ["masked_scores", "k_max"], ["_top_scores", "top_pos"], axis=1, largest=1, sorted=1),
                 n("Identity", [INNER + "scores"], ["final_scores"])]
    epilogue = [*order, *[
        n("GatherElements", [INNER + "cand_idx", "top_pos"], ["top_idx"], axis=1),          # (B, KMAX)
        n("GatherElements", ["final_scores", "top_pos"], ["top_scores"], axis=1),
        n("GatherElements", ["cand_valid", "top_pos"], ["top_valid"], axis=1),
        n("Gather", ["item_ids_table", "top_idx"], ["top_raw"], axis=0),
        n("Cast", ["k"], ["k64"], to=TensorProto.INT64),
        n("Less", ["ranks", "k64"], ["within_k"]),                                          # (B, KMAX)
        n("And", ["within_k", "top_valid"], ["keep"]),
        n("Where", ["keep", "top_raw", "pad_id"], ["item_ids"]),
        n("Where", ["keep", "top_scores", "pad_score"], ["scores"]),
    ]]
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("user_idx", i64, ["batch", 1]),
              helper.make_tensor_value_info("user_vec", f32, ["batch", dim]),
              helper.make_tensor_value_info("context_hour", i64, ["batch", 1]),
              helper.make_tensor_value_info("context_weekday", i64, ["batch", 1]),
              helper.make_tensor_value_info("cand_idx", i64, ["batch", candidates]),
              helper.make_tensor_value_info("cand_src", f32, ["batch", candidates, N_SRC]),
              helper.make_tensor_value_info("k", TensorProto.INT32, ["batch", 1])]
    outputs = [helper.make_tensor_value_info("item_ids", i64, ["batch", k_max]),
               helper.make_tensor_value_info("scores", f32, ["batch", k_max])]
    tables = {"flat": np.array([-1], np.int64), "zero": np.array(0, np.int64),
              "pad_id": np.array(PAD_ID, np.int64), "pad_score": np.array(PAD_SCORE, np.float32),
              "k_max": np.array([k_max], np.int64), "ranks": np.arange(k_max, dtype=np.int64)[None, :],
              "user_cats_table": t.user_cats.astype(np.int64), "genres_table": t.genres.astype(np.float32),
              "year_table": t.year.astype(np.int64), "pop_table": t.pop.astype(np.float32),
              "item_vec_table": t.item_vec.astype(np.float32), "item_ids_table": t.item_ids.astype(np.int64)}
    if with_new:                        # what the new-item order reads
        tables |= {"order/new_table": np.asarray(new, bool), "order/k_all": np.array([candidates], np.int64),
                   "order/cand_ranks": np.arange(candidates, dtype=np.int64)[None, :],
                   "order/blend_column": np.array(0, np.int64), "order/neg_inf": np.array(-np.inf, np.float32),
                   "order/one": np.array(1, np.int64), "order/axis_1": np.array([1], np.int64),
                   "order/two_f": np.array(2.0, np.float32), "order/one_f": np.array(1.0, np.float32),
                   "order/k_plus_1": np.array(candidates + 1, np.float32),
                   "order/no_key": np.array(2.0 ** 24, np.float32)}
    return _wrap(inner, inputs, outputs, prelude, epilogue, tables, "scores")


def _new_item_order(n) -> list:
    """Nodes: the candidates' order as `recserve.ranking.new_item_order` (same keys, same scores) -> top_pos
    (B, KMAX) and final_scores (B, K). New items keep their rank r in the retrieval order (the blend score); the
    j-th of them by r goes before the other item of ranker rank q when r - j <= q; keys 2(r - j)(K + 1) + j and
    (2q + 1)(K + 1), exact in float32. TopK breaks ties to the lower index, as `ranking.top_positions`."""
    return [
        n("Gather", ["order/new_table", INNER + "cand_idx"], ["new_raw"], axis=0),
        n("And", ["new_raw", "cand_valid"], ["is_new"]),
        n("Not", ["is_new"], ["not_new"]),
        n("And", ["cand_valid", "not_new"], ["is_other"]),
        n("Shape", ["cand_idx"], ["cand_shape"]),
        n("Expand", ["order/cand_ranks", "cand_shape"], ["rank_bk"]),                               # (B, K) 0..K-1
        n("Gather", ["cand_src", "order/blend_column"], ["retrieval"], axis=2),                    # the blend score
        n("Where", ["cand_valid", "retrieval", "order/neg_inf"], ["retrieval_m"]),
        n("TopK", ["retrieval_m", "order/k_all"], ["_retrieval_sorted", "by_r"], axis=1, largest=1, sorted=1),
        n("ScatterElements", ["rank_bk", "by_r", "rank_bk"], ["r"], axis=1),
        n("Cast", ["is_new"], ["new_i"], to=TensorProto.INT64),
        n("GatherElements", ["new_i", "by_r"], ["new_sorted"], axis=1),
        n("CumSum", ["new_sorted", "order/one"], ["new_cum"]),
        n("Sub", ["new_cum", "new_sorted"], ["j_sorted"]),
        n("ScatterElements", ["rank_bk", "by_r", "j_sorted"], ["j"], axis=1),
        n("Where", ["is_other", INNER + "scores", "order/neg_inf"], ["other_scores"]),
        n("TopK", ["other_scores", "order/k_all"], ["sorted_other", "by_q"], axis=1, largest=1, sorted=1),
        n("ScatterElements", ["rank_bk", "by_q", "rank_bk"], ["q"], axis=1),
        n("Sub", ["r", "j"], ["r_minus_j"]),
        n("Cast", ["r_minus_j"], ["rj_f"], to=TensorProto.FLOAT),
        n("Cast", ["j"], ["j_f"], to=TensorProto.FLOAT),
        n("Cast", ["q"], ["q_f"], to=TensorProto.FLOAT),
        n("Mul", ["rj_f", "order/two_f"], ["rj2"]),
        n("Mul", ["rj2", "order/k_plus_1"], ["rj2k"]),
        n("Add", ["rj2k", "j_f"], ["key_new"]),
        n("Mul", ["q_f", "order/two_f"], ["q2"]),
        n("Add", ["q2", "order/one_f"], ["q21"]),
        n("Mul", ["q21", "order/k_plus_1"], ["key_other"]),
        n("Where", ["is_new", "key_new", "key_other"], ["key_any"]),
        n("Where", ["cand_valid", "key_any", "order/no_key"], ["key"]),
        n("Neg", ["key"], ["neg_key"]),
        n("TopK", ["neg_key", "k_max"], ["_neg_key_top", "top_pos"], axis=1, largest=1, sorted=1),
        # a new item's score: the other item's just above it (rank r - j - 1 among the others), clipped to the
        # others there are; its own retrieval score when there are none
        n("Cast", ["is_other"], ["other_i"], to=TensorProto.INT64),
        n("ReduceSum", ["other_i", "order/axis_1"], ["n_other"], keepdims=1),
        n("Sub", ["n_other", "order/one"], ["last_other"]),
        n("Max", ["last_other", "zero"], ["last_other0"]),
        n("Sub", ["r_minus_j", "order/one"], ["above_raw"]),
        n("Max", ["above_raw", "zero"], ["above_lo"]),
        n("Min", ["above_lo", "last_other0"], ["above"]),
        n("GatherElements", ["sorted_other", "above"], ["score_above"], axis=1),
        n("Greater", ["n_other", "zero"], ["has_other"]),
        n("Where", ["has_other", "score_above", "retrieval"], ["new_score"]),
        n("Where", ["is_new", "new_score", INNER + "scores"], ["final_scores"]),
    ]




def serving_tables(artifacts: Path, view: str = "serve") -> ServingTables:
    """The tables for one view: `serve` knows every interaction; `test` / `valid` what evaluation knows then.

    Popularity is always the training split's (as the ranker was trained), item vectors are the exported ones.
    """
    from recserve.data.dataset import TRAIN, Dataset

    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not known: choose {', '.join(VIEWS)}")
    artifacts = Path(artifacts)
    ds = Dataset.load(artifacts / "dataset.npz")
    meta = onnx_meta(artifacts)
    known = VIEWS[view]
    indptr, seen = ds.seen_csr(*known)
    return ServingTables(
        user_ids=ds.user_ids.astype(np.int64), user_cats=ds.user_cats.astype(np.int64),
        history=ds.last_history(*known, length=meta["history_len"]), seen_indptr=indptr, seen=seen,
        item_ids=ds.item_ids.astype(np.int64), titles=ds.titles.astype(str), genres=ds.item_genres.astype(np.float32),
        year=ds.item_year.astype(np.int64), pop=ds.item_popularity(TRAIN),
        item_vec=np.load(artifacts / "onnx" / "item_embeddings.npy").astype(np.float32))


def onnx_meta(artifacts: Path) -> dict:
    import json

    from recserve.errors import ArtifactError

    path = Path(artifacts) / "onnx" / "export.json"
    if not path.exists():
        raise ArtifactError(f"{path} is missing: run `recserve export onnx --artifacts {artifacts}`")
    return json.loads(path.read_text())


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
