"""FAISS index over the item embeddings, with its recall measured at build time.

Every index uses inner product (METRIC_INNER_PRODUCT) over the blend vectors (`recserve.sources.Blend`).
- auto: `recserve.bench_index.choose_index` on the real items and held-out user queries picks the fastest index
  with recall@100 >= 0.95 against exact search (`auto_index`); under `bench_index.EXACT_BELOW` items that is exact
  Flat without an ANN sweep. The served search asks for fetch_k results (K + the most items a user has seen), so the
  chosen nprobe / efSearch is then raised until recall@fetch_k reaches the target too. Without queries
  (`build_index` alone) auto falls back on a size rule: exact below `EXACT_MAX_ITEMS`, IVF above;
- flat: IndexFlatIP, exact;
- ivf / ivfpq: IndexIVFFlat / IndexIVFPQ, nlist ~ 4 sqrt(N), nprobe configurable;
- hnsw: IndexHNSWFlat, M links per node; efSearch is raised to cover the served search (`resolved(fetch_k=...)`):
  faiss's HNSW returns at most about efSearch results, so a search of k > efSearch results comes back short (-1s).
Recall@k against exact search is measured on real user vectors and stored with the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

EXACT_MAX_ITEMS = 100_000  # auto's size rule when there are no queries to choose with
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_FACTOR = 1.5       # hnsw without an efSearch: 1.5 x the largest served search (recall@k ~0.99 at ef = 1.5 k)
DEFAULT_K = 100


@dataclass
class IndexSpec:
    kind: str = "auto"         # auto | flat | ivf | ivfpq | hnsw
    nlist: int = 0             # IVF cells; 0 = 4 * sqrt(N)
    nprobe: int = 0            # cells visited per query; 0 = max(8, nlist // 16)
    pq_m: int = 16             # IVF-PQ sub-quantisers (dim must be divisible)
    M: int = 0                 # HNSW links per node; 0 = 32
    efConstruction: int = 0    # HNSW build candidate list; 0 = 40
    efSearch: int = 0          # HNSW search candidate list; 0 = 1.5 x the served search; never below it

    def resolved(self, n_items: int, fetch_k: int = 0) -> IndexSpec:
        """Every parameter filled in for `n_items` items, searched for up to `fetch_k` results at a time."""
        kind = self.kind
        if kind == "auto":
            kind = "flat" if n_items < EXACT_MAX_ITEMS else "ivf"
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}: choose auto, {', '.join(KINDS)}")
        if kind == "flat":
            return IndexSpec("flat")
        if kind == "hnsw":
            ef = self.efSearch or math.ceil(HNSW_EF_FACTOR * max(fetch_k, DEFAULT_K))
            return IndexSpec("hnsw", M=self.M or HNSW_M, efConstruction=self.efConstruction or HNSW_EF_CONSTRUCTION,
                             efSearch=min(max(ef, fetch_k), max(n_items, 1)))
        nlist = self.nlist or max(1, int(4 * math.sqrt(n_items)))
        nlist = min(nlist, n_items)
        nprobe = min(self.nprobe or max(8, nlist // 16), nlist)
        return IndexSpec(kind, nlist, nprobe, self.pq_m)

    def params(self) -> dict:
        """The parameters that apply to the kind, named as faiss (and `recserve.bench_index`) name them."""
        if self.kind == "flat":
            return {}
        if self.kind == "hnsw":
            return {"M": self.M, "efConstruction": self.efConstruction, "efSearch": self.efSearch}
        out = {"nlist": self.nlist, "nprobe": self.nprobe}
        return {**out, "pq_m": self.pq_m} if self.kind == "ivfpq" else out

    @classmethod
    def of(cls, kind: str, params: dict) -> IndexSpec:
        """The spec of a `bench_index` run ({"kind", "params"})."""
        p = params or {}
        return cls(kind, nlist=int(p.get("nlist", 0)), nprobe=int(p.get("nprobe", 0)),
                   pq_m=int(p.get("pq_m", 16)), M=int(p.get("M", 0)), efConstruction=int(p.get("efConstruction", 0)),
                   efSearch=int(p.get("efSearch", 0)))


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0,
                fetch_k: int = 0) -> tuple[faiss.Index, IndexSpec]:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    spec = spec.resolved(n, fetch_k)
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.efConstruction
        index.hnsw.efSearch = spec.efSearch
    else:
        quantizer = faiss.IndexFlatIP(d)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = vectors[rng.choice(n, min(n, 256 * spec.nlist), replace=False)]
        index.train(train)
        index.nprobe = spec.nprobe
    index.add(vectors)
    return index, spec


def auto_index(vectors: np.ndarray, queries: np.ndarray, k: int = DEFAULT_K, target_recall: float = 0.95,
               fetch_k: int = 0, threads: int | None = None, seed: int = 0,
               **choose) -> tuple[faiss.Index, IndexSpec, dict]:
    """(index, spec, report): `bench_index.choose_index` on `vectors` and the held-out `queries` picks the fastest
    index with recall@k >= `target_recall` (exact Flat under `bench_index.EXACT_BELOW` items), built as measured.

    The served search asks `fetch_k` results (K + the most items a user has seen), more than the k measured: HNSW
    keeps its measured efSearch / k ratio at fetch_k (efSearch = ceil(ratio * fetch_k), at least fetch_k: see the
    module doc), then IVF's nprobe / HNSW's efSearch are raised until recall@fetch_k reaches the target as well
    (`_cover_fetch`). `choose` goes to `choose_index` (sweeps, kinds, timing, budget_s, ...).
    The report holds the choice: kind, params (as measured), qps, recall@k, speedup over exact, reason, and under
    "served" the parameters as served with their recall@fetch_k and QPS at fetch_k (exact's too)."""
    from recserve import bench_index as bi

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < choose.get("exact_below", bi.EXACT_BELOW) and not choose.get("force"):
        choose = {"repeats": 3, "min_time_s": 0.05, **choose}   # exact anyway: a quick QPS figure is enough
    result = bi.choose_index(vectors, queries, target_recall=target_recall, k=k, threads=threads, seed=seed,
                             **choose)
    chosen = result["chosen"]
    spec = IndexSpec.of(chosen["kind"], chosen["params"])
    if spec.kind == "hnsw" and fetch_k:
        spec.efSearch = max(spec.efSearch, math.ceil(spec.efSearch * fetch_k / result["k"]))
    spec = spec.resolved(n, fetch_k)
    index = bi.set_search_params(bi.build_chosen(vectors, chosen, seed), spec.kind, spec.params())
    rk = f"recall@{result['k']}"
    report = {"kind": chosen["kind"], "params": chosen["params"], "qps": chosen["qps"], rk: chosen[rk],
              "speedup_vs_exact": chosen["speedup_vs_exact"], "exact_qps": result["exact"]["qps"],
              "reason": chosen["reason"], "target_recall": target_recall, "k": result["k"],
              "threads": result["threads"], "batch": result["batch"], "queries": result["queries"],
              "runs": len(result["runs"]), "elapsed_s": result["elapsed_s"]}
    if spec.kind != "flat" and fetch_k > result["k"]:
        spec, report["served"] = _cover_fetch(index, spec, vectors, queries, fetch_k, target_recall,
                                              result["threads"], choose.get("batch", 64))
    return index, spec, report


def _cover_fetch(index: faiss.Index, spec: IndexSpec, vectors: np.ndarray, queries: np.ndarray, fetch_k: int,
                 target_recall: float, threads: int, batch: int, max_steps: int = 8) -> tuple[IndexSpec, dict]:
    """Raise the search parameter (IVF nprobe x2, HNSW efSearch x1.5) until recall@fetch_k reaches the target too:
    the served search asks fetch_k results, and a setting measured at k loses recall at several times k (HNSW at
    efSearch = k: ~0.96 at k = 100, ~0.95 at 400). Stops at the target, on a plateau or at the largest setting.
    (spec as set on `index`, {"fetch_k", "params", "recall@fetch_k", "raised", "qps", "exact_qps"}), the QPS of
    the served setting and of exact search at fetch_k (best of 3 passes, `threads` threads, batches of `batch`)."""
    from recserve import bench_index as bi

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        exact_qps, _, truth = bi.timed_search(exact, q, fetch_k, batch, repeats=3, min_time_s=0.0)
        del exact
        field_, top = ("efSearch", len(vectors)) if spec.kind == "hnsw" else ("nprobe", spec.nlist)
        steps, prev = 0, -1.0
        while True:
            recall = bi.recall_at_k(index.search(q, fetch_k)[1], truth)
            value = getattr(spec, field_)
            if recall >= target_recall or value >= top or recall - prev < bi.PLATEAU or steps >= max_steps:
                break
            setattr(spec, field_, min(top, math.ceil(value * 1.5) if spec.kind == "hnsw" else 2 * value))
            bi.set_search_params(index, spec.kind, spec.params())
            steps, prev = steps + 1, recall
        qps = bi.timed_search(index, q, fetch_k, batch, repeats=3, min_time_s=0.0)[0]
    finally:
        faiss.omp_set_num_threads(before)
    return spec, {"fetch_k": fetch_k, "params": spec.params(), "recall@fetch_k": round(recall, 5), "raised": steps,
                  "qps": round(qps, 1), "exact_qps": round(exact_qps, 1)}


def equal_norm(items: np.ndarray) -> np.ndarray:
    """Items with one more column, sqrt(M^2 - |x|^2) (M = the largest norm), so that every row has norm M.

    The served vectors are blends (towers, ALS factors, a popularity column) of unequal norms, and approximate
    indexes under inner product do badly on those (IVF recall@100 0.36 on ML-100K's). A query with a 0 appended
    (`pad_queries`) has the same inner product with each item as before, so the exact ranking is unchanged,
    while the items now lie on a sphere, where IVF's cells and HNSW's graph work (Bachrach et al., 2014)."""
    x = np.ascontiguousarray(items, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)[:, None]
    return np.ascontiguousarray(np.hstack([x, extra]))


def pad_queries(queries: np.ndarray) -> np.ndarray:
    """Queries with a 0 appended: the partner of `equal_norm`."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return np.ascontiguousarray(np.hstack([q, np.zeros((len(q), 1), np.float32)]))


def recall_vs_exact(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k (inner product) that `index` also returns, averaged over queries."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    k = min(k, len(vectors))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, want = exact.search(q, k)
    _, got = index.search(q, k)
    hits = sum(len(np.intersect1d(w, g[g >= 0])) for w, g in zip(want, got))
    return hits / (k * len(q))


def describe(spec: IndexSpec) -> dict:
    """{"kind", and the parameters of that kind}: what index.json records and the retrieval step reads."""
    return {"kind": spec.kind, **spec.params()}
