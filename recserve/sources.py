"""Candidate sources beside the two towers, and the blend that merges them. numpy + scipy, no torch.

A user's K candidates come from four sources, merged by the candidate rule (`recserve.ranking.merge_sources`):

  vectors     one inner-product search over the *blend vector*: [c_tt * user tower vector, c_als * ALS user
              factors, c_pop, c_ctx * user's periods] against [item tower vector, ALS item factors, log
              popularity, log popularity per period], which is exactly the linear blend of the four dense
              scores, so one FAISS index serves them all. The *context* term is "popular and trending in the
              user's time": the view's timeline is cut into CONTEXT_PERIODS periods of equal interaction counts;
              a user's side is the share of their CONTEXT_RECENT newest interactions in each period, an item's
              its log(1 + count) in each, so a user active long ago gets what was popular then, and a user
              active now what is trending now;
  neighbours  item-to-item: the user's RECENT newest items, each with its NEIGHBOURS strongest successors in
              a precomputed table (EASE^R's weights, or item-kNN's above EASE_MAX_ITEMS items); an item's
              score is the sum over the user's recent items (items with a positive score only);
  popularity  the most popular items of the period the view knows;
  new         items the view has no interaction with (added by `recserve items add`, or cold in an evaluation
              view), best by the towers' dot product alone: nothing else can reach them (no ALS factors, no
              neighbours, no popularity).

Each source gets a quota of the K (QUOTA), the rest are the vector search's best; duplicates and seen items are
removed, so every user gets K distinct unseen candidates when the catalogue has them. The retrieval order is
the blend score  c_tt * tower dot + c_als * ALS dot + c_pop * popularity + c_ctx * context + c_nbr * neighbour
score,  whose
weights are chosen on validation (`tune_blend`); the ranker sees SRC_FEATURES of every candidate.

The sources are fitted once per *view* (which interactions are known) by `recserve train`: `valid` (train split:
ranker training, blend tuning), `test` (train + valid: evaluation) and `serve` (everything: the repository), and
written to ARTIFACTS/sources.npz, so that evaluation and the served repository read the same fitted numbers.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recserve.ranking import PAD_ID, Seen, candidates, merge_sources, top_positions, unseen_candidates

TRAIN, VALID, TEST, UPDATE = 0, 1, 2, 3   # as recserve.data.dataset (not imported: the served step stays pandas-free)
VIEWS = {"valid": (TRAIN,), "test": (TRAIN, VALID), "serve": (TRAIN, VALID, TEST, UPDATE)}
TERMS = ("two_tower", "als", "popularity", "neighbours", "context")   # the blend's terms, in this order
SRC_FEATURES = ("blend", "als", "neighbours")                    # the ranker's `cand_src` columns
NEIGHBOURS = 100         # successors kept per item in the neighbour table
RECENT = 50              # the user's newest items the neighbour source starts from
CONTEXT_PERIODS = 8      # the context term's periods: quantiles of the view's interaction times
CONTEXT_RECENT = 10      # a user's newest interactions whose periods make their side of the context term
QUOTA = {"neighbours": 0.2, "popularity": 0.05, "new": 0.02}     # share of K each source may fill first
WEIGHT_GRID = {"two_tower": (0.0, 0.25, 0.5, 1.0), "als": (0.0, 0.25, 0.5, 1.0),
               "popularity": (0.0, 0.1, 0.2), "neighbours": (0.0, 0.25, 0.5, 1.0), "context": (0.0,)}
# the context term is left to the refinement (REFINE_NEW): validation kept it on one set of the nine measured (at
# a tenth of the towers' weight), so doubling the grid for it would halve the grid the budget covers for nothing


@dataclass
class ViewSources:
    """The fitted non-neural sources for one view."""

    als_user: np.ndarray      # (U, F) float32
    als_item: np.ndarray      # (I, F) float32
    nbr: sp.csr_matrix        # (I, I) float32: row j holds item j's NEIGHBOURS strongest successors
    pop: np.ndarray           # (I,) float32 log(1 + count) over the view's interactions
    recent: np.ndarray        # (U, RECENT) int64 newest first, padded with n_items
    ctx_user: np.ndarray | None = None   # (U, P) float32 share of the user's newest interactions per period
    ctx_item: np.ndarray | None = None   # (I, P) float32 log(1 + count) per period; None: P = 0 (older files)

    def __post_init__(self):
        if self.ctx_user is None or self.ctx_item is None:
            self.ctx_user = np.zeros((len(self.als_user), 0), np.float32)
            self.ctx_item = np.zeros((len(self.pop), 0), np.float32)

    @cached_property
    def is_new(self) -> np.ndarray:
        """(I,) bool: items with no interaction in the view (added by `recserve items add`, or cold)."""
        return self.pop == 0

    @cached_property
    def new_items(self) -> np.ndarray:
        """Those items' indices, ascending (computed once, not per request)."""
        return np.flatnonzero(self.is_new)

    @cached_property
    def pop_order(self) -> np.ndarray:
        """Items by popularity, most popular first, ties to the lower index (sorted once, not per request)."""
        return np.argsort(-self.pop, kind="stable")

    def neighbour_rows(self, users: np.ndarray) -> sp.csr_matrix:
        """(B, I) neighbour scores: the sum of the table rows of each user's recent items, indices sorted."""
        rec = self.recent[np.asarray(users, dtype=np.int64).reshape(-1)]
        n = self.nbr.shape[0]
        rows, cols = np.nonzero(rec < n)
        x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, rec[rows, cols])), shape=(len(rec), n))
        out = (x @ self.nbr).tocsr()
        out.sort_indices()
        return out


