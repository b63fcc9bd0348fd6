"""Classic baselines: closed forms against brute force, sparsity limits, and the tuning protocol.

The tuning tests check the protocol itself: the chosen setting is the validation best of what was tried,
the test figures come from a refit on train + valid, a short budget tries fewer settings, and a model that
cannot run on the data is reported as skipped.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from recserve import baselines
from recserve.baselines import ALS, EASE, ItemKNN, Popularity, interactions, tune_and_evaluate
from recserve.data import generate
from recserve.data.dataset import TEST, TRAIN, VALID, build_dataset
from recserve.evaluate import Evaluator

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ds():
    return build_dataset(generate(n_users=300, n_items=240, n_interactions=9000, seed=7))


@pytest.fixture(scope="module")
def tuned(ds):
    return tune_and_evaluate(ds, budget_seconds=600.0, seed=0)


def _binary(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    dense = (np.random.default_rng(seed).random((n_users, n_items)) < density).astype(np.float32)
    return sp.csr_matrix(dense)


def _valid_ndcg(ds, model) -> float:
    return Evaluator(ds, VALID)._metrics(model.fit(interactions(ds, TRAIN)).scores)[0]["ndcg@10"]


# ---- interactions ------------------------------------------------------------------------------------------


def test_interactions_is_binary_and_collapses_repeats(ds):
    m = ds.mask(TRAIN, VALID)
    # repeat some rows: the matrix must not count them twice
    again = np.flatnonzero(m)[:50]
    dup = replace(ds, users=np.r_[ds.users, ds.users[again]], items=np.r_[ds.items, ds.items[again]],
                  timestamps=np.r_[ds.timestamps, ds.timestamps[again]], split=np.r_[ds.split, ds.split[again]])
    X = interactions(dup, TRAIN, VALID)
    expected = np.zeros((ds.n_users, ds.n_items), np.float32)
    expected[ds.users[m], ds.items[m]] = 1.0
    assert X.shape == (ds.n_users, ds.n_items) and X.dtype == np.float32
    assert np.array_equal(X.toarray(), expected)
    assert interactions(ds, TRAIN).nnz == len(np.unique(ds.users[ds.mask(TRAIN)] * ds.n_items
                                                          + ds.items[ds.mask(TRAIN)]))


# ---- EASE --------------------------------------------------------------------------------------------------


def test_ease_matches_per_item_ridge_regression():
    """The closed form equals its definition: each item regressed on all the others, ridge penalty lam."""
    X = _binary(12, 7, 0.4, seed=1)
    lam = 2.0
    B = EASE(lam=lam).fit(X).B
    D = X.toarray().astype(np.float64)
    brute = np.zeros((7, 7))
    for j in range(7):
        others = [i for i in range(7) if i != j]
        A = D[:, others]
        brute[others, j] = np.linalg.solve(A.T @ A + lam * np.eye(6), A.T @ D[:, j])
    assert np.all(np.diag(B) == 0.0)
    np.testing.assert_allclose(B, brute, rtol=1e-4, atol=1e-6)
    model = EASE(lam=lam).fit(X)
    np.testing.assert_allclose(model.scores(np.array([3, 0])), D[[3, 0]] @ brute, rtol=1e-4, atol=1e-6)


def test_ease_refuses_a_catalogue_above_its_limit(monkeypatch):
    monkeypatch.setattr(baselines, "EASE_MAX_ITEMS", 5)
    with pytest.raises(ValueError, match=r"6 items is above EASE_MAX_ITEMS = 5"):
        EASE(lam=1.0).fit(_binary(4, 6, 0.5, seed=0))


def test_every_baseline_beats_popularity_on_planted_data(ds):
    pop = _valid_ndcg(ds, Popularity())
    for model in (EASE(lam=100.0), ItemKNN(neighbours=50, shrink=10.0), ALS(factors=32, regularization=1.0)):
        assert _valid_ndcg(ds, model) > 1.5 * pop, type(model).__name__


def test_a_user_without_rows_gets_the_empty_history_score():
    X = _binary(6, 9, 0.5, seed=3)
    X = sp.csr_matrix(X.multiply(np.arange(6)[:, None] != 2))      # user 2 has no rows
    for model in (EASE(lam=1.0), ItemKNN(neighbours=3), ALS(factors=4, iterations=3)):
        s = model.fit(X).scores(np.array([2, 0]))
        assert s.shape == (2, 9) and s.dtype == np.float32
        assert np.all(s[0] == 0.0), type(model).__name__
    pop = Popularity().fit(X).scores(np.array([2, 0]))
    assert np.array_equal(pop[0], pop[1])
    np.testing.assert_allclose(pop[0], np.log1p(X.toarray().sum(0)), rtol=1e-6)


# ---- item-kNN ----------------------------------------------------------------------------------------------


def test_itemknn_keeps_the_top_neighbours_of_each_item(monkeypatch):
    X = _binary(40, 30, 0.3, seed=5)
    k, shrink = 4, 3.0
    monkeypatch.setattr(baselines, "KNN_BLOCK_CELLS", 40)   # several blocks of items, of uneven sizes
    S = ItemKNN(neighbours=k, shrink=shrink).fit(X).S.toarray()
    D = X.toarray()
    norms = np.sqrt(D.sum(0))
    full = (D.T @ D) / (norms[:, None] * norms[None, :] + shrink)
    np.fill_diagonal(full, 0.0)
    assert np.all(np.diag(S) == 0.0)
    assert np.all((S != 0).sum(axis=0) <= k)
    for j in range(30):
        kept = S[:, j] != 0
        np.testing.assert_allclose(S[kept, j], full[kept, j], rtol=1e-5)
        # nothing dropped is more similar than what was kept
        assert full[~kept, j].max(initial=0.0) <= S[kept, j].min(initial=np.inf) + 1e-6
    np.testing.assert_allclose(ItemKNN(neighbours=k, shrink=shrink).fit(X).scores(np.array([1])), D[[1]] @ S,
                               rtol=1e-5)


def test_top_per_row_keeps_each_rows_best_positive_entries_with_ties_to_the_lower_column():
    rng = np.random.default_rng(3)
    D = np.round(rng.normal(size=(25, 40)), 1) * (rng.random((25, 40)) < 0.4)   # ties, negatives, empty cells
    D[4] = 0.0
    k = 3
    got = baselines.top_per_row(sp.csr_matrix(D), k).toarray()
    for r in range(len(D)):
        cols = [c for c in np.lexsort((np.arange(40), -D[r])) if D[r, c] > 0][:k]
        want = np.zeros(40)
        want[cols] = D[r, cols]
        np.testing.assert_array_equal(got[r], want.astype(np.float32))


# ---- ALS ---------------------------------------------------------------------------------------------------


def test_als_scores_rank_a_users_training_items_high(ds):
    X = interactions(ds, TRAIN)
    users = np.arange(0, ds.n_users, 7)
    s = ALS(factors=32, regularization=1.0, alpha=2.0).fit(X).scores(users)
    assert s.shape == (len(users), ds.n_items) and s.dtype == np.float32
    # AUC of each user's training items against the rest of the catalogue
    aucs = []
    for row, u in zip(s, users):
        own = X[u].indices
        ranks = np.argsort(np.argsort(-row))
        others = ds.n_items - len(own)
        aucs.append(1.0 - (ranks[own].sum() - len(own) * (len(own) - 1) / 2) / (len(own) * others))
    assert np.mean(aucs) > 0.9


def test_als_is_reproducible_for_a_seed(ds):
    X = interactions(ds, TRAIN)
    a = ALS(factors=8, iterations=3, random_state=1).fit(X).scores(np.arange(5))
    b = ALS(factors=8, iterations=3, random_state=1).fit(X).scores(np.arange(5))
    assert np.array_equal(a, b)


# ---- tuning ------------------------------------------------------------------------------------------------


def test_tuning_picks_the_validation_best_and_tries_the_whole_grid(tuned):
    grids = {name: grid for name, (_, grid, _) in baselines.baselines().items()}
    assert set(tuned) == set(grids)
    for name, r in tuned.items():
        assert r["tried"] == len(r["grid"])
        if name not in baselines.WALKED:
            assert r["tried"] == len(grids[name])
        best = max(g["ndcg@10"] for g in r["grid"])
        assert r["valid"]["ndcg@10"] == best
        assert r["params"] in [g["params"] for g in r["grid"] if g["ndcg@10"] == best]
        assert r["test_time_data"] == "refit on train+valid" and r["seconds"] >= 0
    assert tuned["ease"]["test"]["ndcg@10"] > tuned["popularity"]["test"]["ndcg@10"]


def test_test_figures_come_from_a_refit_on_train_and_valid(ds, tuned, monkeypatch):
    seen_nnz = []
    fit = EASE.fit
    monkeypatch.setattr(EASE, "fit", lambda self, X: (seen_nnz.append(X.nnz), fit(self, X))[1])
    r = tune_and_evaluate(ds, budget_seconds=600.0, seed=0, models=["ease"])["ease"]
    train, train_valid = interactions(ds, TRAIN).nnz, interactions(ds, TRAIN, VALID).nnz
    assert seen_nnz == [train] * r["tried"] + [train_valid]
    refit = EASE(**r["params"]).fit(interactions(ds, TRAIN, VALID))
    assert r["test"] == Evaluator(ds, TEST)._metrics(refit.scores)[0] == tuned["ease"]["test"]


def test_a_tiny_budget_tries_one_seeded_setting_per_model(ds):
    r = tune_and_evaluate(ds, budget_seconds=0.0, seed=0, models=["ease", "itemknn"])
    assert [r[m]["tried"] for m in ("ease", "itemknn")] == [1, 1]
    assert all("test" in r[m] for m in r)
    firsts = {str(tune_and_evaluate(ds, 0.0, seed=s, models=["itemknn"])["itemknn"]["params"]) for s in range(6)}
    assert len(firsts) > 1      # the one setting is a seeded random pick, not always the grid's first
    lams = sorted(g["lam"] for g in baselines.EASE_GRID)
    assert r["ease"]["params"]["lam"] == lams[len(lams) // 2]    # EASE's walk starts in the middle of its ladder


def test_eases_walk_ends_on_a_lambda_both_of_whose_neighbours_score_lower(tuned):
    lams = sorted(g["lam"] for g in baselines.EASE_GRID)
    scores = {g["params"]["lam"]: (g["ndcg@10"], g["recall@50"]) for g in tuned["ease"]["grid"]}
    best = tuned["ease"]["params"]["lam"]
    j = lams.index(best)
    neighbours = [lams[n] for n in (j - 1, j + 1) if 0 <= n < len(lams)]
    assert all(n in scores and scores[n] <= scores[best] for n in neighbours)
    assert tuned["ease"]["tried"] < len(lams)       # a walk, not the whole ladder


def test_a_walk_climbs_past_the_middle_to_the_better_end_and_stops():
    score = {v: -abs(v - 5000) for v in (2, 20, 200, 2000, 5000, 10000)}     # best at 5000
    propose = baselines.walk(list(score), "lam")
    tried = []
    while (p := propose(tried)) is not None:
        tried.append({"params": p, "ndcg@10": score[p["lam"]], "recall@50": 0.0})
    assert [t["params"]["lam"] for t in tried] == [2000, 5000, 10000]
    assert baselines.walk([1, 2, 3], "k")([]) == {"k": 2}


def test_ease_is_reported_skipped_above_its_limit(ds, monkeypatch):
    monkeypatch.setattr(baselines, "EASE_MAX_ITEMS", ds.n_items - 1)
    r = tune_and_evaluate(ds, budget_seconds=0.0, models=["popularity", "ease"])
    assert set(r["ease"]) == {"skipped"} and f"{ds.n_items} items" in r["ease"]["skipped"]
    assert "test" in r["popularity"]


def test_unknown_baseline_names_are_refused(ds):
    with pytest.raises(ValueError, match="unknown baselines"):
        tune_and_evaluate(ds, models=["ease", "svd"])


def test_the_cli_and_train_config_share_one_default_search_budget():
    import inspect

    from recserve import cli
    from recserve.train import DEFAULT_BUDGET_MINUTES, TrainConfig, search_budget

    default = inspect.signature(cli.train).parameters["budget_minutes"].default.default
    config = TrainConfig()
    assert default == DEFAULT_BUDGET_MINUTES
    assert search_budget(default) == {"baselines_budget": config.baselines_budget, "blend_budget": config.blend_budget}
