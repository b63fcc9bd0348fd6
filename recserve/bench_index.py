"""Exact against approximate FAISS search at catalogue scale: QPS, recall@k, memory and build time per index.

    python -m recserve.bench_index --items 1000000 --dim 64 --json work/bench_index.json --png work/bench_index.png
    python -m recserve.bench_index --vectors item_embeddings.npy --queries user_vectors.npy
    python -m recserve.bench_index --artifacts work/ml100k      # a trained model's served vectors (`artifact_vectors`)

What is measured, and how:
* kinds: Flat (exact), IVF-Flat, IVF-PQ and HNSW-Flat, all METRIC_INNER_PRODUCT on L2-normalised vectors (= cosine,
  as the project serves). IVF: nlist = 4 sqrt(N), spherical k-means on `TRAIN_PER_CENTROID` sampled items per
  centroid, nprobe swept; IVF-PQ: the same nlist and training, pq_m = dim / 2 sub-quantisers of 8 bits, no refine;
  HNSW: M = 32 links per node, efConstruction 40, efSearch swept from k up (faiss 1.15's HNSW returns at most about
  efSearch results: a search for k > efSearch comes back short, padded with -1; so efSearch >= k always).
  A build's sweep stops at recall 0.995, on a recall plateau (< +0.001) or past the target and slower than exact.
* queries: held-out user vectors (never catalogue items), searched in batches of `batch` (default 64, about what
  Triton's dynamic batcher forms; 0 = the whole set in one call), every kind with the same thread count
  (`faiss.omp_set_num_threads`, default all cores).
* QPS: queries / wall seconds of one pass over the query set; the best pass of at least `repeats` passes and at least
  `min_time_s` seconds of passes (fewer when the passes pass `max_time_s`).
* recall@k: share of the exact Flat top-k that a run returns, over the same queries; the exact pass is the truth.
* bytes per item: `len(faiss.serialize_index(index)) / N`, everything the index holds (quantiser, codes, ids, links).
* build seconds: wall time of train + add.
`chosen` is the fastest run with recall@k >= the target (0.95 by default); exact Flat where none reaches it.

Synthetic vectors (`synthetic_catalogue`), built to look like trained two-tower embeddings rather than iid gaussian:
* C clusters (C = clip(2 sqrt(N), 256, 4096)) whose centres are gaussian with a decaying spectrum (the variance of
  axis i falls as (i + 1) ** -0.5, in a random rotation), as in embeddings whose leading directions carry most signal;
* cluster sizes follow a Zipf law (weight of rank r is r ** -0.8): a few large genres, a long tail;
* each point is its centre plus anisotropic noise (a per-cluster random rank-8 factor, norm ~0.5) plus isotropic noise
  (norm ~0.3), plus a shared "popularity" direction weighted by its cluster's log-popularity;
* rows are L2-normalised. Queries come from the same process with their own random stream (so they are held out and
  the items do not depend on how many queries are drawn). Everything is seeded and deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
LABELS = {"flat": "Flat (exact)", "ivf": "IVF-Flat", "ivfpq": "IVF-PQ", "hnsw": "HNSW"}
EXACT_BELOW = 20_000  # choose_index returns exact Flat under this many items unless forced
TRAIN_PER_CENTROID = 40  # k-means sample per IVF centroid (faiss warns under 39)
KMEANS_ITER = 20
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_FACTORS = (1, 1.5, 2, 3, 4, 6, 8)  # efSearch = factor * k
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
STOP_RECALL = 0.995  # a build's sweep stops once it reaches this (later points are slower, not more useful),
PLATEAU = 0.001  # or gains less recall than this over its previous point (IVF-PQ's code error caps its recall),
# or is no faster than exact search


# ----------------------------------------------------------------------------------------------- synthetic vectors
def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def synthetic_catalogue(n_items: int, n_queries: int = 1000, dim: int = 64, seed: int = 0,
                        n_clusters: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(items (n_items, dim), queries (n_queries, dim)), float32 unit rows, from the clustered process above."""
    if n_items < 1 or dim < 2 or n_queries < 0:
        raise ValueError(f"need n_items >= 1, dim >= 2 and n_queries >= 0 (got {n_items}, {dim}, {n_queries})")
    C = n_clusters or int(np.clip(2 * math.sqrt(n_items), 256, 4096))
    world, item_ss, query_ss = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(world)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = (np.arange(dim) + 1.0) ** -0.25                              # std; variance falls as (i+1)^-0.5
    centres = (rng.standard_normal((C, dim)) * spectrum) @ rotation.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rank = 8
    factors = rng.standard_normal((C, rank, dim)).astype(np.float32) * (0.5 / math.sqrt(rank * dim))
    popularity = (np.arange(C) + 1.0) ** -0.8
    popularity /= popularity.sum()
    pop_dir = rng.standard_normal(dim)
    pop_dir /= np.linalg.norm(pop_dir)
    pop_weight = 0.4 * (1 - np.log(np.arange(C) + 1.0) / math.log(C + 1.0))  # 0.4 for the top cluster, ~0 the tail
    shift = (centres + pop_weight[:, None] * pop_dir).astype(np.float32)

    def draw(n: int, ss: np.random.SeedSequence) -> np.ndarray:
        r = np.random.default_rng(ss)
        cluster = r.choice(C, n, p=popularity)
        out = np.empty((n, dim), np.float32)
        order = np.argsort(cluster, kind="stable")
        bounds = np.searchsorted(cluster[order], np.arange(C + 1))
        for c in range(C):
            rows = order[bounds[c]:bounds[c + 1]]
            if len(rows):
                z = r.standard_normal((len(rows), rank), dtype=np.float32)
                out[rows] = shift[c] + z @ factors[c]
        out += r.standard_normal((n, dim), dtype=np.float32) * np.float32(0.3 / math.sqrt(dim))
        return _unit_rows(out)

    return draw(n_items, item_ss), draw(n_queries, query_ss)


