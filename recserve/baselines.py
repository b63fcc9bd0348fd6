"""Classic collaborative-filtering baselines (popularity, EASE, item-kNN, ALS), tuned on validation.

Why: the neural models in `recserve.train` only mean something next to well-tuned classic baselines that see the
same data. Every baseline here is fitted on a binary user x item matrix, tuned by validation ndcg@10 (fitted on
TRAIN, scored on VALID), then refitted with the chosen setting on TRAIN + VALID and scored on TEST, which is what
the neural models' test rows know about a user too. Scoring goes through `Evaluator._metrics`, so the candidate
rule (known items excluded, full ranking) and the metrics are the project's own.

Each model has `fit(X)` on a `scipy.sparse.csr_matrix` and `scores(users) -> (len(users), n_items) float32` for
rows of the X it was fitted on. No torch here; ALS comes from the `implicit` package (CPU build).
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
from recserve.evaluate import Evaluator

EASE_MAX_ITEMS = 30_000   # B is a dense I x I float64 matrix: 30k items is already ~7 GB
ALS_ITERATIONS = 15
KNN_BLOCK_CELLS = 50_000_000   # co-occurrence entries per block of item-kNN's similarity (bounds its memory)
TUNE_METRIC = "ndcg@10"

TIE_BREAK = "recall@50"     # ranking_metrics rounds to 5 decimals, so equal ndcg@10 happens (ML-100K EASE 50/100)

# The grids. Each model's grid is tried in a seeded random order, so a short budget tries a random subset (EASE's
# is walked, below).
# They were widened where the validation optimum on ML-100K sat on an edge of a first, narrower grid
# (ALS: regularization 1 was the largest and alpha 1 the smallest tried; item-kNN: 200 neighbours the most).
# EASE's one setting is tuned by a walk, not a random order (`walk`): on 9k items one fit costs ~12 s, so a budget
# that tries two or three random lambdas may miss the optimum by far. It starts in the middle of the ladder and
# climbs to a lambda both of whose neighbours are worse; the ladder reaches past 20-2000, where the optimum of a
# sparse cut of ML-100K sat on the edge (2000).
EASE_GRID = [{"lam": lam} for lam in (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)]
WALKED = {"ease": "lam"}     # baselines tuned by `walk` over their grid's one parameter
ALS_GRID = [
    {"factors": f, "regularization": r, "alpha": a, "iterations": ALS_ITERATIONS}
    for f, r, a in itertools.product((32, 64, 128), (0.1, 1.0, 10.0), (1.0, 2.0, 5.0))
]
KNN_GRID = [
    {"neighbours": k, "shrink": s} for k, s in itertools.product((20, 50, 100, 200, 400), (0.0, 10.0, 50.0, 100.0))
]


def interactions(ds: Dataset, *splits: int) -> sp.csr_matrix:
    """Binary user x item matrix of the given splits (repeated interactions collapse to 1).

    Args:
        ds: The dataset.
        *splits: Any of TRAIN, VALID, TEST.

    Returns:
        float32 CSR matrix of shape (ds.n_users, ds.n_items), sorted indices, every stored value 1.
    """
    indptr, items = ds.seen_csr(*splits)   # already de-duplicated and sorted per user
    return sp.csr_matrix((np.ones(len(items), np.float32), items, indptr), shape=(ds.n_users, ds.n_items))


def _rows(X: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    return X[np.asarray(users, dtype=np.int64)]


class Popularity:
    """log(1 + count) of each item in the fitted matrix, the same for every user: the floor to beat."""

    def fit(self, X: sp.csr_matrix) -> Popularity:
        self.item_scores = np.log1p(np.asarray(X.sum(axis=0)).ravel()).astype(np.float32)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.item_scores, (len(users), 1))


def ease_refusal(n_items: int) -> str | None:
    """Why EASE cannot run on `n_items` items, or None when it can."""
    if n_items <= EASE_MAX_ITEMS:
        return None
    return (f"EASE needs a dense {n_items} x {n_items} item-item matrix; {n_items} items is above "
            f"EASE_MAX_ITEMS = {EASE_MAX_ITEMS}")


class EASE:
    """Embarrassingly shallow autoencoder (Steck, 2019): a closed-form item-item regression.

    G = X^T X + lam I, P = G^-1, B = -P / diag(P) column-wise, diag(B) = 0; scores = X_u B.
    """

    def __init__(self, lam: float = 500.0):
        self.lam = lam

    def fit(self, X: sp.csr_matrix) -> EASE:
        """Solve for B.

        Raises:
            ValueError: X has more than EASE_MAX_ITEMS items (B is dense I x I).
        """
        reason = ease_refusal(X.shape[1])
        if reason:
            raise ValueError(reason)
        # float64 for the inverse: G's diagonal (item counts) and off-diagonal spread over orders of magnitude.
        # scipy's LU inverse (getrf + getri), in place: half the time of numpy's solve against the identity
        # (9k items: 11 s, not 22 s, on 2 cores) and the same matrix to 1e-15.
        G = (X.T @ X).toarray().astype(np.float64)
        G[np.diag_indices_from(G)] += self.lam
        P = scipy.linalg.inv(G, overwrite_a=True, check_finite=False)
        del G
        P /= -np.diag(P).copy()        # divides column j by -P_jj
        P[np.diag_indices_from(P)] = 0.0
        self.B = P.astype(np.float32)
        self.X = X
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(_rows(self.X, users) @ self.B, dtype=np.float32)


class ItemKNN:
    """Item-item cosine similarity with shrinkage, sparsified to each item's `neighbours` most similar items.

    S_ij = |users(i) & users(j)| / (||i|| ||j|| + shrink), S_jj = 0, then only the `neighbours` largest
    entries of each column j are kept; scores = X_u S (item j is scored by the user's items among its neighbours).
    Shrinkage damps similarities resting on few co-occurrences, which cosine alone rates as highly as strong ones.
    """

    def __init__(self, neighbours: int = 100, shrink: float = 10.0):
        self.neighbours = neighbours
        self.shrink = shrink

    def fit(self, X: sp.csr_matrix) -> ItemKNN:
        """Sparse throughout, so it runs on a million items: the co-occurrences of a block of items are a sparse
        product, and each item keeps its `neighbours` best by `top_per_row` (the similarity is symmetric, so an
        item's row is its column)."""
        n = X.shape[1]
        X = sp.csr_matrix(X, dtype=np.float32)
        Xt = X.T.tocsr()
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=0)).ravel())
        k = min(self.neighbours, n - 1)
        # entries of item j's co-occurrence row are at most the summed history lengths of j's users
        cum = np.cumsum(Xt @ np.diff(X.indptr).astype(np.float64))
        parts = []
        start = 0
        while k > 0 and start < n:
            done = cum[start - 1] if start else 0.0
            stop = min(n, max(start + 1, int(np.searchsorted(cum, done + KNN_BLOCK_CELLS, side="right"))))
            sim = (Xt[start:stop] @ X).tocsr()                                  # (block, I) co-occurrence counts
            rows = np.repeat(np.arange(start, stop), np.diff(sim.indptr))
            sim.data /= norms[rows] * norms[sim.indices] + self.shrink + 1e-9
            sim.data[sim.indices == rows] = 0.0
            parts.append(top_per_row(sim, k))
            start = stop
        top = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((n, n), dtype=np.float32)
        self.S = sp.csr_matrix(top.T, dtype=np.float32)         # column j holds item j's neighbours
        self.S.sort_indices()
        self.X = X
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (_rows(self.X, users) @ self.S).toarray().astype(np.float32, copy=False)


