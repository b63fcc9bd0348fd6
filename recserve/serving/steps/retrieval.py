"""The request's first step: validate it, user vector, the candidate sources, and the candidate rule.

1. Validate: unknown user, k outside 1..KMAX, hour / weekday out of range get INVALID_ARG naming the value;
   absent `hour` / `weekday` become the current UTC time (Monday = 0), so `curl` users can send a user id and k.
2. Raw user id -> dense index; the user tower graph (`user_tower.onnx`) gathers the user's attributes and
   recent items from its own tables and returns the user vector.
3. One FAISS search per formed batch with the users' blend vectors (towers, ALS, popularity: `recserve.sources`),
   of K + (most items any user in the batch has seen) results, keeping the first K each user has not seen
   (`recserve.ranking.fetch_size` / `unseen_candidates`); then the item-to-item neighbours of the user's recent
   items and the popular items take their quotas and the search fills the rest (`recserve.sources.assemble`,
   the rule training and evaluation use too), and each candidate gets its source scores (`cand_src`).
Refuses to load when the index was built from a different item tower than the one in the repository.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recserve.integrity import sha256_of
from recserve.ranking import Seen, fetch_size, unseen_candidates
from recserve.serving import spec
from recserve.serving.steps.base import BatchedModel, RequestError, log, ort_session
from recserve.sources import Blend, assemble, read_view, source_features


def lookup_users(user_ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Dense index of each raw id in the sorted `known` ids; -1 where unknown."""
    pos = np.clip(np.searchsorted(known, user_ids), 0, len(known) - 1)
    return np.where(known[pos] == user_ids, pos, -1)


def now_context() -> tuple[int, int]:
    """(hour, weekday) of the current UTC time, Monday = 0."""
    t = time.gmtime()
    return t.tm_hour, t.tm_wday


def check_request(inputs: dict[str, np.ndarray], user_ids: np.ndarray, k_max: int,
                  allow_unknown: bool = False) -> None:
    """Raise RequestError naming the first bad value; fills an absent hour / weekday with now (in place).

    `allow_unknown`: an unknown user_id gets user_idx -1 instead of an error (`recommend` answers them)."""
    rows = len(inputs["user_id"])
    if "hour" not in inputs or "weekday" not in inputs:
        hour, weekday = now_context()
        inputs.setdefault("hour", np.full((rows, 1), hour, np.int64))
        inputs.setdefault("weekday", np.full((rows, 1), weekday, np.int64))
    for name, low, high in (("k", 1, k_max), ("hour", 0, 23), ("weekday", 0, 6)):
        v = inputs[name]
        if rows == 1 and v.size == 1:          # the common request: plain ints are ~10x cheaper than array ops
            bad = [] if low <= int(v.flat[0]) <= high else [v.flat[0]]
        else:
            bad = v[(v < low) | (v > high)]
        if len(bad):
            hint = " (the most items one response carries)" if name == "k" else ""
            raise RequestError(f"{name}={int(bad[0])} is out of range: choose {low}..{high}{hint}")
    ids = inputs["user_id"].reshape(-1)
    idx = lookup_users(ids, user_ids)
    if (idx < 0).any() and not allow_unknown:
        raise RequestError(f"unknown user_id {int(ids[idx < 0][0])}: not among the {len(user_ids)} users this "
                           "model was trained on; recommend for a known user (ids as in the data set)")
    inputs["user_idx"] = idx.reshape(-1, 1)


def check_item_tower(meta: dict, version_dir: Path) -> None:
    """The index was built from the item tower of the same version (`retrieval/V` -> `item_tower/V`)."""
    tower = version_dir.parent.parent / "item_tower" / version_dir.name / "model.onnx"
    served = sha256_of(tower) if tower.exists() else "missing"
    if served != meta["item_tower_sha256"]:
        raise RuntimeError(
            f"the FAISS index was built from item tower {meta['item_tower_sha256'][:12]} but the repository "
            f"serves item tower {served[:12]} ({tower}); rebuild both with `recserve export repository`")


def place_index(index, prefer_gpu: bool):
    """Move the index to a GPU when one and GPU FAISS are present; returns (index, (device, resources))."""
    import faiss

    if prefer_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), ("gpu", res)
    return index, ("cpu", None)


