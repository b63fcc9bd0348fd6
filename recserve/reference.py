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
    """Loads trained artifacts and answers `recommend` exactly as the served ensemble should.

    The candidate rule is written here a second time, plainly (dense score rows, one user at a time), from the
    fitted numbers in ARTIFACTS/sources.npz and blend.json; it does not call `recserve.sources` or
    `recserve.ranking`, which it checks.
    """

    VIEW = {None: "serve", TEST: "test", VALID: "valid"}

    def __init__(self, artifacts: Path, target: int | None = None, candidates: int = 500):
        artifacts = Path(artifacts)
        self.ds = Dataset.load(artifacts / "dataset.npz")
        self.two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", self.ds.fingerprint)
        self.ranker, _ = checkpoint.load(artifacts / "ranker.pt", self.ds.fingerprint)
        known = known_splits(target)
        self.tables = Tables(self.ds, known, self.two_tower.cfg.history_len)
        self.item_vecs = item_vectors(self.two_tower, self.ds)
        self.candidates = min(candidates, self.ds.n_items)
        gate = artifacts / "ranker_gate.json"
        # the trained ranker only when `recserve train` shipped it; otherwise the retrieval order is served
        self.use_ranker = json.loads(gate.read_text())["shipped"] if gate.exists() else True
        blend = json.loads((artifacts / "blend.json").read_text())
        self.coef, rule = blend["coef"], blend["rule"]
        q = rule["quota"]
        self.quota = (int(self.candidates * q["neighbours"]), int(self.candidates * q["popularity"]),
                      max(1, int(self.candidates * q["new"])) if "new" in q else 0)
        v = self.VIEW.get(target, "serve")
        with np.load(artifacts / "sources.npz") as z:
            self.als_user, self.als_item, self.pop = z[f"{v}/als_user"], z[f"{v}/als_item"], z[f"{v}/pop"]
            # the context term: users' shares of their newest interactions per period, items' log counts per period
            self.ctx_user, self.ctx_item = ((z[f"{v}/ctx_user"], z[f"{v}/ctx_item"]) if f"{v}/ctx_user" in z
                                            else (np.zeros((len(self.als_user), 0)), np.zeros((len(self.pop), 0))))
            n = self.ds.n_items
            self.nbr = np.zeros((n, n), np.float64)
            indptr, indices, data = z[f"{v}/nbr_indptr"], z[f"{v}/nbr_indices"], z[f"{v}/nbr_data"]
            for j in range(n):
                self.nbr[j, indices[indptr[j]:indptr[j + 1]]] = data[indptr[j]:indptr[j + 1]]
        self.recent = self.ds.last_history(*known, length=rule["recent"])

    def retrieve(self, users: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, K) candidate item indices, which are real (False where fewer than K items are unseen), and their
        (B, K, 3) source scores: the neighbour, popularity and new-item quotas first, then the best of the vector blend,
        each over the items the user has not seen, no item twice."""
        c = self.coef
        vec = (c["two_tower"] * (uv @ self.item_vecs.T) + c["als"] * (self.als_user[users] @ self.als_item.T)
               + c["popularity"] * self.pop[None, :] + c.get("context", 0.0) * (self.ctx_user[users] @ self.ctx_item.T))
        n = self.ds.n_items
        cand = np.zeros((len(users), self.candidates), np.int64)
        real = np.zeros(cand.shape, bool)
        src = np.zeros((*cand.shape, N_SRC), np.float32)
        for r, u in enumerate(users):
            nbr = self.nbr[[i for i in self.recent[u] if i < n]].sum(axis=0)
            unseen = np.setdiff1d(np.arange(n), self.tables.seen_of(u))
            def by(score: np.ndarray, unseen: np.ndarray = unseen) -> list[int]:
                return sorted(unseen.tolist(), key=lambda j: (-score[j], j))
            picked: list[int] = []
            # items the view has no interaction with, by the towers' dot product alone
            dot = np.where(self.pop == 0, uv[r] @ self.item_vecs.T, -np.inf)
            new = [i for i in by(dot)[:self.quota[2]] if self.pop[i] == 0]
            for pool, quota in ((by(nbr)[:self.quota[0]], self.quota[0]), (by(self.pop)[:self.quota[1]], None),
                                (new, None), (by(vec[r]), None)):
                if quota is not None:     # the neighbour source offers items with a positive score only
                    pool = [i for i in pool if nbr[i] > 0]
                for i in pool:
                    if len(picked) < self.candidates and i not in picked:
                        picked.append(i)
            cand[r, :len(picked)], real[r, :len(picked)] = picked, True
            als = c["als"] * (self.als_user[u] @ self.als_item[picked].T)
            src[r, :len(picked)] = np.stack([vec[r, picked] + c["neighbours"] * nbr[picked], als,
                                             c["neighbours"] * nbr[picked]], axis=-1)
        return cand, real, src

    def recommend(self, users: np.ndarray, hour: np.ndarray, weekday: np.ndarray, k: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user, (item indices, ranker scores) of the best k of the K candidates, best first; an item with no
        interaction in the view keeps its rank in the retrieval order (the score of the item above it)."""
        f = self.tables.users(users)
        uv = user_vectors(self.two_tower, f)
        cand, real, src = self.retrieve(users, uv)
        if self.use_ranker:
            scores = rank(self.ranker, ranker_batch(self.tables, f, uv, hour, weekday, cand, self.item_vecs, src))
        else:
            scores = src[..., 0]
        out = []
        for r in range(len(users)):
            order = np.argsort(-np.where(real[r], scores[r], -np.inf), kind="stable")
            order = order[real[r][order]]
            if self.use_ranker:      # an item with no interaction in the view keeps its retrieval rank
                by_blend = sorted(order.tolist(), key=lambda p, r=r: (-src[r, p, 0], p))
                rank_of = {p: n for n, p in enumerate(by_blend)}
                new = [p for p in by_blend if self.pop[cand[r, p]] == 0]
                others = [p for p in order.tolist() if self.pop[cand[r, p]] != 0]
                merged, sc = [], []
                while len(merged) < len(order):
                    if new and (rank_of[new[0]] <= len(merged) or not others):
                        p = new.pop(0)
                        sc.append(sc[-1] if sc else scores[r, others[0]] if others else src[r, p, 0])
                    else:
                        p = others.pop(0)
                        sc.append(scores[r, p])
                    merged.append(p)
                order = np.array(merged[:k], np.int64)
                out.append((cand[r][order], np.array(sc[:k], np.float32)))
                continue
            order = order[:k]
            out.append((cand[r][order], scores[r][order]))
        return out
