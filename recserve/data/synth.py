"""Synthetic interaction logs with planted structure, and a writer for the ML-1M file format.

The model behind the data, which a good recommender should recover:

* every item has a primary category (sometimes a secondary one); its latent vector is the category centroid plus
  noise, and its popularity follows a Zipf law over a random ranking of the items;
* every user prefers 1-3 categories; their latent vector mixes those centroids, plus noise;
* a user picks items without replacement with probability proportional to ``exp(u.v / tau + bias)``;
* ratings grow with the affinity ``u.v``; each user is active around a preferred hour of the day, which follows
  their dominant category, and their gender, age and occupation lean on it too;
* with ``drift`` > 0 the clock means something: every item has a release moment, uniform over the timeline, users
  stay active for longer (a median of two years), and at each moment a user leans towards what was released
  around then: the logit gets ``-drift * |now - release|`` (as shares of the timeline; ``now`` is the mean time
  of each quarter of the user's interactions). A user's newest interactions then follow the clock rather than
  their own past, as on a MovieLens set that spans decades. Without it, times carry no signal beyond the hour.

Small problems are sampled exactly. Large ones (1M items, 10M interactions) draw, per user, a candidate pool from
the preferred categories by popularity (plus some exploration of the whole catalogue) and keep the Gumbel-top-n
of the pool; users whose pool turns out too small are sampled exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recserve.data.movielens import AGE_BUCKETS, NO_GENRES, year_from_title
from recserve.data.raw import RawData
from recserve.errors import DataError

TAU = 0.2  # temperature of the affinity term: lower means users stick harder to their categories
ZIPF_EXPONENT = 0.8  # popularity weight of the item ranked r is r ** -ZIPF_EXPONENT
POPULARITY_ALPHA = 1.0  # item bias = POPULARITY_ALPHA * log(Zipf weight)
ITEM_NOISE = 0.5  # norm of the noise added to a category centroid
USER_NOISE = 0.5
SECONDARY_SHARE = 0.35  # share of items with a second category
SECONDARY_WEIGHT = 0.3  # how much the second category pulls an item's vector
MIN_PER_USER = 5
COUNT_SIGMA = 0.9  # spread of the log interaction count per user
N_OCCUPATIONS = 21  # ML-1M's occupation codes 0-20

_EXACT_LIMIT = 1 << 25  # users * items up to which every user is sampled over the whole catalogue
_SCORE_BLOCK = 1 << 22  # cells of the score matrix held at once in exact sampling
_POOL_BLOCK = 1 << 22  # candidates held at once in pool sampling
_SCORE_SPAN = 4096  # pool scores are clipped to +-_SCORE_SPAN / 2 so that user * span - score sorts right
_START = 852076800  # 1997-01-01 UTC
_END = 1072915199  # 2003-12-31 23:59:59 UTC
_DAY = 86400
DRIFT_PHASES = 4  # with drift, each quarter of a user's interactions leans towards what was released around then
DRIFT_SPAN = 730 * _DAY  # ... and users' median activity span is two years (120 days without drift)


@dataclass
class SynthTruth:
    """The hidden variables behind a synthetic data set (0-based indices; ids are index + 1)."""

    item_category: np.ndarray  # (n_items,) primary category
    item_vectors: np.ndarray  # (n_items, dim)
    item_bias: np.ndarray  # (n_items,)
    user_categories: np.ndarray  # (n_users, 3) preferred categories, dominant first, -1 where unused
    user_weights: np.ndarray  # (n_users, 3) their mixture weights, 0 where unused
    user_vectors: np.ndarray  # (n_users, dim)
    preferred_hour: np.ndarray  # (n_users,) hour of day in [0, 24)
    category_names: list[str]
    user_era: np.ndarray | None = None  # (n_users,) in [0, 1): where activity starts, as a share of the timeline
    item_release: np.ndarray | None = None  # (n_items,) in [0, 1); both None without drift
    drift: float = 0.0


def generate(
    n_users: int, n_items: int, n_interactions: int, n_categories: int = 18, dim: int = 16, seed: int = 0,
    drift: float = 0.0,
) -> RawData:
    """Make a synthetic data set with planted structure; the same arguments give identical data.

    Args:
        n_users: Number of users; each gets at least 5 interactions.
        n_items: Number of items (at least 10).
        n_interactions: Target total; the result is within a few percent of it.
        n_categories: Number of item categories (genres named ``cat00``, ``cat01``, ...).
        dim: Dimension of the latent vectors.
        seed: Random seed.
        drift: Strength of the pull towards items released around the time of each interaction (0: none; 8
            makes an item released a quarter of the timeline away 2 nats less likely). Only for sizes sampled
            exactly.

    Returns:
        RawData with source ``"synth"``; ratings are integers 1-5 as float32, timestamps fall in 1997-2003,
        items have ``title`` "Item 17 (1994)", and users have age (ML-1M age code), gender and occupation as str.

    Raises:
        DataError: The sizes are inconsistent (e.g. fewer than 5 interactions per user).
    """
    return generate_with_truth(n_users, n_items, n_interactions, n_categories, dim, seed, drift)[0]


def generate_with_truth(
    n_users: int, n_items: int, n_interactions: int, n_categories: int = 18, dim: int = 16, seed: int = 0,
    drift: float = 0.0,
) -> tuple[RawData, SynthTruth]:
    """Like :func:`generate`, also returning the hidden variables (for tests and quality checks)."""
    counts_cap = _validate(n_users, n_items, n_interactions, n_categories, dim)
    if not (math.isfinite(drift) and drift >= 0):
        raise DataError(f"drift must be a finite number >= 0, got {drift}")
    if drift and n_users * n_items > _EXACT_LIMIT:
        raise DataError(f"drift needs exact sampling: users x items at most {_EXACT_LIMIT:,} "
                        f"(got {n_users * n_items:,}); use fewer users or items, or drift 0")
    # One independent stream per stage, so that changing one stage leaves the others' draws alone (the ninth,
    # for drift, is new: SeedSequence children do not depend on how many are spawned, so drift 0 is unchanged).
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(9)]
    truth, item_secondary = _make_latents(n_users, n_items, n_categories, dim, streams[0])
    if drift:
        truth.user_era, truth.item_release, truth.drift = streams[8].random(n_users), streams[8].random(n_items), drift
    counts = _interaction_counts(n_users, n_interactions, counts_cap, streams[1])
    if drift:   # times first (they never depend on the items), then items that follow them
        users = np.repeat(np.arange(n_users), counts)
        timestamps = _timestamps(users, counts, truth.preferred_hour, streams[4], truth.user_era, DRIFT_SPAN)
        items, affinity = _sample_drift(truth, counts, timestamps, streams[2])
        order = np.arange(len(users))       # already in time order, shuffled within each quarter
    else:
        users, items, affinity = _sample_interactions(truth, counts, streams[2])
        timestamps = _timestamps(users, counts, truth.preferred_hour, streams[4])
        # Shuffle items within each user (users are sorted), so that no order of selection leaks into time order.
        order = np.argsort(users + streams[5].random(len(users)))
    ratings = _ratings_from_affinity(affinity, streams[3])
    frame = pd.DataFrame({
        "user_id": users.astype(np.int64) + 1,
        "item_id": items[order].astype(np.int64) + 1,
        "rating": ratings[order],
        "timestamp": timestamps,
    })  # fmt: skip
    raw = RawData(
        ratings=frame,
        items=_items_frame(truth, item_secondary, streams[6]),
        users=_users_frame(truth, n_categories, streams[7]),
        source="synth",
    )
    return raw, truth


# ---------------------------------------------------------------------------------------------------------------
# Latent structure


def _validate(n_users: int, n_items: int, n_interactions: int, n_categories: int, dim: int) -> int:
    """Check the sizes; return the most interactions one user may have."""
    if n_users < 1 or n_items < 10 or n_categories < 1 or dim < 2:
        raise DataError(f"synthetic data needs n_users >= 1, n_items >= 10, n_categories >= 1 and dim >= 2; got "
                        f"n_users={n_users}, n_items={n_items}, n_categories={n_categories}, dim={dim}.")
    if n_categories > n_items:
        raise DataError(f"n_categories={n_categories} exceeds n_items={n_items}; use at most one category per item.")
    cap = max(MIN_PER_USER, n_items // 2)  # nobody consumes more than half the catalogue
    if not MIN_PER_USER * n_users <= n_interactions <= cap * n_users:
        raise DataError(f"n_interactions={n_interactions} must lie between {MIN_PER_USER} and {cap} per user "
                        f"({MIN_PER_USER * n_users}..{cap * n_users} for {n_users} users and {n_items} items).")
    return cap


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _make_latents(
    n_users: int, n_items: int, n_categories: int, dim: int, rng: np.random.Generator
) -> tuple[SynthTruth, np.ndarray]:
    """Draw centroids, items and users. Returns (truth, each item's secondary category or -1)."""
    centroids = _unit_rows(rng.normal(size=(n_categories, dim)))
    # Uneven category sizes, like real genres; every category keeps at least one item.
    share = rng.dirichlet(np.full(n_categories, 2.0))
    primary = np.concatenate([np.arange(n_categories), rng.choice(n_categories, n_items - n_categories, p=share)])
    primary = rng.permutation(primary)
    # A different category via a non-zero offset; with a single category there is none.
    offset = rng.integers(1, max(n_categories, 2), size=n_items)
    secondary = np.where(rng.random(n_items) < SECONDARY_SHARE, (primary + offset) % n_categories, -1)
    secondary[secondary == primary] = -1
    item_vectors = centroids[primary] + rng.normal(scale=ITEM_NOISE / math.sqrt(dim), size=(n_items, dim))
    has_second = secondary >= 0
    item_vectors[has_second] += SECONDARY_WEIGHT * centroids[secondary[has_second]]
    ranks = rng.permutation(n_items) + 1
    item_bias = POPULARITY_ALPHA * (-ZIPF_EXPONENT * np.log(ranks))

    category_share = np.bincount(primary, minlength=n_categories) / n_items
    user_categories, user_weights = _user_preferences(n_users, category_share, rng)
    # Unused preference slots have weight 0, so whatever centroid they point at drops out.
    user_vectors = np.einsum("uk,ukd->ud", user_weights, centroids[np.maximum(user_categories, 0)])
    user_vectors += rng.normal(scale=USER_NOISE / math.sqrt(dim), size=(n_users, dim))
    # The preferred hour follows the dominant category, so hour of day carries a little signal.
    hour = (user_categories[:, 0] * 24.0 / n_categories + rng.normal(scale=3.0, size=n_users)) % 24.0
    truth = SynthTruth(
        item_category=primary, item_vectors=item_vectors.astype(np.float32), item_bias=item_bias.astype(np.float32),
        user_categories=user_categories, user_weights=user_weights, user_vectors=user_vectors.astype(np.float32),
        preferred_hour=hour, category_names=_category_names(n_categories),
    )  # fmt: skip
    return truth, secondary


def _user_preferences(
    n_users: int, category_share: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """1-3 preferred categories per user (bigger categories are preferred more often), dominant first."""
    n_categories = len(category_share)
    n_pref = np.minimum(rng.choice([1, 2, 3], size=n_users, p=[0.4, 0.4, 0.2]), n_categories)
    # Weighted sampling without replacement: the k smallest of Exp(1)/share (Efraimidis-Spirakis).
    keys = rng.exponential(size=(n_users, n_categories)) / category_share
    ranked = np.argsort(keys, axis=1)[:, :3] if n_categories >= 3 else np.argsort(keys, axis=1)
    cats = np.full((n_users, 3), -1, dtype=np.int64)
    cats[:, : ranked.shape[1]] = ranked
    used = np.arange(3)[None, :] < n_pref[:, None]
    cats[~used] = -1
    weights = np.where(used, rng.dirichlet(np.full(3, 1.5), size=n_users), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    order = np.argsort(-weights, axis=1)  # dominant category first
    return np.take_along_axis(cats, order, axis=1), np.take_along_axis(weights, order, axis=1)


def _category_names(n_categories: int) -> list[str]:
    width = max(2, len(str(n_categories - 1)))
    return [f"cat{c:0{width}d}" for c in range(n_categories)]


def _interaction_counts(n_users: int, n_interactions: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal-ish counts per user, clipped to [5, cap], scaled so they sum to about n_interactions."""
    raw = rng.lognormal(sigma=COUNT_SIGMA, size=n_users)

    def total(scale: float) -> int:
        return int(np.clip(np.rint(raw * scale), MIN_PER_USER, cap).sum())

    low, high = 0.0, float(cap) / raw.min()
    for _ in range(60):  # bisection on the scale; the sum is monotone in it
        mid = (low + high) / 2
        low, high = (mid, high) if total(mid) < n_interactions else (low, mid)
    return np.clip(np.rint(raw * high), MIN_PER_USER, cap).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Sampling items: exact for small problems, candidate pools for large ones


def _sample_interactions(
    truth: SynthTruth, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick counts[u] distinct items per user. Returns (user, item, affinity) sorted by user."""
    if len(counts) * len(truth.item_bias) <= _EXACT_LIMIT:
        return _sample_exact(truth, np.arange(len(counts)), counts, rng)
    users, items, affinity, short = _sample_pools(truth, counts, rng)
    if len(short):
        extra = _sample_exact(truth, short, counts, rng)
        keep = ~np.isin(users, short)
        users, items, affinity = (np.concatenate([a[keep], b]) for a, b in zip((users, items, affinity), extra))
        order = np.argsort(users, kind="stable")
        users, items, affinity = users[order], items[order], affinity[order]
    return users, items, affinity


def _gumbel(rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
    return -np.log(-np.log(rng.random(shape, dtype=np.float32) * np.float32(1 - 1e-7) + np.float32(1e-7)))


def _sample_exact(
    truth: SynthTruth, user_ids: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gumbel-top-n over the whole catalogue: exact sampling without replacement from exp(u.v/tau + bias)."""
    n_items = len(truth.item_bias)
    rows = max(1, _SCORE_BLOCK // n_items)
    parts = []
    for start in range(0, len(user_ids), rows):
        block = user_ids[start : start + rows]
        affinity = truth.user_vectors[block] @ truth.item_vectors.T
        scores = affinity / TAU + truth.item_bias + _gumbel(rng, affinity.shape)
        need = counts[block]
        k = int(need.max())
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # k <= n_items // 2 by _validate
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
        keep = np.arange(k)[None, :] < need[:, None]
        rows_of = np.broadcast_to(np.arange(len(block))[:, None], top.shape)[keep]
        items = top[keep]
        parts.append((block[rows_of], items, affinity[rows_of, items]))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _sample_drift(
    truth: SynthTruth, counts: np.ndarray, timestamps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Items for rows already in time order (sorted by user, then time): each quarter of a user's rows is a
    Gumbel-top-n from exp(u.v/tau + bias - drift * |now - release|) over the items not picked before, `now` the
    quarter's mean time as a share of the timeline, in random order within the quarter. Returns (item, affinity)."""
    n_users, n_items = len(counts), len(truth.item_bias)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    phase = (np.arange(len(timestamps)) - np.repeat(first, counts)) * DRIFT_PHASES // np.repeat(counts, counts)
    share = (timestamps - _START) / (_END - _START)
    items = np.empty(len(timestamps), np.int64)
    rows = max(1, _SCORE_BLOCK // n_items)
    for start in range(0, n_users, rows):
        block = np.arange(start, min(start + rows, n_users))
        affinity = truth.user_vectors[block] @ truth.item_vectors.T
        base = affinity / TAU + truth.item_bias
        picked = np.zeros(affinity.shape, bool)
        for p in range(DRIFT_PHASES):
            at = [np.flatnonzero(phase[first[u]:first[u] + counts[u]] == p) + first[u] for u in block]
            need = np.array([len(a) for a in at])
            if need.max() == 0:
                continue
            now = np.array([share[a].mean() if len(a) else 0.0 for a in at])
            scores = base - truth.drift * np.abs(now[:, None] - truth.item_release[None, :])
            scores = np.where(picked, -np.inf, scores + _gumbel(rng, scores.shape))
            k = int(need.max())
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            for r, a in enumerate(at):
                chosen = rng.permutation(top[r][np.argsort(-scores[r, top[r]])][:len(a)])
                items[a] = chosen
                picked[r, chosen] = True
    affinity = np.einsum("nd,nd->n", truth.user_vectors[np.repeat(np.arange(n_users), counts)],
                         truth.item_vectors[items])
    return items, affinity


def _sample_pools(
    truth: SynthTruth, counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gumbel-top-n over per-user candidate pools. Returns (user, item, affinity, users left short)."""
    sampler = _PopularitySampler(truth.item_category, truth.item_bias)
    log_mix = _category_log_mixture(truth, sampler)
    pool_sizes = 3 * counts + 32  # enough distinct candidates unless a user's categories are tiny
    ends = np.cumsum(pool_sizes)
    parts, short = [], []
    start = 0
    while start < len(counts):
        # Blocks of users whose pools hold about _POOL_BLOCK candidates together (at least one user).
        budget = (ends[start - 1] if start else 0) + _POOL_BLOCK
        stop = max(start + 1, int(np.searchsorted(ends, budget, side="right")))
        block = np.arange(start, stop)
        users, items, affinity, block_short = _sample_pool_block(truth, block, counts, pool_sizes, log_mix,
                                                                 sampler, rng)
        parts.append((users, items, affinity))
        short.append(block_short)
        start = stop
    users, items, affinity = (np.concatenate(p) for p in zip(*parts))
    return users, items, affinity, np.concatenate(short)


class _PopularitySampler:
    """Draw items of a given category with probability proportional to popularity exp(bias)."""

    def __init__(self, item_category: np.ndarray, item_bias: np.ndarray):
        n_categories = int(item_category.max()) + 1
        self.order = np.argsort(item_category, kind="stable")  # items grouped by category
        weight = np.exp(item_bias[self.order].astype(np.float64))
        self.cumulative = np.cumsum(weight)
        bounds = np.searchsorted(item_category[self.order], np.arange(n_categories + 1))
        self.first, self.last = bounds[:-1], bounds[1:] - 1
        self.low = np.concatenate([[0.0], self.cumulative])[self.first]
        self.mass = self.cumulative[self.last] - self.low  # popularity mass of each category

    def draw(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        target = self.low[categories] + rng.random(len(categories)) * self.mass[categories]
        index = np.searchsorted(self.cumulative, target, side="right")
        return self.order[np.clip(index, self.first[categories], self.last[categories])]


def _category_log_mixture(truth: SynthTruth, sampler: _PopularitySampler) -> np.ndarray:
    """Per user, log-probabilities of drawing each category into the pool.

    Approximates the target's own category mass, sum over items of exp(u.v/tau + bias), by
    mass_c * exp(u.mean_c/tau) with mean_c the popularity-weighted mean item vector of category c. The
    importance weights in _sample_pool_block correct for the approximation.
    """
    n_categories, dim = len(sampler.mass), truth.item_vectors.shape[1]
    weight = np.exp(truth.item_bias.astype(np.float64))
    means = np.stack([np.bincount(truth.item_category, weights=weight * truth.item_vectors[:, d],
                                  minlength=n_categories) for d in range(dim)], axis=1) / sampler.mass[:, None]
    logits = truth.user_vectors.astype(np.float64) @ means.T / TAU + np.log(sampler.mass)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def _sample_pool_block(
    truth: SynthTruth, block: np.ndarray, counts: np.ndarray, pool_sizes: np.ndarray, log_mix: np.ndarray,
    sampler: _PopularitySampler, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    n_items = len(truth.item_bias)
    n_categories = len(sampler.mass)
    mix = np.exp(log_mix[block])
    per_category = rng.multinomial(pool_sizes[block], mix / mix.sum(axis=1, keepdims=True))  # (users, categories)
    owner = np.repeat(np.repeat(block, n_categories), per_category.ravel())
    items = sampler.draw(np.repeat(np.tile(np.arange(n_categories), len(block)), per_category.ravel()), rng)
    # Draws repeat popular items: keep each (user, item) once with its count. np.unique also sorts by user.
    keys, times = np.unique(owner.astype(np.int64) * n_items + items, return_counts=True)
    owner, items = keys // n_items, keys % n_items
    category = truth.item_category[items]
    affinity = np.einsum("ij,ij->i", truth.user_vectors[owner], truth.item_vectors[items])
    # Importance weight target/proposal = exp(u.v/tau) * mass_c / mix_u(c) (the popularity cancels), times the
    # draw count: Gumbel-top-n over these approximates sampling from exp(u.v/tau + bias) without replacement.
    log_weight = affinity / TAU + np.log(sampler.mass[category]) - log_mix[owner, category] + np.log(times)
    scores = np.clip(log_weight + _gumbel(rng, len(owner)), -_SCORE_SPAN / 2, _SCORE_SPAN / 2)
    # Sort by user, best score first, with one float key: much faster than lexsort. The clip only touches
    # candidates of categories so improbable that they are never drawn in practice.
    order = np.argsort((owner - block[0]) * float(_SCORE_SPAN) - scores)
    owner, items, affinity = owner[order], items[order], affinity[order]
    rank = np.arange(len(owner)) - np.searchsorted(owner, owner, side="left")
    keep = rank < counts[owner]
    got = np.bincount(owner[keep] - block[0], minlength=len(block))
    short = block[got < counts[block]]
    return owner[keep], items[keep], affinity[keep], short


# ---------------------------------------------------------------------------------------------------------------
# Ratings, timestamps and side information


def _ratings_from_affinity(affinity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer ratings 1-5 that grow with affinity (mean about 3.6, like MovieLens)."""
    z = (affinity - affinity.mean()) / max(float(affinity.std()), 1e-6)
    return np.clip(np.rint(3.6 + 0.9 * z + rng.normal(scale=0.75, size=len(z))), 1, 5).astype(np.float32)


def _timestamps(users: np.ndarray, counts: np.ndarray, hour: np.ndarray, rng: np.random.Generator,
                era: np.ndarray | None = None, median_span: float = 120 * _DAY) -> np.ndarray:
    """Increasing per-user times in 1997-2003: gaps widen over a user's life, clustered at a preferred hour. A
    user's activity starts at their `era` (a share of the timeline) when one is given, at random otherwise."""
    n_users = len(counts)
    span = np.minimum(rng.lognormal(mean=math.log(median_span), sigma=1.0, size=n_users), (_END - _START) * 0.8)
    start_share = rng.random(n_users)
    if era is not None:
        start_share = era
    start = _START + start_share * (_END - _START - span)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(users)) - first[users]
    gaps = rng.exponential(size=len(users)) * (1.0 + position)  # later gaps are longer on average
    exclusive = np.cumsum(gaps) - gaps
    exclusive -= exclusive[first][users]
    fraction = exclusive / np.add.reduceat(gaps, first)[users]
    moment = start[users] + fraction * span[users]
    day = np.floor(moment / _DAY)
    seconds = (hour[users] * 3600 + rng.normal(scale=2.5 * 3600, size=len(users))) % _DAY
    stamps = np.clip(day * _DAY + seconds, _START, _END).astype(np.int64)
    # Sort times within each user (users are sorted and stamps < 2**31): one int64 key.
    offset = users.astype(np.int64) << 31
    return np.sort(offset + stamps) - offset


def _items_frame(truth: SynthTruth, secondary: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    n_items = len(truth.item_category)
    years = np.clip(2000 - np.floor(rng.exponential(scale=12.0, size=n_items)), 1919, 2000).astype(np.int64)
    names = truth.category_names
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    genres = [[names[p]] if s < 0 else [names[p], names[s]] for p, s in zip(truth.item_category.tolist(),
                                                                           secondary.tolist())]
    titles = [f"Item {i} ({y})" for i, y in zip(ids.tolist(), years.tolist())]
    return pd.DataFrame({"item_id": ids, "title": titles, "genres": pd.Series(genres, dtype=object), "year": years})


def _users_frame(truth: SynthTruth, n_categories: int, rng: np.random.Generator) -> pd.DataFrame:
    """Gender, age code and occupation that lean on the user's dominant category."""
    n_users = len(truth.user_vectors)
    dominant = truth.user_categories[:, 0]
    male_share = rng.uniform(0.25, 0.85, size=n_categories)
    gender = np.where(rng.random(n_users) < male_share[dominant], "M", "F")
    age_center = rng.integers(0, len(AGE_BUCKETS), size=n_categories)
    age_index = np.clip(age_center[dominant] + np.rint(rng.normal(scale=1.2, size=n_users)), 0, len(AGE_BUCKETS) - 1)
    favourite_job = rng.integers(0, N_OCCUPATIONS, size=n_categories)
    occupation = np.where(rng.random(n_users) < 0.3, favourite_job[dominant], rng.integers(0, N_OCCUPATIONS, n_users))
    return pd.DataFrame({
        "user_id": np.arange(1, n_users + 1, dtype=np.int64),
        "age": np.asarray(AGE_BUCKETS, dtype=object)[age_index.astype(np.int64)],
        "gender": gender.astype(object),
        "occupation": occupation.astype(str).astype(object),
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Writing the ML-1M format


def write_ml1m(raw: RawData, out_dir: str | Path) -> Path:
    """Write RawData as ML-1M files (``ratings.dat``, ``movies.dat``, ``users.dat``) that load_movielens reads back.

    Titles without a trailing "(year)" get one when the year is known; items without genres get
    "(no genres listed)"; users.dat is skipped when ``raw.users`` is None, and its zip codes are "00000".

    Args:
        raw: The data to write, e.g. from :func:`generate`.
        out_dir: Target folder; created when missing, existing files are overwritten.

    Returns:
        The folder written to.

    Raises:
        DataError: A title or genre cannot be written in the format (holds "::", "|", a newline, or a character
            latin-1 lacks), or the users table lacks gender, age or occupation.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_ratings_dat(raw.ratings, out / "ratings.dat")
    (out / "movies.dat").write_bytes(_movies_dat_bytes(raw.items))
    if raw.users is not None:
        (out / "users.dat").write_bytes(_users_dat_bytes(raw.users))
    return out


def _write_ratings_dat(ratings: pd.DataFrame, path: Path, rows_per_chunk: int = 1 << 20) -> None:
    frame = ratings[["user_id", "item_id", "rating", "timestamp"]]
    values = frame["rating"].to_numpy()
    integral = bool(np.all(values == np.round(values)))
    with path.open("w", encoding="latin-1", newline="\n") as handle:
        for start in range(0, len(frame), rows_per_chunk):
            chunk = frame.iloc[start : start + rows_per_chunk].copy()
            if integral:  # ML-1M writes whole-star ratings as integers
                chunk["rating"] = chunk["rating"].astype(np.int64)
            # to_csv takes a single-character separator; \x1f never occurs in numbers.
            text = chunk.to_csv(sep="\x1f", header=False, index=False, lineterminator="\n")
            handle.write(text.replace("\x1f", "::"))


def _check_writable(text: str, what: str, forbidden: tuple[str, ...]) -> str:
    bad = [f for f in forbidden if f in text]
    if bad:
        raise DataError(f"{what} {text!r} holds {bad[0]!r}, which the ML-1M format cannot carry; rename it.")
    try:
        text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{what} {text!r} holds characters latin-1 lacks ({exc.reason}); ML-1M files are latin-1."
        ) from exc
    return text


def _movies_dat_bytes(items: pd.DataFrame) -> bytes:
    lines = []
    for item_id, title, genres, year in zip(items["item_id"], items["title"], items["genres"], items["year"]):
        title = str(title).strip()
        if year >= 0 and year_from_title(title) < 0:
            title = f"{title} ({year})"
        _check_writable(title, f"item {item_id}: title", ("::", "\n", "\r"))
        names = [_check_writable(str(g), f"item {item_id}: genre", ("::", "|", "\n", "\r")) for g in genres]
        lines.append(f"{item_id}::{title}::{'|'.join(names) if names else NO_GENRES}\n")
    return "".join(lines).encode("latin-1")


def _users_dat_bytes(users: pd.DataFrame) -> bytes:
    missing = [c for c in ("gender", "age", "occupation") if c not in users.columns]
    if missing:
        raise DataError(f"users table lacks the column(s) {missing}; ML-1M's users.dat needs gender, age, occupation.")
    lines = []
    for user_id, gender, age, occupation in zip(users["user_id"], users["gender"], users["age"], users["occupation"]):
        fields = [_check_writable(str(v), f"user {user_id}: attribute", ("::", "\n", "\r"))
                  for v in (gender, age, occupation)]
        lines.append(f"{user_id}::{fields[0]}::{fields[1]}::{fields[2]}::00000\n")
    return "".join(lines).encode("latin-1")
