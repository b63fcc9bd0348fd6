"""Answers for users the model has never seen: popular and trending in the request's context, popular in the
user's segment. numpy only (the served step reads `cold.npz`, written by `export repository` from the view's
interactions).

Scores are sums of log counts, each a view of popularity; none is tuned (a cold user has no validation rows of
their own here), they only decide an order among items every user may see:

    popular(hour, weekday) = log1p(n) + log1p(n in the last 10% of the timeline: trending)
                             + log1p(n within ±1 h of `hour`) + log1p(n on `weekday`)
    segment(codes)         = log1p(n) + Σ over the given attributes a of log1p(n among users with value codes[a])

n counts the view's interactions of each item. On data without a meaningful clock (every timestamp equal or
synthetic) the hour and weekday terms are the same for every item order they cannot tell apart and do no harm.
Attribute code 0 is "<unknown>" (recserve.data) and -1 means "not given": neither narrows the segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRENDING_SHARE = 0.1


def context_of(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hour 0-23, weekday 0 = Monday) of Unix timestamps, UTC (1970-01-01 was a Thursday)."""
    ts = np.asarray(timestamps, dtype=np.int64)
    return (ts // 3600) % 24, (ts // 86400 + 3) % 7


@dataclass(frozen=True)
class ColdStart:
    count: np.ndarray       # (I,) log1p interactions
    trending: np.ndarray    # (I,) log1p interactions in the newest TRENDING_SHARE of the timeline
    by_hour: np.ndarray     # (24, I) log1p interactions within ±1 h of each hour
    by_weekday: np.ndarray  # (7, I) log1p interactions on each weekday
    segments: list[np.ndarray]   # per user attribute: (values, I) log1p interactions of users with that value
    user_cats_mode: np.ndarray   # (C,) the most common value of each attribute among known users

    @property
    def n_items(self) -> int:
        return len(self.count)

    def popular(self, hour: int, weekday: int) -> np.ndarray:
        """(I,) scores of the popular-and-trending order for one request context."""
        return self.count + self.trending + self.by_hour[int(hour) % 24] + self.by_weekday[int(weekday) % 7]

    def segment(self, codes: np.ndarray) -> np.ndarray:
        """(I,) scores among users whose given attributes match `codes` (-1 / 0 / out of range: not narrowed)."""
        score = self.count.copy()
        for a, code in enumerate(np.asarray(codes, dtype=np.int64).reshape(-1)[:len(self.segments)]):
            if 0 < code < len(self.segments[a]):
                score += self.segments[a][code]
        return score

    def narrows(self, codes: np.ndarray | None) -> bool:
        """True when `codes` names at least one known attribute value (a segment, not everyone)."""
        if codes is None:
            return False
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)[:len(self.segments)]
        return any(0 < c < len(self.segments[a]) for a, c in enumerate(codes))


def fit_cold(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, user_cats: np.ndarray,
             n_items: int) -> ColdStart:
    """The cold-start tables from one view's interactions (dense user and item indices)."""
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    log = lambda x: np.log1p(x).astype(np.float32)  # noqa: E731
    count = np.bincount(items, minlength=n_items)
    trending = np.zeros(n_items)
    if len(timestamps):
        cut = np.quantile(timestamps, 1 - TRENDING_SHARE)
        trending = np.bincount(items[timestamps >= cut], minlength=n_items)
    hour, weekday = context_of(timestamps)
    per_hour = np.zeros((24, n_items))
    np.add.at(per_hour, (hour, items), 1)
    window = per_hour + np.roll(per_hour, 1, axis=0) + np.roll(per_hour, -1, axis=0)
    per_weekday = np.zeros((7, n_items))
    np.add.at(per_weekday, (weekday, items), 1)
    segments = []
    for a in range(user_cats.shape[1]):
        values = int(user_cats[:, a].max()) + 1 if len(user_cats) else 1
        seg = np.zeros((values, n_items))
        np.add.at(seg, (user_cats[users, a], items), 1)
        segments.append(log(seg))
    mode = np.array([np.bincount(user_cats[:, a]).argmax() if len(user_cats) else 0
                     for a in range(user_cats.shape[1])], np.int64)
    return ColdStart(log(count), log(trending), log(window), log(per_weekday), segments, mode)


def save_cold(path: Path, cold: ColdStart) -> None:
    np.savez(path, count=cold.count, trending=cold.trending, by_hour=cold.by_hour, by_weekday=cold.by_weekday,
             user_cats_mode=cold.user_cats_mode, n_segments=np.array(len(cold.segments)),
             **{f"segment_{a}": s for a, s in enumerate(cold.segments)})


def load_cold(path: Path) -> ColdStart:
    with np.load(path) as z:
        return ColdStart(z["count"], z["trending"], z["by_hour"], z["by_weekday"],
                         [z[f"segment_{a}"] for a in range(int(z["n_segments"]))], z["user_cats_mode"])