class Retriever:
    """The step's work without Triton: the server, the in-process served pipeline and the baseline use it."""

    def __init__(self, version_dir: Path, params: dict[str, str] | None = None):
        import faiss

        params = params or {}
        self.omp_threads = int(params.get("omp_threads", "1"))
        self.serving_thread()
        self.meta = json.loads((version_dir / "index.json").read_text())
        kind, n_shards = self.meta["spec"]["kind"], int(self.meta.get("shards", 1))

        def tuned(index):
            if self.meta["spec"].get("nprobe"):
                faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", self.meta["spec"]["nprobe"]))
            if kind == "hnsw":   # covers the largest search (K + most seen): HNSW returns <= ~efSearch results
                index.hnsw.efSearch = int(params.get("efSearch", self.meta["spec"]["efSearch"]))
            return index

        if n_shards > 1:     # `export repository --shards N`: one IndexShards over the parts, merged by score
            self._shards = [tuned(faiss.read_index(str(version_dir / f"index.{s}.faiss"))) for s in range(n_shards)]
            index = faiss.IndexShards(self._shards[0].d, True, True)       # threaded, successive ids
            index.metric_type = faiss.METRIC_INNER_PRODUCT
            for shard in self._shards:
                index.add_shard(shard)
        else:
            index = tuned(faiss.read_index(str(version_dir / "index.faiss")))
        self.index, (self.device, self._gpu_res) = place_index(   # GPU FAISS cannot clone IndexHNSWFlat: CPU
            index, params.get("device", "auto") != "cpu" and kind != "hnsw" and n_shards == 1)
        with np.load(version_dir / "seen.npz") as z:
            self.seen = Seen(z["indptr"], z["items"])
        with np.load(version_dir / "users.npz") as z:
            self.user_ids = z["user_ids"]
        self.k = int(self.meta["candidates"])
        self.k_max = int(params.get("k_max", self.k))
        self.user_tower = ort_session(version_dir / "user_tower.onnx", int(params.get("intra_op_threads", "1")))
        self.sources = read_view(version_dir / "sources.npz", "view")
        self.blend = Blend(json.loads((version_dir / "blend.json").read_text())["coef"])
        self.items = np.load(version_dir / "blend_items.npy")

    def serving_thread(self) -> None:
        """OpenMP's thread count, for the calling thread (OpenMP keeps it per thread): call it from the thread
        that searches. OpenMP threads spin, and several processes share the cores."""
        if self.omp_threads:
            import faiss

            faiss.omp_set_num_threads(self.omp_threads)

    def _q(self, query: np.ndarray) -> np.ndarray:
        """The index's form of a query: a 0 appended when the items were made equal in norm (index.json)."""
        if not self.meta.get("equal_norm"):
            return query
        return np.hstack([query, np.zeros((len(query), 1), np.float32)])

    def user_vectors(self, user_idx: np.ndarray) -> np.ndarray:
        return self.user_tower.run(["user_vec"], {"user_idx": user_idx.reshape(-1, 1)})[0]

    def candidates(self, user_idx: np.ndarray, user_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cand_idx (B, K), cand_src (B, K, S)) by the candidate rule over all sources."""
        users = user_idx.reshape(-1)
        als_user = self.sources.als_user[users]
        query = self.blend.query(user_vec, als_user, self.sources.ctx_user[users])
        self.last_query_norms = np.linalg.norm(query, axis=1)   # a drift signal (recserve/drift.py)
        _, ids = self.index.search(self._q(query), fetch_size(users, self.seen, self.k, self.index.ntotal))
        nbr_rows = self.sources.neighbour_rows(users)
        cand = assemble(unseen_candidates(ids, users, self.seen, self.k), nbr_rows, users, self.seen,
                        self.sources, self.k, user_vec, self.items)
        self.last_candidates = (cand >= 0).sum(axis=1)          # a metric (recserve_candidates_bucket)
        return cand, source_features(self.blend, query, self.items, nbr_rows, als_user, self.sources.als_item, cand)

    def cold_candidates(self, history: np.ndarray, user_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cand_idx (1, K), cand_src (1, K, S)) for a user the model never saw, from the items of `history`
        (dense indices, newest last) and the user tower's vector of them: the same rule, with no ALS factors."""
        h = np.unique(history)
        seen = Seen(np.array([0, len(h)], np.int64), h.astype(np.int64))
        users = np.zeros(1, np.int64)
        als_user = np.zeros((1, self.sources.als_user.shape[1]), np.float32)
        now = np.zeros((1, self.sources.ctx_user.shape[1]), np.float32)
        now[:, -1:] = 1.0       # the context term of a user active now: what is trending in the newest period
        query = self.blend.query(user_vec, als_user, now)
        _, ids = self.index.search(self._q(query), min(self.index.ntotal, self.k + len(h)))
        recent = np.asarray(history[::-1][:self.sources.recent.shape[1]], np.int64)
        x = sp.csr_matrix((np.ones(len(recent), np.float32), (np.zeros(len(recent), np.int64), recent)),
                          shape=(1, self.sources.nbr.shape[0]))
        nbr_rows = (x @ self.sources.nbr).tocsr()
        nbr_rows.sort_indices()
        cand = assemble(unseen_candidates(ids, users, seen, self.k), nbr_rows, users, seen, self.sources, self.k,
                        user_vec, self.items)
        return cand, source_features(self.blend, query, self.items, nbr_rows, als_user, self.sources.als_item, cand)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Request rows checked by `check_request` (which adds `user_idx`) -> the ranker's inputs."""
        idx = inputs["user_idx"]
        self.last_query_norms = self.last_candidates = None     # this call's, or none when it fails
        vec = self.user_vectors(idx)
        cand, src = self.candidates(idx, vec)
        return {"user_idx": idx, "user_vec": vec, "context_hour": inputs["hour"].reshape(-1, 1),
                "context_weekday": inputs["weekday"].reshape(-1, 1), "cand_idx": cand, "cand_src": src}


class TritonPythonModel(BatchedModel):
    SPEC = spec.step("retrieval")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        self.retriever = Retriever(version_dir, params)
        check_item_tower(self.retriever.meta, version_dir)
        m = self.retriever.meta
        log.warning("retrieval: %s index over %d items on %s, K=%d, recall@%d vs exact %.4f", m["spec"]["kind"],
                    self.retriever.index.ntotal, self.retriever.device, self.retriever.k, m["recall_k"],
                    m["recall_vs_exact"])

    def serving_thread(self) -> None:
        self.retriever.serving_thread()

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        check_request(inputs, self.retriever.user_ids, self.retriever.k_max)

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.retriever(inputs)
