"""FAISS search over the item embeddings: one search per formed batch.

Refuses to load when the index was built from a different item tower than the one in the repository.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from recserve.triton_models.base import BatchedModel, log

PAD_SCORE = np.finfo(np.float32).min   # finite, so JSON (HTTP) clients can read it


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mask_padding(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads missing results with id -1; give those the lowest score so nothing ranks them."""
    return ids.astype(np.int64), np.where(ids < 0, PAD_SCORE, scores).astype(np.float32)


def check_item_tower(meta: dict, repository: Path) -> None:
    tower = repository.parent / "item_tower" / "1" / "model.onnx"
    served = sha256_of(tower) if tower.exists() else "missing"
    if served != meta["item_tower_sha256"]:
        raise RuntimeError(
            f"the FAISS index was built from item tower {meta['item_tower_sha256'][:12]} but the repository "
            f"serves item tower {served[:12]} ({tower}); rebuild both with `recserve export repository`")


def place_index(index, prefer_gpu: bool):
    """Move the index to a GPU when one and GPU FAISS are present; returns (index, device description)."""
    import faiss

    if prefer_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), ("gpu", res)
    return index, ("cpu", None)


class TritonPythonModel(BatchedModel):
    INPUTS = ("user_vec",)
    OUTPUTS = ("candidate_idx", "candidate_scores")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        import faiss

        threads = int(params.get("omp_threads", "0"))
        if threads:
            faiss.omp_set_num_threads(threads)   # OpenMP threads spin; several processes share the cores
        meta = json.loads((version_dir / "index.json").read_text())
        check_item_tower(meta, self.repository)
        index = faiss.read_index(str(version_dir / "index.faiss"))
        if meta["spec"].get("nprobe"):
            faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", meta["spec"]["nprobe"]))
        self.index, (self.device, self._gpu_res) = place_index(index, params.get("device", "auto") != "cpu")
        self.k = int(meta["candidates"])
        log.warning("retrieval: %s index over %d items on %s, k=%d, recall@%d vs exact %.4f", meta["spec"]["kind"],
                    index.ntotal, self.device, self.k, meta["recall_k"], meta["recall_vs_exact"])

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores, ids = self.index.search(np.ascontiguousarray(inputs["user_vec"], dtype=np.float32), self.k)
        ids, scores = mask_padding(ids, scores)
        return {"candidate_idx": ids, "candidate_scores": scores}