# ------------------------------------------------------------------------------------------------ building indexes
def ivf_nlist(n_items: int) -> int:
    """IVF cells: 4 sqrt(N), at least 1 and at most N / 39 (faiss wants >= 39 training points per centroid)."""
    return int(max(1, min(4 * math.sqrt(n_items), n_items // 39)))


def default_pq_m(dim: int) -> int:
    """IVF-PQ sub-quantisers: the largest divisor of dim up to dim / 2 (2-d sub-vectors at dim 64: 32 bytes/item)."""
    return max(m for m in range(1, dim // 2 + 1) if dim % m == 0)


def default_sweeps(n_items: int, dim: int, k: int = 100) -> dict[str, list[dict]]:
    """Params per kind, cheapest (fastest, least accurate) first; consecutive entries share a build where they can."""
    nlist = ivf_nlist(n_items)
    probes = [p for p in NPROBE if p <= nlist]
    return {
        "flat": [{}],
        "ivf": [{"nlist": nlist, "nprobe": p} for p in probes],
        "ivfpq": [{"nlist": nlist, "nprobe": p, "pq_m": default_pq_m(dim), "nbits": 8} for p in probes],
        "hnsw": [{"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": int(f * k)} for f in EF_FACTORS],
    }


_SEARCH_PARAMS = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}


def _build_params(kind: str, params: dict) -> tuple:
    skip = _SEARCH_PARAMS.get(kind)
    return tuple(sorted((k, v) for k, v in params.items() if k != skip))


def _empty_index(kind: str, params: dict, dim: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params.get("M", HNSW_M)), ip)
        index.hnsw.efConstruction = int(params.get("efConstruction", HNSW_EF_CONSTRUCTION))
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), ip)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params.get("pq_m", default_pq_m(dim))),
                                 int(params.get("nbits", 8)), ip)
    else:
        raise ValueError(f"unknown index kind {kind!r}: choose from {', '.join(KINDS)}")
    index.own_fields = True
    quantizer.this.disown()              # the IVF index frees its quantiser
    index.cp.spherical = True            # centroids on the unit sphere: inner product on normalised vectors
    index.cp.niter = KMEANS_ITER
    return index


