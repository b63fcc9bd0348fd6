"""Candidate fan-out: gather each candidate's features for the ranker, as one [B, K, ...] block.

The user side stays [B, ...]; the ranker broadcasts it over K itself, so a request carries K item rows
and one user row instead of K copies of the user.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.triton_models.base import BatchedModel


def candidate_features(cand: np.ndarray, user_idx: np.ndarray, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """cand (B, K) item indices (-1 = padding) -> ranker item inputs and the validity mask."""
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    indptr, seen = tables["seen_indptr"], tables["seen"]
    for r, u in enumerate(user_idx):
        valid[r] &= ~np.isin(safe[r], seen[indptr[u]:indptr[u + 1]])
    return {"cand_idx": safe, "cand_genres": tables["genres"][safe], "cand_year": tables["year"][safe],
            "cand_pop": tables["pop"][safe], "cand_vec": tables["item_vec"][safe], "cand_valid": valid}


class TritonPythonModel(BatchedModel):
    INPUTS = ("user_idx", "candidate_idx")
    OUTPUTS = ("cand_idx", "cand_genres", "cand_year", "cand_pop", "cand_vec", "cand_valid")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        items = np.load(version_dir / "item_features.npz")
        users = np.load(version_dir / "user_features.npz")
        self.tables = {"genres": items["genres"], "year": items["year"], "pop": items["pop"],
                       "item_vec": np.load(version_dir / "item_embeddings.npy"),
                       "seen_indptr": users["seen_indptr"], "seen": users["seen"]}

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return candidate_features(inputs["candidate_idx"], inputs["user_idx"].reshape(-1), self.tables)
