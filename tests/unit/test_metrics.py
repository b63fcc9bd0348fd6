"""Ranking metrics on hand-computed cases, and top-k with each user's known items excluded."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.evaluate import METRICS, ranking_metrics
from recserve.ranking import Seen, candidates

pytestmark = pytest.mark.unit

N_ITEMS = 200
FILLER = 100  # first item of the filler that pads ranked lists
LOG2_3 = np.log2(3.0)


def _row(placed: dict[int, int], width: int = 50) -> np.ndarray:
    """A ranked list of `width` distinct items with `placed` {position: item}; other slots get items 100, 101, ..."""
    filler = iter(range(FILLER, N_ITEMS))
    return np.array([placed[p] if p in placed else next(filler) for p in range(width)])


def test_hand_computed_case():
    top = np.stack([
        _row({0: 3, 14: 50}),    # truth {3, 50}: hit at ranks 1 and 15
        _row({2: 8, 40: 9}),     # truth {8, 9, 10}: hits at ranks 3 and 41, item 10 never retrieved
        _row({}),                # truth {99}: no hit
    ])  # fmt: skip
    truth = [np.array([3, 50]), np.array([8, 9, 10]), np.array([99])]
    got = ranking_metrics(top, truth, N_ITEMS)
    assert list(got) == list(METRICS)
    ndcg_a = 1.0 / (1.0 + 1.0 / LOG2_3)                  # one hit at rank 1; ideal: two hits at ranks 1, 2
    ndcg_b = (1.0 / 2.0) / (1.0 + 1.0 / LOG2_3 + 1.0 / 2.0)  # one hit at rank 3; ideal: three hits
    expected = {
        "recall@10": (1 / 2 + 1 / 3 + 0) / 3,
        "recall@20": (1 + 1 / 3 + 0) / 3,
        "recall@50": (1 + 2 / 3 + 0) / 3,
        "ndcg@10": (ndcg_a + ndcg_b + 0) / 3,
        "hr@10": 2 / 3,
        # top-10s: A = {3, 100..108}, B = {100, 101, 8, 102..108}, C = {100..109}: 3, 8 and 100..109
        "coverage@10": 12 / N_ITEMS,
        "cold_recall@50": None,         # no item was marked cold
    }
    assert got == pytest.approx(expected, abs=1e-5)
    cold = np.zeros(N_ITEMS, bool)
    cold[[9, 10, 99]] = True            # of three cold held-out rows, only item 9 (rank 41) is in a top 50
    assert ranking_metrics(top, truth, N_ITEMS, cold)["cold_recall@50"] == pytest.approx(1 / 3, abs=1e-5)


def test_ndcg_ideal_dcg_is_over_at_most_ten_items():
    truth = np.arange(12)
    perfect = _row({p: p for p in range(12)})
    got = ranking_metrics(perfect[None], [truth], N_ITEMS)
    assert got["ndcg@10"] == 1.0           # 12 held out, 10 hits in the top 10: as good as it gets
    assert got["recall@10"] == pytest.approx(10 / 12, abs=1e-5)
    assert got["recall@20"] == 1.0 and got["hr@10"] == 1.0
    # a single held-out item at rank 2
    got = ranking_metrics(_row({1: 7})[None], [np.array([7])], N_ITEMS)
    assert got["ndcg@10"] == pytest.approx(1.0 / LOG2_3, abs=1e-5)
    assert got["recall@10"] == 1.0 and got["hr@10"] == 1.0


def test_hits_below_rank_ten_count_for_recall_only():
    got = ranking_metrics(_row({10: 5, 49: 6})[None], [np.array([5, 6])], N_ITEMS)
    assert got == pytest.approx({"recall@10": 0.0, "recall@20": 0.5, "recall@50": 1.0, "ndcg@10": 0.0,
                                 "hr@10": 0.0, "coverage@10": 10 / N_ITEMS, "cold_recall@50": None}, abs=1e-5)


def test_coverage_counts_distinct_items_over_all_users():
    same = np.stack([_row({})] * 4)
    assert ranking_metrics(same, [np.array([0])] * 4, N_ITEMS)["coverage@10"] == pytest.approx(10 / N_ITEMS)
    shifted = np.stack([np.roll(np.arange(N_ITEMS), -10 * u)[:50] for u in range(4)])  # disjoint top-10s
    assert ranking_metrics(shifted, [np.array([0])] * 4, N_ITEMS)["coverage@10"] == pytest.approx(40 / N_ITEMS)



def test_catalogue_smaller_than_ten_items():
    got = ranking_metrics(np.array([[3, 1, 0, 2, 4]]), [np.array([1, 4])], 5)
    ndcg = (1 / LOG2_3 + 1 / np.log2(6)) / (1 + 1 / LOG2_3)  # hits at ranks 2 and 5 of a 5-item list
    assert got == pytest.approx({"recall@10": 1.0, "recall@20": 1.0, "recall@50": 1.0, "ndcg@10": ndcg,
                                 "hr@10": 1.0, "coverage@10": 1.0, "cold_recall@50": None}, abs=1e-5)


def _seen(lists: dict[int, list[int]], n_users: int) -> Seen:
    rows = [lists.get(u, []) for u in range(n_users)]
    return Seen(np.cumsum([0, *map(len, rows)]).astype(np.int64), np.array([i for r in rows for i in r], np.int64))


def test_candidates_order_by_score_drop_known_items_and_leave_the_scores_alone():
    scores = np.array([[0.1, 0.9, 0.5, 0.8, 0.3, 0.7],
                       [0.6, 0.2, 0.4, 0.1, 0.9, 0.3]], dtype=np.float32)
    before = scores.copy()
    top = candidates(scores, np.array([7, 3]), _seen({7: [1, 3]}, 8), k=3)
    np.testing.assert_array_equal(top, [[5, 2, 4], [4, 0, 2]])
    np.testing.assert_array_equal(scores, before)  # the caller's scores are not modified


def test_candidates_full_ranking_and_k_beyond_the_catalogue_pads():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((5, 40)).astype(np.float32)
    seen = {u: rng.choice(40, 6, replace=False).tolist() for u in range(5)}
    top = candidates(scores, np.arange(5), _seen(seen, 5), k=34)
    for u in range(5):
        masked = scores[u].copy()
        masked[seen[u]] = -np.inf
        np.testing.assert_array_equal(top[u], np.argsort(-masked, kind="stable")[:34])
        assert not np.isin(top[u], seen[u]).any()
    assert candidates(scores, np.arange(5), _seen({}, 5), k=100).shape == (5, 100)


def test_padding_in_a_list_counts_neither_as_a_hit_nor_as_coverage():
    got = ranking_metrics(np.array([[3, -1, -1]]), [np.array([3])], n_items=10)
    assert got["hr@10"] == 1.0 and got["coverage@10"] == pytest.approx(0.1)