def _trained(items: np.ndarray, kind: str, params: dict, seed: int) -> faiss.Index:
    """An empty index of `kind`, trained on a seeded sample of `items` where the kind needs training."""
    index = _empty_index(kind, params, items.shape[1])
    if not index.is_trained:
        n = len(items)
        sample = np.sort(np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_CENTROID * int(params["nlist"])),
                                                            replace=False))
        index.cp.seed = seed
        index.train(items[sample])
    return index


def set_search_params(index: faiss.Index, kind: str, params: dict) -> faiss.Index:
    """Apply the search-time parameter (nprobe / efSearch) of `params` to `index`, returned."""
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])
    return index


def _build(items: np.ndarray, kind: str, params: dict, seed: int = 0) -> faiss.Index:
    index = _trained(items, kind, params, seed)
    index.add(items)
    return set_search_params(index, kind, params)


def build_chosen(items: np.ndarray, chosen: dict, seed: int = 0) -> faiss.Index:
    """The index `chosen` describes ({"kind", "params"}, e.g. `choose_index(...)["chosen"]`) over `items`, with its
    search parameter (nprobe / efSearch) set. Same training sample for the same seed as in `choose_index`."""
    return _build(_as_f32(items), chosen["kind"], dict(chosen.get("params") or {}), seed)


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def bytes_per_item(index: faiss.Index) -> float:
    """Size of the serialised index (codes, ids, quantiser, graph links) over the items it holds."""
    return float(faiss.serialize_index(index).nbytes / max(1, index.ntotal))


# ----------------------------------------------------------------------------------------------------- measuring
def _search(index: faiss.Index, queries: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    if batch <= 0 or batch >= len(queries):
        return index.search(queries, k)
    dist = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        dist[s:s + batch], ids[s:s + batch] = index.search(queries[s:s + batch], k)
    return dist, ids


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, batch: int = 64, repeats: int = 3,
                 min_time_s: float = 0.5, max_time_s: float = 10.0) -> tuple[float, np.ndarray, np.ndarray]:
    """(QPS of the best pass, D, I): passes over `queries` until `repeats` passes and `min_time_s` seconds are done,
    or `max_time_s` seconds are (at least one pass)."""
    best, total, n = math.inf, 0.0, 0
    while True:
        t0 = time.perf_counter()
        dist, ids = _search(index, queries, k, batch)
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
        if total >= max_time_s or (n >= repeats and total >= min_time_s):
            return len(queries) / max(best, 1e-9), dist, ids


def recall_at_k(got: np.ndarray, want: np.ndarray) -> float:
    """Share of `want`'s ids (exact top-k per row) that the same row of `got` holds; -1 (missing) never counts."""
    hits = 0
    for s in range(0, len(want), 256):
        g, w = got[s:s + 256], want[s:s + 256]
        hits += int(((g[:, :, None] == w[:, None, :]) & (g[:, :, None] >= 0)).any(axis=1).sum())
    return hits / max(1, want.size)


