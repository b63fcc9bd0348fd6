"""Towers and ranker to ONNX, plus the tables the online half serves from.

Written under ARTIFACTS/onnx/:
  user_tower.onnx   user_idx (B,) i64, user_cats (B, C) i64, history (B, H) i64  -> user_vec (B, D) f32
  item_tower.onnx   item_idx (B,) i64, item_genres (B, G) f32, item_year (B,) i64 -> item_vec (B, D) f32
  ranker.onnx       see RANKER_INPUTS; user side (B, ...), candidates (B, K, ...)  -> scores (B, K) f32;
                    the `ServingRanker` arrangement (item-side products precomputed), checked against the Ranker
  item_embeddings.npy  (I, D) f32, L2-normalised: the index is inner product (= cosine)
  item_features.npz    raw item ids, titles, genres, year bucket, popularity
  user_features.npz    raw user ids, attributes, last-H history and seen items over all interactions
  export.json          opset, shapes, and the ONNX-vs-PyTorch errors measured at export
Batch axes (and K) are dynamic. Opset 18.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from recserve import checkpoint
from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
from recserve.errors import ArtifactError
from recserve.models import Ranker, ServingRanker, TwoTower
from recserve.reference import N_SRC, Tables, item_vectors

OPSET = 18
MAX_REL_ERROR = 1e-5
TOWER_INPUTS = {"user_tower": ("user_idx", "user_cats", "history"),
                "item_tower": ("item_idx", "item_genres", "item_year")}
OUTPUTS = {"user_tower": "user_vec", "item_tower": "item_vec", "ranker": "scores"}


def random_inputs(name: str, ds: Dataset, history_len: int, dim: int, batch: int, k: int, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Random *valid* inputs for one of the three models (ids in range, multi-hot genres, unit vectors)."""
    rng = np.random.default_rng(seed)
    cards = ds.user_cat_cards

    def unit(*shape):
        v = rng.standard_normal(shape).astype(np.float32)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    users = {"user_idx": rng.integers(0, ds.n_users, batch),
             "user_cats": np.stack([rng.integers(0, c, batch) for c in cards], 1),
             "history": rng.integers(0, ds.n_items + 1, (batch, history_len))}
    if name == "user_tower":
        return users
    if name == "item_tower":
        return {"item_idx": rng.integers(0, ds.n_items, batch),
                "item_genres": (rng.random((batch, ds.n_genres)) < 0.2).astype(np.float32),
                "item_year": rng.integers(0, 32, batch)}
    # item features are the catalogue's rows of each candidate, as served (`ServingRanker` relies on it)
    cand = rng.integers(0, ds.n_items, (batch, k))
    return {"user_idx": users["user_idx"], "user_cats": users["user_cats"], "user_vec": unit(batch, dim),
            "hour": rng.integers(0, 24, batch), "weekday": rng.integers(0, 7, batch),
            "cand_idx": cand, "cand_genres": ds.item_genres[cand], "cand_year": ds.item_year[cand],
            "cand_pop": ds.item_popularity(TRAIN)[cand], "cand_vec": unit(batch, k, dim),
            "cand_src": rng.standard_normal((batch, k, N_SRC)).astype(np.float32)}


def export_model(module: nn.Module, name: str, example: dict[str, np.ndarray], path: Path) -> None:
    names = list(example)
    args = tuple(torch.as_tensor(example[n]) for n in names)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dyn: list[dict] = []
    for n in names:
        axes = {0: batch}
        if name == "ranker" and n.startswith("cand_"):
            axes[1] = torch.export.Dim("candidates", min=1, max=1 << 16)
        dyn.append(axes)
    # the exporter logs pages of notes (optional torchvision ops, renamed axes) that are not about our models
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=[OUTPUTS[name]],
                          opset_version=OPSET, dynamic_shapes=tuple(dyn), external_data=False, dynamo=True,
                          verbose=False, report=False)