@dataclass
class Blend:
    """The retrieval order: weights per term already divided by the term's scale (its std on validation)."""

    coef: dict[str, float]

    def query(self, user_vec: np.ndarray, als_user: np.ndarray, ctx_user: np.ndarray) -> np.ndarray:
        """(B, D + F + 1 + P) blend vectors of users, for the inner-product index over `item_matrix`."""
        c = self.coef
        return np.concatenate([c["two_tower"] * user_vec, c["als"] * als_user,
                               np.full((len(user_vec), 1), c["popularity"], np.float32),
                               c.get("context", 0.0) * ctx_user], axis=1).astype(np.float32)

    @staticmethod
    def item_matrix(item_vec: np.ndarray, src: ViewSources) -> np.ndarray:
        """(I, D + F + 1 + P) the items' side of the blend vector."""
        return np.concatenate([item_vec, src.als_item, src.pop[:, None], src.ctx_item], axis=1).astype(np.float32)


# ---- the candidate rule over the sources ----------------------------------------------------------------------

def quotas(k: int) -> tuple[int, int, int]:
    """(neighbours, popularity, new) candidates each may contribute before the vector search fills the rest; the
    new items' quota is at least 1 of any K."""
    return int(k * QUOTA["neighbours"]), int(k * QUOTA["popularity"]), max(1, int(k * QUOTA["new"])) if k else 0


def neighbour_candidates(rows: sp.csr_matrix, users: np.ndarray, seen: Seen, k: int) -> np.ndarray:
    """(B, k) each user's best unseen items by positive neighbour score, best first, ties to the lower index."""
    out = np.full((rows.shape[0], k), PAD_ID, np.int64)
    for r, u in enumerate(np.asarray(users).reshape(-1)):
        lo, hi = rows.indptr[r], rows.indptr[r + 1]
        idx, val = rows.indices[lo:hi].astype(np.int64), rows.data[lo:hi]
        keep = (val > 0) & ~np.isin(idx, seen.of(int(u)))
        idx, val = idx[keep], val[keep]
        if len(idx):
            pos = top_positions(val[None, :], k)[0]
            out[r, :len(pos)] = idx[pos]
    return out


def popular_candidates(src: ViewSources, users: np.ndarray, seen: Seen, k: int) -> np.ndarray:
    """(B, k) the most popular items each user has not seen."""
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    extra = int(seen.count(users).max()) if len(users) else 0
    head = src.pop_order[:k + extra]
    return unseen_candidates(np.broadcast_to(head, (len(users), len(head))), users, seen, k)


