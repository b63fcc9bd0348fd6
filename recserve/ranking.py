"""The candidate rule and the ranking helpers, written once, numpy only.

Imported by training (negative mining), offline evaluation, the served `retrieval` step, the FastAPI
baseline and the INT8 / ANN checks. No torch, no Triton. The exact reference (`recserve/reference.py`)
does not import this module: it is what the reference checks.

The candidate rule: a user's K candidates are the K best-scored items the user has not seen, best first,
ties going to the lower item index; when fewer than K unseen items exist the row is padded with PAD_ID.
"Seen" is every interaction the model may know of: train (+ valid) offline, everything in serving.
Offline the rule runs on full score rows (`candidates`); the server runs it on over-fetched search results
(`unseen_candidates`): fetching K + |seen| results guarantees K unseen ones, so both give the same list.
Several sources' candidate lists become the K by `merge_sources` (quotas first, then the vector search;
`recserve.sources.assemble` says which lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

PAD_ID = -1
PAD_SCORE = np.float32(np.finfo(np.float32).min)   # finite, so JSON (HTTP) clients can read it


@dataclass(frozen=True)
class Seen:
    """Each user's known items as CSR: items of user u are `items[indptr[u]:indptr[u + 1]]`."""

    indptr: np.ndarray   # (U + 1,) int64
    items: np.ndarray    # (nnz,) int64

    def of(self, u: int) -> np.ndarray:
        return self.items[self.indptr[u]:self.indptr[u + 1]]

    def count(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        return self.indptr[users + 1] - self.indptr[users]

    @cached_property
    def max_item(self) -> int:
        """The largest item id anyone has seen (-1 if none): computed once, not per request (10M ids at scale)."""
        return int(self.items.max()) if len(self.items) else -1


def seen_mask(ids: np.ndarray, users: np.ndarray, seen: Seen) -> np.ndarray:
    """(B, M) bool: True where `ids[r]` is PAD or an item user `users[r]` has seen."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(ids.shape, bool)
    # one scratch flag per item (the last one for PAD): O(|seen| + M) per row, no sorting
    n = int(max(ids.max(), seen.max_item, 0)) + 2
    flag = np.zeros(n, bool)
    flag[-1] = True
    safe = np.where(ids < 0, n - 1, ids)
    out = np.empty(ids.shape, bool)
    for r, u in enumerate(users):
        known = seen.of(int(u))
        flag[known] = True
        out[r] = flag[safe[r]]
        flag[known] = False
    return out


def mask_seen(scores: np.ndarray, users: np.ndarray, seen: Seen) -> np.ndarray:
    """A copy of full score rows (B, I) with each user's seen items at -inf."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    for r, u in enumerate(users):
        scores[r, seen.of(int(u))] = -np.inf
    return scores


def top_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, min(k, N)) column positions of each row's k best scores, best first, ties to the lower position.

    Ties are honoured at the k-th place too: of the items tied there, the lowest positions are kept.
    """
    scores = np.asarray(scores)
    n = scores.shape[1]
    k = min(k, n)
    if k == 0 or len(scores) == 0:
        return np.zeros((len(scores), k), np.int64)
    if k < n:
        kth = np.partition(scores, n - k, axis=1)[:, n - k:n - k + 1]         # each row's k-th best score
        keep = scores >= kth
        for r in np.flatnonzero(keep.sum(axis=1) > k):                      # ties at the k-th place: rare
            tied = np.flatnonzero(scores[r] == kth[r, 0])
            keep[r, tied[k - int((scores[r] > kth[r, 0]).sum()):]] = False   # the lowest positions stay
        part = np.nonzero(keep)[1].reshape(len(scores), k)                   # ascending positions
    else:
        part = np.tile(np.arange(n), (len(scores), 1))
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1).astype(np.int64)


def candidates(scores: np.ndarray, users: np.ndarray, seen: Seen, k: int) -> np.ndarray:
    """The candidate rule on full score rows (B, I): (B, k) unseen item indices, best first, PAD-padded."""
    masked = mask_seen(scores, users, seen)
    top = top_positions(masked, k)
    top = np.where(np.isneginf(np.take_along_axis(masked, top, 1)), PAD_ID, top)
    return _pad(top, k)


def fetch_size(users: np.ndarray, seen: Seen, k: int, n_items: int) -> int:
    """How many search results to fetch so that every user in the batch keeps k unseen ones."""
    extra = int(seen.count(users).max()) if len(users) else 0
    return min(n_items, k + extra)


def unseen_candidates(ids: np.ndarray, users: np.ndarray, seen: Seen, k: int) -> np.ndarray:
    """The candidate rule on ranked search results (B, M): the first k ids that are neither PAD nor seen."""
    ids = np.asarray(ids, dtype=np.int64)
    drop = seen_mask(ids, users, seen)
    # stable sort on the drop flag moves kept ids to the front in their original order
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(ids, order, 1)
    kept = np.where(np.take_along_axis(drop, order, 1), PAD_ID, kept)
    return _pad(kept, k)


def merge_sources(lists: list[np.ndarray], k: int) -> np.ndarray:
    """(B, k) the first k distinct non-PAD ids of each row of the lists laid end to end, in that order.

    How several sources' candidates (each already unseen, best first) become one set: earlier lists are
    taken first (their quotas), later ones fill up; an id a list repeats is kept once, at its first place.
    """
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists], axis=1)
    if ids.shape[1] == 0:
        return np.full((len(ids), k), PAD_ID, np.int64)
    by_id = np.argsort(ids, axis=1, kind="stable")                  # equal ids: earliest position first
    sorted_ids = np.take_along_axis(ids, by_id, 1)
    repeat = np.zeros(ids.shape, bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    drop = np.empty(ids.shape, bool)
    np.put_along_axis(drop, by_id, repeat, 1)
    drop |= ids < 0
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    kept = np.where(np.take_along_axis(drop, order, 1), PAD_ID, np.take_along_axis(ids, order, 1))
    return _pad(kept, k)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of (B, M) scored ids, best first, ties to the earlier position; PAD ids are never chosen.

    Returns (ids, scores), each (B, min(k, M)), padded with PAD_ID / PAD_SCORE where a row has fewer
    than k real ids.
    """
    ids = np.asarray(ids, dtype=np.int64)
    valid = ids >= 0
    masked = np.where(valid, scores, -np.inf).astype(np.float32)
    pos = top_positions(masked, k)
    keep = np.take_along_axis(valid, pos, 1)
    out_ids = np.where(keep, np.take_along_axis(ids, pos, 1), PAD_ID)
    out_scores = np.where(keep, np.take_along_axis(masked, pos, 1), PAD_SCORE).astype(np.float32)
    return out_ids, out_scores