def compare(session: ort.InferenceSession, module: nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """ONNX Runtime vs PyTorch on the same inputs: max abs error, and that error relative to max |output|."""
    got = session.run(None, inputs)[0]
    with torch.no_grad():
        want = module(*[torch.as_tensor(v) for v in inputs.values()]).numpy()
    abs_err = float(np.abs(got - want).max())
    return {"max_abs_error": abs_err, "max_rel_error": abs_err / max(float(np.abs(want).max()), 1e-12)}


def export_onnx(artifacts: Path, verify_batch: int = 64) -> dict:
    artifacts = Path(artifacts)
    ds = Dataset.load(artifacts / "dataset.npz")
    two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", ds.fingerprint)
    ranker, _ = checkpoint.load(artifacts / "ranker.pt", ds.fingerprint)
    out = artifacts / "onnx"
    out.mkdir(exist_ok=True)
    # name -> (module exported, file, the trained module it is checked against). The ranker is written twice:
    # ranker.onnx as trained (what INT8 quantizes: QDQ of its one wide GEMM measured faster than of the
    # factored form, 0.99 vs 1.39 ms per user with cold caches) and ranker.serving.onnx, the `ServingRanker`
    # arrangement FP32 serves (1.56 vs 1.81 ms cold, 0.97 vs 1.32 warm; ML-100K, K = 500, one thread).
    serving_ranker = ServingRanker(ranker, torch.as_tensor(ds.item_genres), torch.as_tensor(ds.item_year),
                                   torch.as_tensor(ds.item_popularity(TRAIN)))
    exports = {"user_tower": (two_tower.user_tower, "user_tower.onnx", two_tower.user_tower),
               "item_tower": (two_tower.item_tower, "item_tower.onnx", two_tower.item_tower),
               "ranker": (ranker, "ranker.onnx", ranker),
               "ranker.serving": (serving_ranker, "ranker.serving.onnx", ranker)}
    H, D = two_tower.cfg.history_len, two_tower.cfg.dim
    report: dict = {"opset": OPSET, "models": {}}
    for key, (module, file, trained) in exports.items():
        name = key.split(".")[0]
        path = out / file
        export_model(module, name, random_inputs(name, ds, H, D, batch=4, k=8, seed=1), path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        errors = compare(sess, trained, random_inputs(name, ds, H, D, batch=verify_batch, k=50, seed=2))
        if errors["max_rel_error"] > MAX_REL_ERROR:
            raise ArtifactError(f"{path}: ONNX Runtime differs from PyTorch by {errors['max_rel_error']:.2e} "
                                f"(relative), above the {MAX_REL_ERROR:g} limit")
        report["models"][key] = {"file": path.name, "inputs": {i.name: [i.type, i.shape] for i in sess.get_inputs()},
                                 "outputs": {o.name: [o.type, o.shape] for o in sess.get_outputs()}, **errors}
    write_tables(ds, two_tower, ranker, out)
    report.update(fingerprint=ds.fingerprint, n_users=ds.n_users, n_items=ds.n_items, dim=D, history_len=H,
                  n_genres=ds.n_genres, user_cat_names=ds.user_cat_names, user_cat_cards=ds.user_cat_cards,
                  normalized=True, metric="inner_product")
    (out / "export.json").write_text(json.dumps(report, indent=2))
    return report


def write_tables(ds: Dataset, two_tower: TwoTower, ranker: Ranker, out: Path) -> None:
    """The lookup tables the online half needs: serving sees every interaction (train + valid + test)."""
    tables = Tables(ds, (TRAIN, VALID, TEST), two_tower.cfg.history_len)
    np.save(out / "item_embeddings.npy", item_vectors(two_tower, ds).astype(np.float32))
    np.savez(out / "item_features.npz", item_ids=ds.item_ids, titles=ds.titles.astype(str), genres=ds.item_genres,
             year=ds.item_year, pop=tables.item_pop)
    np.savez(out / "user_features.npz", user_ids=ds.user_ids, user_cats=ds.user_cats, history=tables.history,
             seen_indptr=tables.seen_indptr, seen=tables.seen)