def new_candidates(src: ViewSources, user_vec: np.ndarray, item_vec: np.ndarray, users: np.ndarray, seen: Seen,
                   k: int) -> np.ndarray:
    """(B, <= k) the best unseen items the view has no interaction with, by the towers' dot product."""
    new = src.new_items
    if k == 0 or len(new) == 0:
        return np.full((len(user_vec), 0), PAD_ID, np.int64)
    extra = int(seen.count(users).max()) if len(users) else 0
    ranked = new[top_positions(np.asarray(user_vec, np.float32) @ item_vec[new].T, k + extra)]
    return unseen_candidates(ranked, users, seen, k)


def assemble(ann: np.ndarray, nbr_rows: sp.csr_matrix, users: np.ndarray, seen: Seen, src: ViewSources,
             k: int, user_vec: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The K candidates: the neighbour, popularity and new-item quotas first, then the vector search's best
    (`ann`: (B, >= k) unseen ids, best first), without duplicates. `items` is `Blend.item_matrix` (its first
    columns are the item tower's vectors). The same code offline and in the served step."""
    q_nbr, q_pop, q_new = quotas(k)
    tower = items[:, :user_vec.shape[1]]
    return merge_sources([neighbour_candidates(nbr_rows, users, seen, q_nbr),
                          popular_candidates(src, users, seen, q_pop),
                          new_candidates(src, user_vec, tower, users, seen, q_new), ann], k)


def lookup(rows: sp.csr_matrix, cand: np.ndarray) -> np.ndarray:
    """(B, K) the entries of sparse rows (sorted indices) at `cand`; 0 where absent or PAD."""
    out = np.zeros(cand.shape, np.float32)
    for r in range(cand.shape[0]):
        lo, hi = rows.indptr[r], rows.indptr[r + 1]
        if hi == lo:
            continue
        idx = rows.indices[lo:hi]
        pos = np.clip(np.searchsorted(idx, cand[r]), 0, hi - lo - 1)
        hit = (idx[pos] == cand[r]) & (cand[r] >= 0)
        out[r] = np.where(hit, rows.data[lo:hi][pos], 0.0)
    return out


def source_features(blend: Blend, query: np.ndarray, items: np.ndarray, nbr_rows: sp.csr_matrix,
                    als_user: np.ndarray, als_item: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(B, K, len(SRC_FEATURES)) float32 for candidate ids `cand` (PAD rows are 0): the blend score (the
    retrieval order), the weighted ALS term and the weighted neighbour term."""
    safe = np.maximum(cand, 0)
    real = cand >= 0
    nbr = blend.coef["neighbours"] * lookup(nbr_rows, cand)
    total = np.einsum("bd,bkd->bk", query, items[safe]) + nbr
    als = blend.coef["als"] * np.einsum("bf,bkf->bk", als_user, als_item[safe])
    return np.where(real[..., None], np.stack([total, als, nbr], axis=-1), 0.0).astype(np.float32)


# ---- fitting, per view --------------------------------------------------------------------------------------

def _top_per_row(m: np.ndarray | sp.spmatrix, n: int) -> sp.csr_matrix:
    """Keep each row's n largest positive entries (diagonal excluded); a sparse `m` is never densified."""
    from recserve.baselines import top_per_row

    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float32, copy=True)
        m.data[m.indices == np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))] = 0.0
        return top_per_row(m, n)
    rows_out, cols_out, vals_out = [], [], []
    n_rows = m.shape[0]
    for s in range(0, n_rows, 1024):
        block = np.array(m[s:s + 1024], dtype=np.float32)
        block[np.arange(len(block)), np.arange(s, s + len(block))] = 0.0
        k = min(n, block.shape[1])
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        val = np.take_along_axis(block, top, 1)
        keep = val > 0
        rows_out.append(np.broadcast_to(np.arange(s, s + len(block))[:, None], top.shape)[keep])
        cols_out.append(top[keep])
        vals_out.append(val[keep])
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    out = sp.csr_matrix((cat(vals_out, np.float32), (cat(rows_out, np.int64), cat(cols_out, np.int64))),
                        shape=m.shape)
    out.sort_indices()
    return out


