"""The candidate rule and ranking helpers (recserve/ranking.py), against brute force written here."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.ranking import (
    PAD_ID,
    PAD_SCORE,
    Seen,
    candidates,
    fetch_size,
    overlap_at_k,
    seen_mask,
    top_k,
    unseen_candidates,
)


def _seen(lists: list[list[int]]) -> Seen:
    indptr = np.cumsum([0, *map(len, lists)])
    return Seen(indptr.astype(np.int64), np.array([i for lst in lists for i in lst], np.int64))


def _brute(scores: np.ndarray, users: np.ndarray, lists: list[list[int]], k: int) -> list[list[int]]:
    out = []
    for row, u in zip(scores, users):
        order = sorted((i for i in range(len(row)) if i not in lists[u]), key=lambda i: (-row[i], i))[:k]
        out.append(order + [PAD_ID] * (k - len(order)))
    return out


def test_candidates_are_the_k_best_unseen_items_ties_to_the_lower_index():
    scores = np.array([[0.5, 0.9, 0.9, 0.1, 0.7]], np.float32)
    assert candidates(scores, np.array([0]), _seen([[1]]), 3).tolist() == [[2, 4, 0]]


def test_fewer_unseen_items_than_k_pad_with_pad_id():
    scores = np.arange(4, dtype=np.float32)[None, :]
    assert candidates(scores, np.array([0]), _seen([[3, 1]]), 5).tolist() == [[2, 0, -1, -1, -1]]


def test_over_fetched_search_results_give_the_same_candidates_as_full_scoring():
    rng = np.random.default_rng(3)
    n_items, k = 60, 10
    lists = [sorted(rng.choice(n_items, rng.integers(0, 45), replace=False).tolist()) for _ in range(8)]
    seen, users = _seen(lists), np.arange(8)
    scores = rng.standard_normal((8, n_items)).astype(np.float32)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :fetch_size(users, seen, k, n_items)]   # a search engine
    want = _brute(scores, users, lists, k)
    assert candidates(scores, users, seen, k).tolist() == want
    assert unseen_candidates(ranked, users, seen, k).tolist() == want


def test_fetch_size_covers_the_heaviest_user_in_the_batch_within_the_catalogue():
    seen = _seen([[1, 2, 3], [4]])
    assert fetch_size(np.array([0, 1]), seen, 5, 100) == 8
    assert fetch_size(np.array([1]), seen, 5, 100) == 6
    assert fetch_size(np.array([0]), seen, 5, 6) == 6


def test_seen_mask_flags_seen_items_and_padding_only():
    mask = seen_mask(np.array([[4, -1, 2, 7]]), np.array([1]), _seen([[], [2, 4]]))
    assert mask.tolist() == [[True, True, True, False]]


def test_top_k_never_returns_padding_and_keeps_earlier_positions_on_ties():
    ids, scores = top_k(np.array([[1.0, 5.0, 5.0, 9.0]], np.float32), np.array([[10, 11, 12, -1]]), 4)
    assert ids.tolist() == [[11, 12, 10, PAD_ID]]
    assert scores[0, :3].tolist() == [5.0, 5.0, 1.0] and scores[0, 3] == PAD_SCORE and np.isfinite(scores).all()


@pytest.mark.parametrize("got, want, share", [([[1, 2, 3]], [[3, 2, 9]], 2 / 3), ([[1, -1]], [[1, -1]], 1.0),
                                              ([[5, 6]], [[7, 8]], 0.0)])
def test_overlap_is_the_share_of_the_reference_top_k_kept(got, want, share):
    assert overlap_at_k(np.array(got), np.array(want), 3) == pytest.approx(share)


def test_ties_at_the_kth_place_keep_the_lowest_positions():
    scores = np.array([[0.0, 1.0, 0.0, 0.0, 0.0, 2.0]], np.float32)
    assert candidates(scores, np.array([0]), _seen([[]]), 4).tolist() == [[5, 1, 0, 2]]


def _merge_plainly(scores, retrieval, ids, new, k):
    """The rule written as a merge, one row at a time: other items in ranker order, each new item at its
    retrieval rank when the list reaches it."""
    out_ids, out_scores = [], []
    for s, rt, row, nw in zip(scores, retrieval, ids, new):
        real = [p for p in range(len(row)) if row[p] >= 0]
        by_r = sorted(real, key=lambda p: (-rt[p], p))
        rank = {p: n for n, p in enumerate(by_r)}
        news = [p for p in by_r if nw[p]]
        others = sorted((p for p in real if not nw[p]), key=lambda p: (-s[p], p))
        final, sc, a, b = [], [], 0, 0
        while len(final) < min(k, len(real)):
            if a < len(news) and (rank[news[a]] <= len(final) or b == len(others)):
                p = news[a]
                a += 1
                if not others:                                  # nothing to take a score from: its own
                    sc.append(rt[p])
                else:                                           # the item above's, or the first other's
                    sc.append(sc[-1] if sc else s[others[0]])
            else:
                p = others[b]
                b += 1
                sc.append(s[p])
            final.append(row[p])
        width = min(k, len(row))
        out_ids.append(final + [PAD_ID] * (width - len(final)))
        out_scores.append(sc + [PAD_SCORE] * (width - len(sc)))
    return np.array(out_ids), np.array(out_scores, np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_new_items_keep_their_retrieval_rank_and_the_rest_follow_the_ranker(seed):
    from recserve.ranking import new_item_order

    rng = np.random.default_rng(seed)
    B, K, k = 7, 30, 12
    ids = rng.permutation(1000)[:B * K].reshape(B, K).astype(np.int64)
    ids[0, 25:] = PAD_ID                                        # a short row
    scores = rng.integers(0, 6, (B, K)).astype(np.float32)     # many ties
    retrieval = rng.integers(0, 8, (B, K)).astype(np.float32)
    new = rng.random((B, K)) < [[0.0], [0.1], [0.3], [0.6], [1.0], [0.2], [0.05]]
    got_ids, got_scores = new_item_order(scores, retrieval, ids, new, k)
    want_ids, want_scores = _merge_plainly(scores, retrieval, ids, new, k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_scores, want_scores)
    top = top_k(scores, ids, k)
    np.testing.assert_array_equal(new_item_order(scores, retrieval, ids, np.zeros_like(new), k)[0], top[0])