def describe_params(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "-"


def _row(kind: str, params: dict, qps: float, recall: float, bpi: float, build_s: float, k: int) -> dict:
    return {"kind": kind, "params": dict(params), "qps": round(float(qps), 1), f"recall@{k}": round(float(recall), 5),
            "bytes_per_item": round(float(bpi), 2), "build_s": round(float(build_s), 3)}


def _line(r: dict, k: int) -> str:
    return (f"{LABELS[r['kind']]:<13} {describe_params(r['params']):<36} {r['qps']:>11,.0f} {r[f'recall@{k}']:>8.4f} "
            f"{r['bytes_per_item']:>9.1f} {r['build_s']:>8.1f}")


def _header(k: int) -> str:
    return f"{'kind':<13} {'params':<36} {'QPS':>11} {f'rec@{k}':>8} {'B/item':>9} {'build s':>8}"


def _threads(threads: int | None) -> int:
    if threads:
        return int(threads)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_index(items: np.ndarray, queries: np.ndarray, target_recall: float = 0.95, k: int = 100,
                 threads: int | None = None, kinds: tuple[str, ...] = KINDS, budget_s: float | None = None,
                 exact_below: int = EXACT_BELOW, force: bool = False, sweeps: dict[str, list[dict]] | None = None,
                 batch: int = 64, repeats: int = 3, min_time_s: float = 0.5, max_time_s: float = 10.0,
                 seed: int = 0, log: Callable[[str], Any] | None = None) -> dict:
    """Measure exact Flat and sweep the ANN `kinds` on held-out `queries`; `result["chosen"]` is the fastest run with
    recall@k >= `target_recall` (exact Flat if none). Under `exact_below` items only exact is measured unless `force`.
    `budget_s` stops starting builds / sweep points once that many seconds have passed. Structure: see module doc."""
    items, queries = _as_f32(items), _as_f32(queries)
    n, dim = items.shape
    if queries.ndim != 2 or queries.shape[1] != dim or not len(queries):
        raise ValueError(f"queries must be (Q > 0, {dim}), got {queries.shape}")
    k = min(k, n)
    rk = f"recall@{k}"
    threads = _threads(threads)
    sweeps = {**default_sweeps(n, dim, k), **(sweeps or {})}
    emit = log or (lambda _m: None)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    timing = dict(batch=batch, repeats=repeats, min_time_s=min_time_s, max_time_s=max_time_s)
    try:
        emit(f"index bench: {n:,} items x {dim}, {len(queries):,} held-out queries, k={k}, {threads} threads, "
             f"batch {batch or len(queries)}")
        emit(_header(k))
        t0 = time.perf_counter()
        exact = _build(items, "flat", {})
        exact_build = time.perf_counter() - t0
        exact_qps, _, truth = timed_search(exact, queries, k, **timing)
        runs = [_row("flat", {}, exact_qps, 1.0, bytes_per_item(exact), exact_build, k)]
        emit(_line(runs[0], k))
        del exact
        skipped: list[dict] = []
        shortcut = n < exact_below and not force
        for kind in [] if shortcut else [x for x in kinds if x != "flat"]:
            runs += _sweep(items, queries, truth, kind, sweeps[kind], k, target_recall, exact_qps, timing, seed, start,
                           budget_s, skipped, emit)
    finally:
        faiss.omp_set_num_threads(before)
    ok = [r for r in runs if r[rk] >= target_recall] or runs[:1]   # exact, unless the target is above 1
    best = max(ok, key=lambda r: r["qps"])
    if shortcut:
        reason = f"{n:,} items < exact_below={exact_below:,}: exact search, no ANN sweep"
    elif best["kind"] == "flat":
        reason = f"no approximate run reached {rk} >= {target_recall} faster than exact: exact search"
    else:
        reason = f"fastest run with {rk} >= {target_recall}"
    chosen = {**best, "speedup_vs_exact": round(best["qps"] / runs[0]["qps"], 2), "reason": reason}
    emit(f"chosen: {LABELS[chosen['kind']]} {describe_params(chosen['params'])}: {chosen['qps']:,.0f} QPS, "
         f"{rk} {chosen[rk]:.4f}, {chosen['speedup_vs_exact']}x exact ({reason})")
    return {"items": n, "dim": dim, "threads": threads, "queries": len(queries), "k": k, "batch": batch or len(queries),
            "target_recall": target_recall, "metric": "inner product on L2-normalised vectors",
            "qps_measure": f"best of >= {repeats} passes over the query set (>= {min_time_s} s of passes, "
                           f"stops after {max_time_s} s), batches of {batch or len(queries)}",
            "memory_measure": "len(faiss.serialize_index(index)) / items",
            "exact": {key: runs[0][key] for key in ("qps", "bytes_per_item", "build_s")},
            "chosen": chosen, "runs": runs, "skipped": skipped,
            "elapsed_s": round(time.perf_counter() - start, 1)}


def _sweep(items, queries, truth, kind, grid, k, target_recall, exact_qps, timing, seed, start, budget_s, skipped,
           emit) -> list:
    """The runs of one kind over `grid`, rebuilding only when the build params change."""
    rk, runs, index, built, build_s, done = f"recall@{k}", [], None, None, 0.0, set()
    over = lambda: budget_s is not None and time.perf_counter() - start > budget_s  # noqa: E731
    for params in grid:
        key = _build_params(kind, params)
        if key in done:          # this build already reached STOP_RECALL, plateaued or fell below exact's QPS
            continue
        if over():
            skipped.append({"kind": kind, "params": dict(params), "why": f"budget_s={budget_s} spent"})
            continue
        if key != built:
            index = None
            t0 = time.perf_counter()
            index = _build(items, kind, params, seed)
            build_s, built = time.perf_counter() - t0, key
        set_search_params(index, kind, params)
        qps, _, got = timed_search(index, queries, k, **timing)
        prev = runs[-1][rk] if runs and _build_params(kind, runs[-1]["params"]) == key else -1.0
        runs.append(_row(kind, params, qps, recall_at_k(got, truth), bytes_per_item(index), build_s, k))
        emit(_line(runs[-1], k))
        rec = runs[-1][rk]
        if rec >= STOP_RECALL or rec - prev < PLATEAU or (rec >= target_recall and qps < exact_qps):
            done.add(key)
    return runs


# -------------------------------------------------------------------------------------------------------- sharding
def shard_index(items: np.ndarray, n_shards: int, kind_params: dict | None = None, seed: int = 0) -> faiss.IndexShards:
    """`items` split into `n_shards` contiguous shards under one faiss.IndexShards (successive ids: shard s holds ids
    offset by the sizes of the shards before it, so results carry global item ids). `kind_params` = {"kind",
    "params"} (e.g. a `chosen`; default exact Flat). IVF kinds are trained once on a sample of all items and cloned,
    so every shard shares the coarse quantiser, as a build spread over machines would."""
    items = _as_f32(items)
    kind_params = kind_params or {"kind": "flat", "params": {}}
    kind, params = kind_params["kind"], dict(kind_params.get("params") or {})
    if not 1 <= n_shards <= len(items):
        raise ValueError(f"n_shards must be in [1, {len(items)}], got {n_shards}")
    template = _trained(items, kind, params, seed)
    shards = faiss.IndexShards(items.shape[1], True, True)     # threaded, successive_ids
    shards.metric_type = faiss.METRIC_INNER_PRODUCT            # merge keeps the largest (add_shard copies it too)
    for part in np.array_split(items, n_shards):
        shard = faiss.clone_index(template) if kind != "hnsw" else _empty_index(kind, params, items.shape[1])
        shard.add(np.ascontiguousarray(part))
        shards.add_shard(set_search_params(shard, kind, params))   # faiss keeps a python reference to each shard
    return shards


def sharded_search(shards: list[faiss.Index], queries: np.ndarray, k: int,
                   offsets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search shards that live apart (e.g. one per machine) and merge: (D, I) with I in global ids, shard s's local
    id i being `offsets[s] + i` (default: successive, the sizes of the shards before it)."""
    queries = _as_f32(queries)
    if offsets is None:
        offsets = np.cumsum([0] + [s.ntotal for s in shards[:-1]]).tolist()
    Ds, Is = [], []
    for shard, off in zip(shards, offsets):
        dist, ids = shard.search(queries, k)
        Ds.append(dist)
        Is.append(np.where(ids >= 0, ids + off, -1))
    return faiss.merge_knn_results(np.stack(Ds), np.stack(Is), keep_max=True)


# ------------------------------------------------------------------------------------------------- CLI and output
def plot_curve(result: dict, path: str | Path) -> Path:
    """Recall@k (x) against QPS (log y), one line per kind, exact as a star, the target recall dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, path = result["k"], Path(path)
    rk = f"recall@{k}"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind in KINDS:
        rs = [r for r in result["runs"] if r["kind"] == kind]
        if not rs:
            continue
        if kind == "flat":
            ax.plot([r[rk] for r in rs], [r["qps"] for r in rs], "k*", ms=14, label=LABELS[kind])
            continue
        ax.plot([r[rk] for r in rs], [r["qps"] for r in rs], "o-", label=LABELS[kind])
        sp = _SEARCH_PARAMS[kind]
        for r in rs:
            ax.annotate(str(r["params"][sp]), (r[rk], r["qps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(result["target_recall"], color="r", ls="--", lw=1, label=f"{rk} = {result['target_recall']}")
    c = result["chosen"]
    ax.plot([c[rk]], [c["qps"]], "o", ms=16, mfc="none", mec="r", mew=2,
            label=f"chosen: {LABELS[c['kind']]} {describe_params(c['params'])}")
    ax.set_yscale("log")
    ax.set_xlabel(f"{rk} against exact Flat ({result['queries']:,} held-out queries)")
    ax.set_ylabel(f"QPS ({result['threads']} threads, batch {result['batch']})")
    ax.set_title(f"FAISS indexes, {result['items']:,} items x {result['dim']} (labels: nprobe / efSearch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load(path: str | Path, what: str, emit: Callable[[str], Any]) -> np.ndarray:
    x = _as_f32(np.load(path))
    if x.ndim != 2:
        raise ValueError(f"{what} {path}: need a 2-d array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    if not np.allclose(norms, 1, atol=1e-3):
        emit(f"{what} {path}: rows are not unit-norm (median {np.median(norms):.3g}): L2-normalising them")
        x = _unit_rows(x)
    return x


def artifact_vectors(artifacts: str | Path, view: str = "serve") -> tuple[np.ndarray, np.ndarray]:
    """(items, queries) of a trained model, as `recserve export repository` indexes and measures them: the blend item
    matrix (`Blend.item_matrix` over the view's tables) and every user's blend vector through the served user graph
    (`repository._user_queries`), users being held out from the items by construction. The items are made equal in
    norm and the queries padded (`recserve.export.index.equal_norm`), as the served approximate indexes are: the
    inner products, and so exact search, are unchanged."""
    import tempfile

    import onnx

    from recserve.export import graphs
    from recserve.serving.repository import RepoOptions, _graph_files, _user_queries
    from recserve.sources import Blend, load_blend, load_view

    artifacts = Path(artifacts)
    files = _graph_files(artifacts, RepoOptions(view=view))
    tables = graphs.serving_tables(artifacts, view)
    src = load_view(artifacts, view)
    items = Blend.item_matrix(tables.item_vec, src)
    with tempfile.TemporaryDirectory() as tmp:
        user_graph = graphs.save(graphs.user_graph(onnx.load(files["user_tower"]), tables), Path(tmp) / "user.onnx")
        queries = _user_queries(user_graph, load_blend(artifacts), src, limit=len(tables.user_ids))
    from recserve.export.index import equal_norm, pad_queries

    return equal_norm(_as_f32(items)), pad_queries(_as_f32(queries))


def run_bench(items: int | None = None, dim: int = 64, vectors: str | Path | None = None,
              queries: str | Path | None = None, n_queries: int = 2000, threads: int | None = None,
              target_recall: float = 0.95, k: int = 100, seed: int = 0, json_path: str | Path | None = None,
              png_path: str | Path | None = None, log: Callable[[str], Any] | None = print,
              kinds: tuple[str, ...] = KINDS, batch: int = 64, budget_s: float | None = None,
              force: bool = True, repeats: int = 3, min_time_s: float = 0.5,
              artifacts: str | Path | None = None) -> dict:
    """The benchmark on `vectors` (.npy items) and `queries` (.npy held-out user vectors; without it, `n_queries`
    seeded rows of `vectors` are held out as queries), on a trained model's `artifacts` (`artifact_vectors`: blend
    items made equal in norm, users as queries), or on `synthetic_catalogue(items, n_queries, dim, seed)`.
    At most `n_queries` queries (a seeded subset). Writes `json_path` / `png_path` when given; returns the result."""
    emit = (lambda m: print(m, flush=True)) if log is print else (log or (lambda _m: None))
    rng = np.random.default_rng(seed)
    metric = None
    if artifacts is not None:
        X, Q = artifact_vectors(artifacts)
        source = f"artifacts {artifacts}: blend item matrix, {len(Q)} users' blend vectors as queries"
        metric = "inner product on the served blend vectors, made equal in norm (not normalised)"
        if len(Q) > n_queries:
            Q = Q[np.sort(rng.choice(len(Q), n_queries, replace=False))]
    elif vectors is not None:
        X = _load(vectors, "vectors", emit)
        if queries is not None:
            Q = _load(queries, "queries", emit)
            source = f"items {vectors}, queries {queries}"
        else:
            held = np.zeros(len(X), bool)
            held[rng.choice(len(X), min(n_queries, len(X) // 10), replace=False)] = True
            X, Q = X[~held], X[held]
            source = f"{vectors}, {held.sum()} rows held out as queries"
        if len(Q) > n_queries:
            Q = Q[np.sort(rng.choice(len(Q), n_queries, replace=False))]
    else:
        n = int(items or 200_000)
        t0 = time.perf_counter()
        X, Q = synthetic_catalogue(n, n_queries, dim, seed)
        source = f"synthetic_catalogue(n_items={n}, dim={dim}, seed={seed}), {time.perf_counter() - t0:.1f} s"
    emit(f"vectors: {source}")
    result = choose_index(X, Q, target_recall=target_recall, k=k, threads=threads, kinds=kinds, budget_s=budget_s,
                          force=force, batch=batch, repeats=repeats, min_time_s=min_time_s, seed=seed, log=emit)
    result["vectors"] = source
    if metric:
        result["metric"] = metric
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        emit(f"wrote {json_path}")
    if png_path:
        emit(f"wrote {plot_curve(result, png_path)}")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recserve.bench_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=None, help="synthetic catalogue size (default 200000)")
    p.add_argument("--dim", type=int, default=64, help="synthetic vector dimension")
    p.add_argument("--vectors", default=None, help="item vectors .npy (instead of synthetic ones)")
    p.add_argument("--queries", default=None, help="held-out user vectors .npy, with --vectors")
    p.add_argument("--artifacts", default=None, help="a trained model's blend items and user queries (export onnx'd)")
    p.add_argument("--n-queries", type=int, default=2000, help="queries measured (exact truth on all of them)")
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads, every kind (default: all cores)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=64, help="queries per search call (0 = all at once)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    p.add_argument("--budget-s", type=float, default=None, help="start no build / sweep point after this many s")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per run, the best counts")
    p.add_argument("--min-time-s", type=float, default=0.5, help="keep timing passes for at least this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--png", dest="png_path", default=None)
    a = p.parse_args(argv)
    kinds = tuple(x.strip() for x in a.kinds.split(",") if x.strip())
    bad = [x for x in kinds if x not in KINDS]
    if bad:
        p.error(f"unknown kinds {bad}: choose from {', '.join(KINDS)}")
    return run_bench(items=a.items, dim=a.dim, vectors=a.vectors, queries=a.queries, n_queries=a.n_queries,
                     threads=a.threads, target_recall=a.target_recall, k=a.k, seed=a.seed, json_path=a.json_path,
                     png_path=a.png_path, kinds=kinds, batch=a.batch, budget_s=a.budget_s, repeats=a.repeats,
                     min_time_s=a.min_time_s, artifacts=a.artifacts)


if __name__ == "__main__":
    main()