def fit_view(ds, view: str, params: dict, seed: int = 0) -> ViewSources:
    """ALS, the neighbour table and popularity on the view's interactions, with the tuned baseline settings.

    params: {"als": ALS kwargs, "ease": {"lam"} or None, "itemknn": ItemKNN kwargs} (from `baselines.tune`).
    """
    from recserve.baselines import ALS, EASE, ItemKNN, ease_refusal, interactions

    X = interactions(ds, *VIEWS[view])
    als = ALS(**params["als"], random_state=seed).fit(X)
    item_has_rows = np.asarray(X.sum(axis=0)).ravel() > 0
    als_item = np.where(item_has_rows[:, None], als.item_factors, 0.0).astype(np.float32)
    if params.get("ease") and ease_refusal(ds.n_items) is None:
        table = _top_per_row(EASE(**params["ease"]).fit(X).B, NEIGHBOURS)
    else:
        table = _top_per_row(ItemKNN(**params["itemknn"]).fit(X).S, NEIGHBOURS)
    counts = np.asarray(X.sum(axis=0)).ravel()
    ctx_user, ctx_item = context_tables(ds, VIEWS[view])
    return ViewSources(als_user=als.user_factors.astype(np.float32), als_item=als_item, nbr=table,
                       pop=np.log1p(counts).astype(np.float32),
                       recent=ds.last_history(*VIEWS[view], length=RECENT), ctx_user=ctx_user, ctx_item=ctx_item)


