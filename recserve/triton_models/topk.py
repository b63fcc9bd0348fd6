"""Final top-k of the ranker's scores over valid candidates, mapped to raw item ids and titles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.triton_models.base import BatchedModel, RequestError
from recserve.triton_models.retrieval import PAD_SCORE


def top_k(scores: np.ndarray, cand: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One row: (item indices, scores) of the k best valid candidates, best first; ties keep retrieval order."""
    s = np.where(valid, scores, -np.inf)
    order = np.argsort(-s, kind="stable")[:k]
    order = order[valid[order]]
    return cand[order], scores[order]


class TritonPythonModel(BatchedModel):
    INPUTS = ("rank_scores", "candidate_idx", "cand_valid", "k")
    OUTPUTS = ("item_ids", "scores", "titles")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        z = np.load(version_dir / "item_features.npz")
        self.item_ids = z["item_ids"]
        self.titles = np.array([t.encode("utf-8") for t in z["titles"]], dtype=object)
        self.candidates = int(params["candidates"])

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        for k in inputs["k"].reshape(-1):
            if not 1 <= k <= self.candidates:
                raise RequestError(f"k={int(k)} is out of range: choose 1..{self.candidates} "
                                   "(the number of retrieved candidates)")

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs   # the work is per request, in split()

    def split(self, outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        result, row = [], 0
        for n in sizes:
            ids, scores, titles = [], [], []
            for r in range(row, row + n):
                idx, s = top_k(outputs["rank_scores"][r], outputs["candidate_idx"][r], outputs["cand_valid"][r],
                               int(outputs["k"][r].reshape(-1)[0]))
                ids.append(self.item_ids[idx])
                scores.append(s)
                titles.append(self.titles[idx])
            width = max(len(i) for i in ids)   # rows of one request share a width; pad with -1 / "" if short
            result.append({
                "item_ids": np.stack([np.pad(i, (0, width - len(i)), constant_values=-1) for i in ids]),
                "scores": np.stack([np.pad(s, (0, width - len(s)), constant_values=PAD_SCORE) for s in scores]),
                "titles": np.stack([np.concatenate([t, np.array([b""] * (width - len(t)), dtype=object)])
                                    for t in titles]),
            })
            row += n
        return result