def top_per_row(m: sp.spmatrix, k: int) -> sp.csr_matrix:
    """Each row's k largest positive entries of a sparse matrix, nothing densified; ties to the lower column.

    Sorting all stored entries by (row, -value) puts row r's entries at indptr[r]:indptr[r+1], best first,
    so an entry's rank in its row is its position minus indptr[r].
    """
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((-m.data, rows))                       # stable: equal values stay in column order
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[(rank < k) & (m.data[order] > 0)]
    out = sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape, dtype=np.float32)
    out.sort_indices()
    return out


class ALS:
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky, 2008) by alternating least squares.

    Fitted with `implicit` on alpha * X, so an observed interaction has confidence alpha and a missing one
    is a weak zero; scores = user_factors @ item_factors^T.
    """

    def __init__(self, factors: int = 64, regularization: float = 0.1, alpha: float = 1.0,
                 iterations: int = ALS_ITERATIONS, random_state: int = 0):
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        # implicit parallelises over users itself; a BLAS thread pool on top of it only oversubscribes the cores
        # (its constructor checks for one and warns, so it is built inside the limit too)
        confidence = sp.csr_matrix(X * np.float32(self.alpha), dtype=np.float32)   # a new matrix: X is left alone
        confidence.eliminate_zeros()       # a stored zero is no interaction, to implicit as to the test below
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=1.0,   # alpha is applied above
                iterations=self.iterations, calculate_training_loss=False,
                num_threads=min(2, os.cpu_count() or 1), random_state=self.random_state,
            )
            model.fit(confidence, show_progress=False)
        self.user_factors = np.array(model.user_factors, dtype=np.float32)
        self.item_factors = np.array(model.item_factors, dtype=np.float32)
        # a user with no rows keeps whatever the solver left of its random start: give it the empty-history score
        self.user_factors[np.diff(confidence.indptr) == 0] = 0.0
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[np.asarray(users, dtype=np.int64)] @ self.item_factors.T


Model = Popularity | EASE | ItemKNN | ALS


def baselines(seed: int = 0) -> dict[str, tuple[Callable[..., Model], list[dict], Callable[[int], str | None]]]:
    """The tuned baselines: name -> (factory taking a grid point's params, grid, refusal by item count).

    Args:
        seed: ALS's random state.
    """
    def always(n_items: int) -> None:
        return None

    return {
        "popularity": (Popularity, [{}], always),
        "itemknn": (ItemKNN, KNN_GRID, always),
        "als": (partial(ALS, random_state=seed), ALS_GRID, always),
        # last: each model gets an equal share of what is left, and on a large catalogue ALS finishes its grid
        # early (9k items: 27 settings in 15 s) while one EASE fit costs ~12 s, so EASE's walk gets the rest
        "ease": (EASE, EASE_GRID, ease_refusal),
    }


def tune_and_evaluate(ds: Dataset, budget_seconds: float = 120.0, seed: int = 0,
                      models: Sequence[str] | None = None) -> dict[str, dict]:
    """Tune each baseline on validation, refit the best setting on train + valid, evaluate it on test.

    Each setting is fitted on TRAIN and scored on VALID (known items: TRAIN); the best by validation ndcg@10
    (on a tie the higher validation recall@50, then the first tried) is refitted on TRAIN + VALID and scored on
    TEST (known items: TRAIN + VALID). The budget is split evenly across the models; time a model leaves unused
    is shared among the ones after it. A model starts another setting only while its time so far plus two mean
    setting costs (that setting and the final refit) fit its share; it always tries at least one.

    Args:
        ds: The dataset (TRAIN / VALID / TEST split).
        budget_seconds: Wall-clock budget for the tuning of all models together.
        seed: Seeds the order each grid is tried in (a short budget tries a random subset; EASE's lambda is
            walked from the middle of its ladder instead, `walk`) and ALS.
        models: Names to run (default all of `baselines()`, in that order).

    Returns:
        name -> {"params", "valid" (metrics of the chosen setting), "test" (metrics after the refit),
        "test_time_data": "refit on train+valid", "tried", "seconds",
        "grid": [{"params", "ndcg@10", "recall@50"}, ...] in the order tried}, or name -> {"skipped": reason}
        for a model that cannot run on this data (EASE above EASE_MAX_ITEMS items).

    Raises:
        ValueError: A name in `models` is not a known baseline.
    """
    tuned = tune(ds, budget_seconds, seed, models)
    return {name: (row if "skipped" in row else {**row, **refit_test(ds, name, row["params"], seed)})
            for name, row in tuned.items()}


def tune(ds: Dataset, budget_seconds: float = 120.0, seed: int = 0,
         models: Sequence[str] | None = None, max_users: int | None = None) -> dict[str, dict]:
    """The validation half of `tune_and_evaluate`: name -> {"params", "valid", "tried", "seconds", "grid"}
    (or {"skipped": reason}). `recserve train` runs it; `recserve evaluate` then calls `refit_test`.
    `max_users`: validation users scored per setting (`Evaluator`'s; None: all)."""
    registry = baselines(seed)
    names = list(models) if models is not None else list(registry)
    unknown = sorted(set(names) - set(registry))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {sorted(registry)}")
    train = interactions(ds, TRAIN)
    valid_ev = Evaluator(ds, VALID, max_users=max_users, seed=seed)
    start = time.perf_counter()
    out = {}
    for i, name in enumerate(names):
        factory, grid, refusal = registry[name]
        share = max(0.0, budget_seconds - (time.perf_counter() - start)) / (len(names) - i)
        reason = refusal(ds.n_items)
        if reason:
            out[name] = {"skipped": reason}
            continue
        if name in WALKED:
            propose = walk([p[WALKED[name]] for p in grid], WALKED[name])
        else:   # seeded per model, so that a model's order does not depend on which others run
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            order = [grid[j] for j in rng.permutation(len(grid))]
            propose = lambda tried, order=order: order[len(tried)] if len(tried) < len(order) else None  # noqa: E731
        out[name] = _tune_one(factory, propose, share, train, valid_ev)
    return out


def refit_test(ds: Dataset, name: str, params: dict, seed: int = 0, max_users: int | None = None) -> dict:
    """Refit one tuned baseline on TRAIN + VALID and score it on TEST: {"test", "test_time_data"}.
    `max_users`: as `Evaluator`'s (`recserve evaluate` passes its own, so every row scores the same users)."""
    factory = baselines(seed)[name][0]
    model = factory(**params).fit(interactions(ds, TRAIN, VALID))
    test = Evaluator(ds, TEST, max_users=max_users)._metrics(model.scores)[0]
    return {"test": test, "test_time_data": "refit on train+valid"}


def walk(values: Sequence[float], key: str) -> Callable[[list[dict]], dict | None]:
    """Hill climbing over one ordered parameter: the first proposal is the middle value, each next one an untried
    neighbour (the larger first) of the best so far; None once the best's neighbours are both tried (a local
    optimum of the validation score) or the ladder's end is reached."""
    ladder = sorted(values)

    def propose(tried: list[dict]) -> dict | None:
        if not tried:
            return {key: ladder[len(ladder) // 2]}
        done = {t["params"][key] for t in tried}
        best = max(tried, key=lambda t: (t[TUNE_METRIC], t[TIE_BREAK]))["params"][key]
        j = ladder.index(best)
        for n in (j + 1, j - 1):
            if 0 <= n < len(ladder) and ladder[n] not in done:
                return {key: ladder[n]}
        return None

    return propose


def _tune_one(factory: Callable[..., Model], propose: Callable[[list[dict]], dict | None], share: float,
              train: sp.csr_matrix, valid_ev: Evaluator) -> dict:
    """Fit and score the settings `propose` gives (it sees what was tried so far) until it gives None or the
    next one would not finish within `share` seconds (by the mean time of those tried; the first always runs)."""
    t0 = time.perf_counter()
    tried, best = [], None
    while (params := propose(tried)) is not None:
        spent = time.perf_counter() - t0
        if tried and spent + spent / len(tried) > share:
            break
        metrics = valid_ev._metrics(factory(**params).fit(train).scores)[0]
        tried.append({"params": params, TUNE_METRIC: metrics[TUNE_METRIC], TIE_BREAK: metrics[TIE_BREAK]})
        key = (metrics[TUNE_METRIC], metrics[TIE_BREAK])
        if best is None or key > best[0]:
            best = (key, params, metrics)
    _, params, valid = best
    return {"params": params, "valid": valid, "tried": len(tried), "seconds": round(time.perf_counter() - t0, 2),
            "grid": tried}


__all__ = [
    "ALS", "EASE", "EASE_MAX_ITEMS", "ItemKNN", "Popularity", "baselines", "ease_refusal", "interactions",
    "refit_test", "top_per_row", "tune", "tune_and_evaluate",
]