def context_tables(ds, splits: tuple[int, ...], periods: int = CONTEXT_PERIODS, recent: int = CONTEXT_RECENT
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The context term's two sides over the interactions of `splits`: (U, P) each user's share of their
    `recent` newest interactions in each period, (I, P) each item's log(1 + count) in each period. The periods
    are quantiles of the interaction times (equal counts, so a long quiet stretch is not a period of its own); a
    time on an edge belongs to the later period, and with one timestamp throughout everything is the last one."""
    m = np.isin(ds.split, splits)
    users, items, ts = ds.users[m], ds.items[m], ds.timestamps[m]     # sorted by user, then time
    if len(ts) == 0:
        return np.zeros((ds.n_users, periods), np.float32), np.zeros((ds.n_items, periods), np.float32)
    edges = np.quantile(ts, np.linspace(0.0, 1.0, periods + 1)[1:-1])
    period = np.searchsorted(edges, ts, side="right")
    item = np.bincount(items * periods + period, minlength=ds.n_items * periods).reshape(ds.n_items, periods)
    n_user = np.bincount(users, minlength=ds.n_users)
    ends = np.cumsum(n_user)
    from_end = ends[users] - np.arange(len(users))                 # 1 for a user's newest interaction
    keep = from_end <= recent
    user = np.bincount(users[keep] * periods + period[keep], minlength=ds.n_users * periods).reshape(-1, periods)
    user = user / np.maximum(user.sum(axis=1, keepdims=True), 1)
    return user.astype(np.float32), np.log1p(item).astype(np.float32)


def save_sources(path: Path, views: dict[str, ViewSources]) -> None:
    """Write views into one .npz, each array under "VIEW/name"."""
    arrays = {}
    for name, v in views.items():
        arrays.update({f"{name}/als_user": v.als_user, f"{name}/als_item": v.als_item, f"{name}/pop": v.pop,
                       f"{name}/nbr_indptr": v.nbr.indptr, f"{name}/nbr_indices": v.nbr.indices,
                       f"{name}/nbr_data": v.nbr.data, f"{name}/recent": v.recent.astype(np.int32),
                       f"{name}/ctx_user": v.ctx_user, f"{name}/ctx_item": v.ctx_item})
    np.savez(path, **arrays)


def read_view(path: Path, view: str) -> ViewSources:
    """One view of a file written by `save_sources`."""
    from recserve.errors import ArtifactError

    with np.load(path) as z:
        if f"{view}/pop" not in z:
            raise ArtifactError(f"{path} has no view {view!r}: rerun `recserve train`")
        n = len(z[f"{view}/pop"])
        nbr = sp.csr_matrix((z[f"{view}/nbr_data"], z[f"{view}/nbr_indices"], z[f"{view}/nbr_indptr"]), shape=(n, n))
        ctx = (z[f"{view}/ctx_user"], z[f"{view}/ctx_item"]) if f"{view}/ctx_user" in z else (None, None)
        return ViewSources(als_user=z[f"{view}/als_user"], als_item=z[f"{view}/als_item"], nbr=nbr,
                           pop=z[f"{view}/pop"], recent=z[f"{view}/recent"].astype(np.int64),
                           ctx_user=ctx[0], ctx_item=ctx[1])


def load_view(artifacts: Path, view: str) -> ViewSources:
    """One view of ARTIFACTS/sources.npz (written by `recserve train`)."""
    from recserve.errors import ArtifactError

    path = Path(artifacts) / "sources.npz"
    if not path.exists():
        raise ArtifactError(f"{path} is missing: run `recserve train` (it fits the candidate sources)")
    if view not in VIEWS:
        raise ArtifactError(f"view {view!r} is not known: choose {', '.join(VIEWS)}")
    return read_view(path, view)


def load_blend(artifacts: Path) -> Blend:
    from recserve.errors import ArtifactError

    path = Path(artifacts) / "blend.json"
    if not path.exists():
        raise ArtifactError(f"{path} is missing: run `recserve train` (it tunes the blend on validation)")
    return Blend(json.loads(path.read_text())["coef"])


# ---- the blend, tuned on validation ---------------------------------------------------------------------------

def term_scores(user_vec: np.ndarray, item_vec: np.ndarray, src: ViewSources, users: np.ndarray
                ) -> dict[str, np.ndarray]:
    """Full (B, I) score rows of each blend term, unweighted."""
    users = np.asarray(users, dtype=np.int64)
    return {"two_tower": user_vec @ item_vec.T, "als": src.als_user[users] @ src.als_item.T,
            "popularity": np.broadcast_to(src.pop, (len(users), len(src.pop))),
            "neighbours": src.neighbour_rows(users).toarray(), "context": src.ctx_user[users] @ src.ctx_item.T}


POOL_ITEMS = 20_000      # above this many items, tune_blend ranks a pool per user instead of every item
POOL_PER_TERM = 1000     # ... the union of each term's best POOL_PER_TERM unseen items


def tune_blend(ev, user_vec: np.ndarray, item_vec: np.ndarray, src: ViewSources, budget_seconds: float,
               seed: int = 0) -> tuple[Blend, dict]:
    """Choose the blend weights by validation ndcg@10 (ties: recall@50), full ranking, within a time budget.

    `ev` is the VALID Evaluator and `src` the `valid` view (fitted on train). Each term is first divided by its
    std over the validation users' score rows, so the weights are comparable across data sets. The grid
    (WEIGHT_GRID, all-zero excluded) is tried in a seeded random order, the all-towers point first, until the
    budget's first 2/3 is spent (the budget starts once the score rows are built); the rest refines the best
    point by coordinate ascent (`_refine`). Above POOL_ITEMS items the full rows of
    every term do not fit in memory at once; each setting then ranks each user's pool (`_pools`), which holds
    the blend's top 50 unless an item outside every term's top POOL_PER_TERM beats them all.
    """
    t_rows = time.perf_counter()
    if len(item_vec) > POOL_ITEMS:
        pool, vals, scale = _pools(ev, user_vec, item_vec, src)
        rank_with = lambda w: _pool_metrics(ev, pool, vals, w, scale)   # noqa: E731
        how = f"ndcg@10 on valid (each user's pool: the union of each term's top {POOL_PER_TERM})"
    else:
        rows = term_scores(user_vec, item_vec, src, ev.users)
        scale = {t: float(np.std(rows[t])) or 1.0 for t in TERMS}

        def rank_with(w):
            total = sum(w[t] / scale[t] * rows[t] for t in TERMS if w[t])
            return ev._metrics(lambda u: total[np.searchsorted(ev.users, u)])[0]
        how = "ndcg@10 on valid (full ranking)"
    t0 = time.perf_counter()          # the budget is for trying settings; the score rows are a fixed cost
    grid = [dict(zip(TERMS, w)) for w in itertools.product(*(WEIGHT_GRID[t] for t in TERMS)) if any(w)]
    rng = np.random.default_rng([seed, zlib.crc32(b"blend")])
    first = {t: float(t == "two_tower") for t in TERMS}
    order = [first] + [grid[j] for j in rng.permutation(len(grid)) if grid[j] != first]
    tried, best = [], None
    for w in order:
        if tried and time.perf_counter() - t0 > budget_seconds * (1.0 - REFINE_SHARE):
            break
        m = rank_with(w)
        tried.append({"weights": w, "ndcg@10": m["ndcg@10"], "recall@50": m["recall@50"]})
        key = (m["ndcg@10"], m["recall@50"])
        if best is None or key > best[0]:
            best = (key, w, m)
    grid_best = {"weights": best[1], "ndcg@10": best[2]["ndcg@10"], "recall@50": best[2]["recall@50"]}
    best, refined = _refine(best, rank_with, t0 + budget_seconds)
    _, w, valid = best
    coef = {t: float(w[t] / scale[t]) for t in TERMS}
    info = {"weights": w, "scale": scale, "coef": coef, "valid": valid, "tried": len(tried), "grid_size": len(grid),
            "grid_best": grid_best, "refined": refined,
            "seconds": round(time.perf_counter() - t0, 2), "rows_seconds": round(t0 - t_rows, 2), "metric": how,
            "rule": {"quota": QUOTA, "recent": RECENT, "neighbours": NEIGHBOURS,
                     "context": {"periods": CONTEXT_PERIODS, "recent": CONTEXT_RECENT}}}
    return Blend(coef), info


REFINE_SHARE = 1 / 3          # of the blend budget kept for refining the grid's best point (`_refine`)
REFINE_FACTORS = (0.0, 0.5, 0.7, 1.4, 2.0)   # each weight is tried at these multiples of its value ...
REFINE_NEW = (0.05, 0.1, 0.25, 0.5)   # ... and a zero weight at these shares of the largest weight
REFINE_MIN_GAIN = 0.003       # relative validation ndcg@10 gain a refined point needs (not noise-level moves)


def _refine(best: tuple, rank_with, deadline: float) -> tuple[tuple, list[dict]]:
    """Coordinate ascent from the grid's best point: each weight in turn moved by REFINE_FACTORS (a zero one
    raised to REFINE_NEW of the largest), a move kept when validation ndcg@10 rises by REFINE_MIN_GAIN or more,
    passes repeated until one keeps nothing or the deadline passes. The grid is coarse (3-4 values a weight, so
    ratios between terms of 1:1, 1:2 or 1:4); the refinement reaches the ratios in between."""
    moves = []
    done = {tuple(best[1].values())}
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for t in TERMS:
            (nd, _), w, _ = best
            values = ([w[t] * f for f in REFINE_FACTORS if f != 1.0] if w[t]
                      else [max(w.values()) * f for f in REFINE_NEW])
            for v in values:
                cand = {**w, t: round(float(v), 4)}
                if not any(cand.values()) or tuple(cand.values()) in done or time.perf_counter() >= deadline:
                    continue
                done.add(tuple(cand.values()))
                got = rank_with(cand)
                gain = got["ndcg@10"] >= nd * (1.0 + REFINE_MIN_GAIN) and got["ndcg@10"] > nd
                moves.append({"weights": cand, "ndcg@10": got["ndcg@10"], "recall@50": got["recall@50"],
                              "kept": bool(gain)})
                if gain:
                    best, improved = ((got["ndcg@10"], got["recall@50"]), cand, got), True
                    break
    return best, moves


def _pools(ev, user_vec: np.ndarray, item_vec: np.ndarray, src: ViewSources):
    """Per validation user the union of each term's best POOL_PER_TERM unseen items, ascending ids (PAD last):
    (pool (U, P), the terms' scores there (T, U, P), each term's std over the full score rows)."""
    from recserve.evaluate import batch_for

    n = len(item_vec)
    moments = {t: [0.0, 0.0] for t in TERMS if t != "popularity"}     # sum and sum of squares over full rows
    pools, vals = [], []
    batch = batch_for(n, 256) // 2 or 1                      # two terms' full rows are held at once
    for s in range(0, len(ev.users), batch):
        users = ev.users[s:s + batch]
        rows = term_scores(user_vec[s:s + batch], item_vec, src, users)
        for t in moments:
            r = np.asarray(rows[t], np.float64)
            moments[t][0] += float(r.sum())
            moments[t][1] += float((r * r).sum())
        tops = np.concatenate([candidates(rows[t], users, ev.seen, POOL_PER_TERM) for t in TERMS], axis=1)
        pool = np.sort(np.where(tops < 0, n, tops), axis=1)
        pool[:, 1:][pool[:, 1:] == pool[:, :-1]] = n          # repeats become padding, then sort to the end
        pool = np.sort(pool, axis=1)
        safe = np.minimum(pool, n - 1)
        vals.append(np.stack([src.pop[safe] if t == "popularity" else np.take_along_axis(np.asarray(rows[t]), safe, 1)
                              for t in TERMS]).astype(np.float32))
        pools.append(np.where(pool == n, PAD_ID, pool))
        del rows
    pool, vals = np.concatenate(pools), np.concatenate(vals, axis=1)    # every batch's pool is 4 x POOL_PER_TERM wide
    cells = len(ev.users) * n
    scale = {t: float(np.sqrt(max(q / cells - (m / cells) ** 2, 0.0))) or 1.0 for t, (m, q) in moments.items()}
    scale["popularity"] = float(np.std(src.pop)) or 1.0       # every user's row is the same popularity vector
    scale = {t: scale[t] for t in TERMS}
    return pool, vals, scale


def _pool_metrics(ev, pool: np.ndarray, vals: np.ndarray, w: dict, scale: dict) -> dict:
    from recserve.evaluate import KS, ranking_metrics

    total = sum(w[t] / scale[t] * vals[j] for j, t in enumerate(TERMS) if w[t])
    total = np.where(pool >= 0, total, -np.inf)
    pos = top_positions(total, max(KS))
    top = np.where(np.isneginf(np.take_along_axis(total, pos, 1)), PAD_ID, np.take_along_axis(pool, pos, 1))
    return ranking_metrics(top, ev.truth, ev.ds.n_items, ev.cold)


def offline_candidates(blend: Blend, user_vec: np.ndarray, items: np.ndarray, src: ViewSources,
                       users: np.ndarray, seen: Seen, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The served candidate rule, offline: (cand (B, K), cand_src (B, K, S)). Exact search replaces FAISS.

    `items` is `Blend.item_matrix(item vectors, src)`, built once by the caller (it is the whole catalogue).
    """
    users = np.asarray(users, dtype=np.int64)
    q = blend.query(user_vec, src.als_user[users], src.ctx_user[users])
    nbr_rows = src.neighbour_rows(users)
    k = min(k, len(items))
    cand = assemble(candidates(q @ items.T, users, seen, k), nbr_rows, users, seen, src, k, user_vec, items)
    return cand, source_features(blend, q, items, nbr_rows, src.als_user[users], src.als_item, cand)


__all__ = ["Blend", "QUOTA", "SRC_FEATURES", "TERMS", "VIEWS", "ViewSources", "assemble", "context_tables",
           "fit_view", "load_blend", "load_view", "offline_candidates", "read_view", "save_sources",
           "source_features", "tune_blend"]
