"""FAISS index over the item embeddings, chosen by catalogue size, with its recall measured at build time.

Embeddings are L2-normalised, so every index uses inner product (METRIC_INNER_PRODUCT) = cosine.
- below `EXACT_MAX_ITEMS` items: IndexFlatIP, exact;
- above: IndexIVFFlat with nlist ~ 4 sqrt(N) (or IVF-PQ when asked), nprobe configurable.
Recall@k against exact search is measured on real user vectors and stored with the index.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

EXACT_MAX_ITEMS = 100_000


@dataclass
class IndexSpec:
    kind: str = "auto"         # auto | flat | ivf | ivfpq
    nlist: int = 0             # IVF cells; 0 = 4 * sqrt(N)
    nprobe: int = 0            # cells visited per query; 0 = max(8, nlist // 16)
    pq_m: int = 16             # IVF-PQ sub-quantisers (dim must be divisible)

    def resolved(self, n_items: int) -> IndexSpec:
        kind = self.kind
        if kind == "auto":
            kind = "flat" if n_items < EXACT_MAX_ITEMS else "ivf"
        nlist = self.nlist or max(1, int(4 * math.sqrt(n_items)))
        nlist = min(nlist, n_items)
        nprobe = min(self.nprobe or max(8, nlist // 16), nlist)
        return IndexSpec(kind, nlist if kind != "flat" else 0, nprobe if kind != "flat" else 0, self.pq_m)


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> tuple[faiss.Index, IndexSpec]:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    spec = spec.resolved(n)
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        elif spec.kind == "ivfpq":
            index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"unknown index kind {spec.kind!r}: choose auto, flat, ivf or ivfpq")
        rng = np.random.default_rng(seed)
        train = vectors[rng.choice(n, min(n, 256 * spec.nlist), replace=False)]
        index.train(train)
        index.nprobe = spec.nprobe
    index.add(vectors)
    return index, spec


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
    return {k: v for k, v in asdict(spec).items() if v or k == "kind"}