def new_item_order(scores: np.ndarray, retrieval: np.ndarray, ids: np.ndarray, new: np.ndarray, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Best k of (B, K) candidates `ids` by the ranker's `scores`, except that NEW items keep their place in the
    retrieval order; returns (ids, scores), each (B, min(k, K)), PAD-padded.

    A new item (no interaction in the view: just added, or cold) gives the ranker nothing to judge it by, and a
    ranker learns from history that such items are rarely clicked: it would bury every one. So the list is the
    ranker's order of the other candidates with each new candidate put back at its rank r in the retrieval
    order (`retrieval`: the blend score; ties to the earlier position), as far as the list allows: the j-th new
    item by r goes before the other item of rank q among the others exactly when r - j <= q. A new item's score
    is that of the other item just above it (or just below, when it comes first), so scores stay descending and
    the rules' ties keep this order. Without new candidates this is `top_k(scores, ids, k)`.
    The served ranker graph computes the same order (`recserve/export/graphs.py`, `ranker_graph`).
    """
    ids = np.asarray(ids, dtype=np.int64)
    B, K = ids.shape
    valid = ids >= 0
    new = np.asarray(new, bool) & valid
    if not new.any():
        return top_k(scores, ids, k)
    rows, ranks = np.arange(B)[:, None], np.broadcast_to(np.arange(K), (B, K))
    by_retrieval = top_positions(np.where(valid, retrieval, -np.inf), K)
    r = np.empty((B, K), np.int64)
    r[rows, by_retrieval] = ranks
    new_sorted = np.take_along_axis(new, by_retrieval, 1).astype(np.int64)
    j = np.empty((B, K), np.int64)
    j[rows, by_retrieval] = np.cumsum(new_sorted, axis=1) - new_sorted           # new items before, by r
    other = valid & ~new
    other_scores = np.where(other, scores, -np.inf)
    by_score = top_positions(other_scores, K)
    q = np.empty((B, K), np.int64)
    q[rows, by_score] = ranks
    key = np.where(new, 2 * (r - j) * (K + 1) + j, (2 * q + 1) * (K + 1))
    key = np.where(valid, key, np.iinfo(np.int64).max)
    pos = np.argsort(key, axis=1, kind="stable")[:, :min(k, K)]
    sorted_other = np.take_along_axis(other_scores, by_score, 1)                 # descending
    above = np.clip(r - j - 1, 0, np.maximum(other.sum(axis=1, keepdims=True) - 1, 0))
    new_score = np.where(other.any(axis=1, keepdims=True), np.take_along_axis(sorted_other, above, 1), retrieval)
    final = np.where(new, new_score, scores)
    keep = np.take_along_axis(valid, pos, 1)
    return (np.where(keep, np.take_along_axis(ids, pos, 1), PAD_ID),
            np.where(keep, np.take_along_axis(final, pos, 1), PAD_SCORE).astype(np.float32))


def overlap_at_k(got: np.ndarray, want: np.ndarray, k: int) -> float:
    """Mean over rows of the share of `want`'s top-k (the reference list) that `got`'s top-k also holds.

    PAD ids never count, so a row with fewer than k real items is judged on those it has.
    """
    got, want = np.asarray(got)[:, :k], np.asarray(want)[:, :k]
    shares = [len(np.intersect1d(g[g >= 0], w[w >= 0])) / max(int((w >= 0).sum()), 1) for g, w in zip(got, want)]
    return float(np.mean(shares)) if shares else 1.0


def _pad(ids: np.ndarray, k: int) -> np.ndarray:
    if ids.shape[1] >= k:
        return ids[:, :k]
    return np.concatenate([ids, np.full((len(ids), k - ids.shape[1]), PAD_ID, np.int64)], axis=1)
