"""ONNX Runtime latency of the FP32 and INT8 models on real rows from the artifacts.

ranker: one user's request, the `candidates` items the FP32 towers retrieve for them (inputs (1, K, ...));
user_tower / item_tower: a batch of real users / catalogue items. FP32 and INT8 runs alternate in blocks,
so both see the same machine load. Nothing is asserted about speed anywhere (figures, not timed tests).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
from recserve.errors import ArtifactError
from recserve.export.quantize import MODELS, run, session
from recserve.reference import Tables, context_of, ranker_batch


def bench_inputs(artifacts: Path, candidates: int = 500, batch: int = 256, seed: int = 0, ranker_users: int = 1
                 ) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs per model, with the serving tables (every interaction known, FP32 item embeddings)."""
    artifacts = Path(artifacts)
    onnx_dir = artifacts / "onnx"
    ds = Dataset.load(artifacts / "dataset.npz")
    rng = np.random.default_rng(seed)
    H = json.loads((onnx_dir / "export.json").read_text())["history_len"]
    tables = Tables(ds, (TRAIN, VALID, TEST), H)
    item_vecs = np.load(onnx_dir / "item_embeddings.npy")
    users = np.sort(rng.choice(ds.n_users, min(batch, ds.n_users), replace=False))
    f = tables.users(users)
    user_in = {"user_idx": f.user_idx, "user_cats": f.user_cats, "history": f.history}
    items = np.sort(rng.choice(ds.n_items, min(batch, ds.n_items), replace=False))
    item_in = {"item_idx": items, "item_genres": ds.item_genres[items], "item_year": ds.item_year[items]}

    u = users[:ranker_users]
    fu = tables.users(u)
    uv = run(session(onnx_dir / "user_tower.onnx"), {k: v[:ranker_users] for k, v in user_in.items()})
    cand = np.argsort(-(uv @ item_vecs.T), axis=1, kind="stable")[:, :min(candidates, ds.n_items)]   # (U, K)
    last = np.searchsorted(ds.users, u, side="right") - 1                      # each user's latest interaction
    hour, weekday = context_of(ds.timestamps[last])
    ranker_in = ranker_batch(tables, fu, uv, hour, weekday, cand, item_vecs)
    return {"user_tower": user_in, "item_tower": item_in, "ranker": ranker_in}


def _time(paths: dict[str, Path], threads: int, feed: dict[str, np.ndarray], repeats: int, warmup: int,
          blocks: int = 5) -> dict[str, np.ndarray]:
    """Per-run seconds of each model file, FP32 and INT8 alternating in `blocks` blocks (so both see the same
    load drift), each block on a fresh session after `warmup` untimed runs. One session is alive at a time:
    with two, the idle one's thread pool made 11-14% of the other's 2-thread ranker runs 4 ms slower (p90
    5.8 ms against 1.9 ms alone), which a server running one model per process does not see."""
    per = max(1, repeats // blocks)
    out: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(blocks):
        for k, path in paths.items():
            sess = session(path, threads)
            for _ in range(warmup):
                run(sess, feed)
            for _ in range(per):
                t0 = time.perf_counter()
                run(sess, feed)
                out[k].append(time.perf_counter() - t0)
            del sess
    return {k: np.asarray(v) for k, v in out.items()}


def bench_int8(artifacts: Path, candidates: int = 500, repeats: int = 300, threads: tuple[int, ...] = (1, 0),
               batch: int = 256, warmup: int = 10, ranker_users: tuple[int, ...] = (1, 8)) -> list[dict]:
    """FP32 vs INT8 per model and thread setting (0 = ONNX Runtime's default, all cores).

    The ranker is timed on one user's request and on `ranker_users` users at once: 8 is the ranker's
    preferred dynamic-batch size, i.e. the batch Triton hands it under load.

    Each row: median and p90 latency in ms per request, throughput (rows/s: candidates for the ranker, users
    or items for the towers) and speed-up = FP32 median / INT8 median.
    """
    onnx_dir = Path(artifacts) / "onnx"
    missing = [f"{n}{s}.onnx" for n in MODELS for s in ("", ".int8") if not (onnx_dir / f"{n}{s}.onnx").exists()]
    if missing:
        raise ArtifactError(f"{onnx_dir} lacks {', '.join(missing)}: export and quantize first")
    inputs = bench_inputs(artifacts, candidates, batch, ranker_users=max(ranker_users))
    feeds = [("ranker", {k: v[:u] for k, v in inputs["ranker"].items()}) for u in ranker_users]
    feeds += [("user_tower", inputs["user_tower"]), ("item_tower", inputs["item_tower"])]
    rows = []
    for name, feed in feeds:
        n = int(feed["cand_idx"].size) if name == "ranker" else len(feed[next(iter(feed))])
        for t in threads:
            paths = {"fp32": onnx_dir / f"{name}.onnx", "int8": onnx_dir / f"{name}.int8.onnx"}
            times = _time(paths, t, feed, repeats, warmup)
            row = {"model": name, "rows_per_request": n, "unit": "candidates" if name == "ranker" else "rows",
                   "threads": t, "threads_label": str(t) if t else f"all ({os.cpu_count()})",
                   "repeats": len(times["fp32"])}
            for p, ts in times.items():
                med, p90 = float(np.median(ts)), float(np.quantile(ts, 0.9))
                row |= {f"{p}_ms_median": round(med * 1e3, 4), f"{p}_ms_p90": round(p90 * 1e3, 4),
                        f"{p}_rows_per_s": round(n / med, 1)}
            row["speedup"] = round(row["fp32_ms_median"] / row["int8_ms_median"], 3)
            rows.append(row)
    return rows


def format_bench(rows: list[dict]) -> str:
    head = (f"{'model':<11}{'rows':>6}{'threads':>10}{'fp32 med':>10}{'p90':>8}{'int8 med':>10}{'p90':>8}"
            f"{'fp32 rows/s':>13}{'int8 rows/s':>13}{'speed-up':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<11}{r['rows_per_request']:>6}{r['threads_label']:>10}"
                     f"{r['fp32_ms_median']:>10.3f}{r['fp32_ms_p90']:>8.3f}{r['int8_ms_median']:>10.3f}"
                     f"{r['int8_ms_p90']:>8.3f}{r['fp32_rows_per_s']:>13,.0f}{r['int8_rows_per_s']:>13,.0f}"
                     f"{r['speedup']:>9.2f}x")
    lines.append("latency in ms per call (median, p90); ranker rows are 500 candidates per user, 1 or 8 users a call")
    return "\n".join(lines)


__all__ = ["bench_int8", "bench_inputs", "format_bench"]
