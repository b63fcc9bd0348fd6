"""The candidate sources and their merge: quotas, no seen items, no duplicates, the blend score, brute force."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recserve.ranking import PAD_ID, Seen, merge_sources
from recserve.sources import (
    Blend,
    ViewSources,
    assemble,
    neighbour_candidates,
    new_candidates,
    offline_candidates,
    quotas,
    read_view,
    save_sources,
)

pytestmark = pytest.mark.unit

U, N_ITEMS, D, F = 4, 40, 3, 2


def _view(seed: int = 0) -> ViewSources:
    rng = np.random.default_rng(seed)
    nbr = sp.random(N_ITEMS, N_ITEMS, density=0.2, random_state=seed, format="csr", dtype=np.float32)
    nbr.data -= 0.3                                        # some negative weights: never neighbour candidates
    nbr.sort_indices()
    recent = np.full((U, 3), N_ITEMS, np.int64)
    recent[:, :2] = rng.integers(0, N_ITEMS, (U, 2))
    recent[3] = N_ITEMS                                          # a user with no recent items
    return ViewSources(als_user=rng.normal(size=(U, F)).astype(np.float32),
                       als_item=rng.normal(size=(N_ITEMS, F)).astype(np.float32), nbr=nbr,
                       pop=rng.random(N_ITEMS).astype(np.float32), recent=recent)


def _seen() -> Seen:
    items = [[0, 1, 2], [5], [], list(range(10, 30))]
    return Seen(np.cumsum([0] + [len(x) for x in items]).astype(np.int64),
                np.array([i for x in items for i in x], np.int64))


def test_merge_keeps_first_places_drops_repeats_and_padding():
    got = merge_sources([np.array([[3, PAD_ID, 5]]), np.array([[5, 7]]), np.array([[1, 3, 7, 9, 11]])], 5)
    assert got.tolist() == [[3, 5, 7, 1, 9]]
    assert merge_sources([np.array([[2, 2]]), np.array([[PAD_ID]])], 3).tolist() == [[2, PAD_ID, PAD_ID]]


def test_neighbour_source_offers_only_unseen_items_with_a_positive_score_best_first():
    view, seen = _view(), _seen()
    users = np.arange(U)
    rows = view.neighbour_rows(users)
    dense = rows.toarray()
    got = neighbour_candidates(rows, users, seen, 6)
    for u in users:
        unseen = [i for i in range(N_ITEMS) if i not in set(seen.of(u).tolist()) and dense[u, i] > 0]
        want = sorted(unseen, key=lambda i: (-dense[u, i], i))[:6]
        assert got[u][got[u] >= 0].tolist() == want
    assert (got[3] == PAD_ID).all()                        # no recent items, no neighbours


def test_assembled_candidates_are_k_distinct_unseen_items_with_the_quotas_first():
    view, seen = _view(), _seen()
    users = np.arange(U)
    blend = Blend({"two_tower": 1.0, "als": 0.5, "popularity": 0.2, "neighbours": 2.0})
    rng = np.random.default_rng(1)
    uv, iv = rng.normal(size=(U, D)).astype(np.float32), rng.normal(size=(N_ITEMS, D)).astype(np.float32)
    k = 20
    cand, src = offline_candidates(blend, uv, Blend.item_matrix(iv, view), view, users, seen, k)
    q_nbr, q_pop, q_new = quotas(k)
    assert (q_nbr, q_pop, q_new) == (4, 1, 1)
    nbr_rows = view.neighbour_rows(users)
    first = neighbour_candidates(nbr_rows, users, seen, q_nbr)
    for u in users:
        row = cand[u]
        assert len(set(row.tolist())) == k and (row >= 0).all()
        assert not np.isin(row, seen.of(u)).any()
        nb = first[u][first[u] >= 0]
        assert row[:len(nb)].tolist() == nb.tolist()       # the neighbour quota comes first
        # the blend score: tower dot + ALS + popularity + neighbours, each with its coefficient
        want = (uv[u] @ iv[row].T + 0.5 * view.als_user[u] @ view.als_item[row].T + 0.2 * view.pop[row]
                + 2.0 * nbr_rows.toarray()[u, row])
        np.testing.assert_allclose(src[u, :, 0], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(src[u, :, 2], 2.0 * nbr_rows.toarray()[u, row], rtol=1e-6, atol=1e-6)


def test_search_results_and_full_rows_give_the_same_candidates():
    """The served form (ranked search ids, unseen filter) equals the offline one (full score rows)."""
    from recserve.ranking import unseen_candidates

    view, seen = _view(2), _seen()
    users = np.arange(U)
    blend = Blend({"two_tower": 1.0, "als": 1.0, "popularity": 0.1, "neighbours": 1.0})
    rng = np.random.default_rng(3)
    uv, iv = rng.normal(size=(U, D)).astype(np.float32), rng.normal(size=(N_ITEMS, D)).astype(np.float32)
    items = Blend.item_matrix(iv, view)
    offline, _ = offline_candidates(blend, uv, items, view, users, seen, 15)
    scores = blend.query(uv, view.als_user[users], view.ctx_user[users]) @ items.T
    ranked = np.argsort(-scores, axis=1, kind="stable")               # what an exact index returns
    served = assemble(unseen_candidates(ranked, users, seen, 15), view.neighbour_rows(users), users, seen, view, 15,
                      uv, items)
    assert served.tolist() == offline.tolist()


def test_items_the_view_never_saw_get_their_quota_by_the_tower_dot_product_alone():
    """New items (no ALS factors, no neighbours, popularity 0) reach users even when the blend ignores the towers."""
    view, seen = _view(4), _seen()
    new = np.array([12, 31, 35, 39])                       # user 3 has seen item 12
    view.pop[new] = 0.0
    view.als_item[new] = 0.0
    users = np.arange(U)
    rng = np.random.default_rng(5)
    uv, iv = rng.normal(size=(U, D)).astype(np.float32), rng.normal(size=(N_ITEMS, D)).astype(np.float32)
    k = 100 // 2                                            # 2% of 50: the quota is 1
    assert quotas(k)[2] == 1 and quotas(500)[2] == 10 and quotas(0)[2] == 0
    blend = Blend({"two_tower": 0.0, "als": 1.0, "popularity": 0.0, "neighbours": 0.0})   # ALS only
    cand, _ = offline_candidates(blend, uv, Blend.item_matrix(iv, view), view, users, seen, 8)
    got = new_candidates(view, uv, iv, users, seen, 2)
    for u in users:
        unseen_new = [j for j in new if j not in seen.of(u)]
        want = sorted(unseen_new, key=lambda j: (-float(uv[u] @ iv[j]), j))
        assert got[u].tolist() == want[:2]
        assert want[0] in cand[u].tolist()                  # in the K although ALS scores it 0


def test_blend_tuning_over_pools_gives_the_full_ranking_figures_when_the_pools_hold_every_item(monkeypatch):
    """The pooled path (catalogues above POOL_ITEMS) against full ranking on the same users and settings."""
    from recserve import sources
    from recserve.data import generate
    from recserve.data.dataset import VALID, build_dataset
    from recserve.evaluate import Evaluator

    ds = build_dataset(generate(n_users=200, n_items=150, n_interactions=5000, seed=3))
    view = sources.fit_view(ds, "valid", {"als": {"factors": 8, "regularization": 1.0, "alpha": 1.0,
                                                  "iterations": 3}, "ease": None,
                                          "itemknn": {"neighbours": 20, "shrink": 5.0}})
    rng = np.random.default_rng(0)
    uv = rng.normal(size=(ds.n_users, 4)).astype(np.float32)
    iv = rng.normal(size=(ds.n_items, 4)).astype(np.float32)
    ev = Evaluator(ds, VALID)
    _, full = sources.tune_blend(ev, uv[ev.users], iv, view, budget_seconds=1e9)
    monkeypatch.setattr(sources, "POOL_ITEMS", 0)
    monkeypatch.setattr(sources, "POOL_PER_TERM", ds.n_items)         # every item is in every pool
    _, pooled = sources.tune_blend(ev, uv[ev.users], iv, view, budget_seconds=1e9)
    assert "pool" in pooled["metric"] and "full ranking" in full["metric"]
    assert pooled["tried"] == full["tried"] == full["grid_size"]
    for t in sources.TERMS:
        assert pooled["scale"][t] == pytest.approx(full["scale"][t], rel=1e-4)
    assert pooled["valid"] == full["valid"] and pooled["weights"] == full["weights"]

    monkeypatch.setattr(sources, "POOL_PER_TERM", 10)                 # small pools: the towers-only point still
    _, small = sources.tune_blend(ev, uv[ev.users], iv, view, budget_seconds=0.0)   # holds its own top 10
    assert small["tried"] == 1 and small["valid"]["ndcg@10"] == full_towers_ndcg(ev, uv, iv)


def full_towers_ndcg(ev, uv, iv) -> float:
    return ev._metrics(lambda u: uv[u] @ iv.T)[0]["ndcg@10"]


def test_refinement_moves_a_weight_between_grid_values_and_ignores_noise_level_gains():
    import time

    from recserve import sources

    def rank_with(w):        # validation ndcg@10 peaks where als = 0.7 x two_tower; popularity adds 0.1%
        nd = 0.2 - (w["als"] - 0.7 * w["two_tower"]) ** 2 + 0.0002 * (w["popularity"] > 0)
        return {"ndcg@10": nd, "recall@50": 0.3}

    start = {"two_tower": 1.0, "als": 1.0, "popularity": 0.0, "neighbours": 0.0, "context": 0.0}
    first = ((rank_with(start)["ndcg@10"], 0.3), start, rank_with(start))
    (nd, _), w, _ = sources._refine(first, rank_with, time.perf_counter() + 60)[0]
    assert w["als"] / w["two_tower"] == pytest.approx(0.7, abs=0.03)   # the grid's 1:1 is 0.09 below the peak
    assert w["popularity"] == w["neighbours"] == w["context"] == 0.0     # +0.1% is under REFINE_MIN_GAIN
    assert nd > 0.199
    _, moves = sources._refine(first, rank_with, time.perf_counter())    # no time left: no moves
    assert moves == []


def test_context_term_gives_each_user_what_was_popular_in_their_own_periods():
    from types import SimpleNamespace

    from recserve.sources import context_tables

    # user 0 active early (times 0-3), user 1 late (times 6-9), user 2 only in the split left out; 4 items
    users = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    items = np.array([0, 0, 1, 0, 2, 3, 2, 2, 1])
    ts = np.array([0, 1, 2, 3, 6, 7, 8, 9, 5])
    split = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1])
    ds = SimpleNamespace(users=users, items=items, timestamps=ts, split=split, n_users=3, n_items=4)
    user, item = context_tables(ds, (0,), periods=2, recent=3)
    assert user.shape == (3, 2) and item.shape == (4, 2)
    np.testing.assert_allclose(item, np.log1p([[3, 0], [1, 0], [0, 3], [0, 1]]))   # split at the median time
    np.testing.assert_allclose(user, [[1, 0], [0, 1], [0, 0]])    # the newest 3; no known interaction: zeros
    scores = user @ item.T
    assert scores[0].argmax() == 0 and scores[1].argmax() == 2     # each gets their own period's favourite
    # a time on an edge is in the later period, and with one timestamp throughout everything is the last one
    flat = SimpleNamespace(**{**vars(ds), "timestamps": np.zeros(9, np.int64)})
    user, item = context_tables(flat, (0,), periods=4)
    assert (item[:, :3] == 0).all() and user[:2, 3].tolist() == [1.0, 1.0]
    # the serve path's users: a query of the blend reaches the context term only through its weight
    view = ViewSources(als_user=np.zeros((3, 1), np.float32), als_item=np.zeros((4, 1), np.float32),
                       nbr=sp.csr_matrix((4, 4), dtype=np.float32), pop=np.zeros(4, np.float32),
                       recent=np.full((3, 1), 4), ctx_user=user, ctx_item=item)
    q = Blend({"two_tower": 0.0, "als": 0.0, "popularity": 0.0, "neighbours": 0.0, "context": 2.0}).query(
        np.zeros((3, 2), np.float32), view.als_user, view.ctx_user)
    np.testing.assert_allclose(q @ Blend.item_matrix(np.zeros((4, 2), np.float32), view).T, 2.0 * user @ item.T,
                               rtol=1e-6)


def test_sources_written_before_the_context_term_still_load_without_it(tmp_path):
    view = _view()
    save_sources(tmp_path / "s.npz", {"valid": view})
    with np.load(tmp_path / "s.npz") as z:
        old = {k: z[k] for k in z.files if "ctx_" not in k}
    np.savez(tmp_path / "old.npz", **old)
    got = read_view(tmp_path / "old.npz", "valid")
    assert got.ctx_user.shape == (U, 0) and got.ctx_item.shape == (N_ITEMS, 0)
    blend = Blend({"two_tower": 1.0, "als": 0.5, "popularity": 0.1, "neighbours": 0.0})   # an old blend.json
    assert blend.query(np.ones((2, 3), np.float32), got.als_user[:2], got.ctx_user[:2]).shape == (2, 3 + F + 1)
