"""In-process retrieve-then-rank with the PyTorch models and exact search.

This is the reference every optimised path (ONNX, INT8, FAISS ANN, Triton ensemble) is compared with. It is
written independently of what it checks: it imports neither `recserve.ranking` nor the served steps.
Its feature helpers (`Tables`, `user_vectors`, `ranker_batch`, `rank`) are shared with training and evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recserve import checkpoint
from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
from recserve.models import Ranker, TwoTower


@dataclass
class UserFeatures:
    """What the user side of both models needs, for a batch of users."""

    user_idx: np.ndarray   # (B,)
    user_cats: np.ndarray  # (B, C)
    history: np.ndarray    # (B, H)


class Tables:
    """Feature tables derived from a Dataset for one "known" period (the splits a model may see)."""

    def __init__(self, ds: Dataset, known: tuple[int, ...], history_len: int):
        self.ds = ds
        self.known = known
        self.history = ds.last_history(*known, length=history_len)   # (U, H)
        self.seen_indptr, self.seen = ds.seen_csr(*known)
        self.item_pop = ds.item_popularity(TRAIN)                        # fixed at training time

    def users(self, user_idx: np.ndarray) -> UserFeatures:
        return UserFeatures(user_idx, self.ds.user_cats[user_idx], self.history[user_idx])

    def seen_of(self, u: int) -> np.ndarray:
        return self.seen[self.seen_indptr[u]:self.seen_indptr[u + 1]]


def known_splits(target: int) -> tuple[int, ...]:
    """Splits a model may see when predicting `target` (VALID or TEST); serving sees everything."""
    return {VALID: (TRAIN,), TEST: (TRAIN, VALID)}.get(target, (TRAIN, VALID, TEST))


@torch.no_grad()
def user_vectors(model: TwoTower, f: UserFeatures, batch: int = 4096) -> np.ndarray:
    out = []
    for s in range(0, len(f.user_idx), batch):
        sl = slice(s, s + batch)
        out.append(model.user_tower(torch.as_tensor(f.user_idx[sl]), torch.as_tensor(f.user_cats[sl]),
                                    torch.as_tensor(f.history[sl])).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.dim), np.float32)


@torch.no_grad()
def item_vectors(model: TwoTower, ds: Dataset, batch: int = 65536) -> np.ndarray:
    out = []
    for s in range(0, ds.n_items, batch):
        idx = torch.arange(s, min(s + batch, ds.n_items))
        out.append(model.item_tower(idx, torch.as_tensor(ds.item_genres[idx.numpy()]),
                                    torch.as_tensor(ds.item_year[idx.numpy()])).numpy())
    return np.concatenate(out)


def ranker_batch(tables: Tables, f: UserFeatures, user_vec: np.ndarray, hour: np.ndarray, weekday: np.ndarray,
                 cand: np.ndarray, item_vecs: np.ndarray, src: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Gather the ranker's inputs for a (B, K) block of candidate item indices; `src` (B, K, S) their source
    scores (`recserve.sources.source_features`; zeros when absent)."""
    ds = tables.ds
    if src is None:
        src = np.zeros((*cand.shape, N_SRC), np.float32)
    return {
        "user_idx": f.user_idx.astype(np.int64), "user_cats": f.user_cats.astype(np.int64),
        "user_vec": user_vec.astype(np.float32), "hour": hour.astype(np.int64), "weekday": weekday.astype(np.int64),
        "cand_idx": cand.astype(np.int64), "cand_genres": ds.item_genres[cand], "cand_year": ds.item_year[cand],
        "cand_pop": tables.item_pop[cand], "cand_vec": item_vecs[cand].astype(np.float32),
        "cand_src": np.asarray(src, np.float32),
    }


RANKER_INPUTS = ("user_idx", "user_cats", "user_vec", "hour", "weekday",
                 "cand_idx", "cand_genres", "cand_year", "cand_pop", "cand_vec", "cand_src")
N_SRC = 3   # len(recserve.sources.SRC_FEATURES): blend, ALS term, neighbour term


@torch.no_grad()
def rank(model: Ranker, batch: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:
    """Ranker scores (B, K) for a batch from `ranker_batch`."""
    n = len(batch["user_idx"])
    out = []
    for s in range(0, n, chunk):
        args = [torch.as_tensor(batch[name][s:s + chunk]) for name in RANKER_INPUTS]
        out.append(model(*args).numpy())
    return np.concatenate(out) if out else np.zeros((0, batch["cand_idx"].shape[1]), np.float32)


def context_of(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hour, weekday) in UTC of unix timestamps; Monday is 0, as in Python's datetime."""
    ts = np.asarray(ts, dtype=np.int64)
    hour = (ts // 3600) % 24
    weekday = ((ts // 86400) + 3) % 7      # 1970-01-01 was a Thursday
    return hour.astype(np.int64), weekday.astype(np.int64)


class Reference:
    """Loads trained artifacts and answers `recommend` exactly as the served ensemble should."""

    def __init__(self, artifacts: Path, target: int | None = None, candidates: int = 500):
        artifacts = Path(artifacts)
        self.ds = Dataset.load(artifacts / "dataset.npz")
        self.two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", self.ds.fingerprint)
        self.ranker, _ = checkpoint.load(artifacts / "ranker.pt", self.ds.fingerprint)
        self.tables = Tables(self.ds, known_splits(target), self.two_tower.cfg.history_len)
        self.item_vecs = item_vectors(self.two_tower, self.ds)
        self.candidates = min(candidates, self.ds.n_items)
        gate = artifacts / "ranker_gate.json"
        # the trained ranker only when `recserve train` shipped it; otherwise the retrieval order is served
        self.use_ranker = json.loads(gate.read_text())["shipped"] if gate.exists() else True

    def retrieve(self, users: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search by inner product over every item the user has not seen: (B, K) item indices, best
        first (ties to the lower index), and which of them are real (False where fewer than K items are unseen)."""
        scores = uv @ self.item_vecs.T
        for r, u in enumerate(users):
            scores[r, self.tables.seen_of(u)] = -np.inf
        cand = np.argsort(-scores, axis=1, kind="stable")[:, :self.candidates]
        return cand, np.isfinite(np.take_along_axis(scores, cand, 1))

    def recommend(self, users: np.ndarray, hour: np.ndarray, weekday: np.ndarray, k: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user, (item indices, ranker scores) of the best k of the K candidates, best first."""
        f = self.tables.users(users)
        uv = user_vectors(self.two_tower, f)
        cand, real = self.retrieve(users, uv)
        if self.use_ranker:
            scores = rank(self.ranker, ranker_batch(self.tables, f, uv, hour, weekday, cand, self.item_vecs))
        else:
            scores = np.einsum("bd,bkd->bk", uv, self.item_vecs[cand])
        out = []
        for r in range(len(users)):
            order = np.argsort(-np.where(real[r], scores[r], -np.inf), kind="stable")[:k]
            order = order[real[r][order]]
            out.append((cand[r][order], scores[r][order]))
        return out
