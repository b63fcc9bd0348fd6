"""The feedback loop without retraining: `recserve update` folds the clicks of the event log into the artifacts.

Clicks (`recserve.events`, written by `RecClient(event_log=...)`) of users and items the artifacts know become
interactions of their own split, `UPDATE`, which only the `serve` view knows (evaluation's valid and test views
never see them). What follows from them is refreshed, for `recserve deploy --artifacts A` to serve as a new
version: each user's recent items (the user tower's history input and the neighbour source's starting points),
the seen lists (a clicked item is not recommended again) and popularity (the blend's term, the popularity source,
cold start). The trained weights stay: towers, ranker, ALS factors, the neighbour table (`recserve train`
refits them). A click of a user or an item the artifacts do not know is counted and left out: an unknown user
is served from `history` at request time; a new item joins with `recserve items add` (then its clicks fold
in). Clicks up to the newest one already folded (`dataset.npz`'s `extra["folded_until"]`) are skipped, so
running it again on a growing log adds only the new ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recserve.deploy import locked
from recserve.errors import ArtifactError


@locked("artifacts")
def update(artifacts: Path, events: Path) -> dict:
    """Fold the log's new clicks into ARTIFACTS (dataset.npz and the serve view of sources.npz); returns counts."""
    from recserve.baselines import interactions
    from recserve.data.dataset import UPDATE, Dataset
    from recserve.events import read_events
    from recserve.sources import RECENT, VIEWS, context_tables, read_view, save_sources

    artifacts = Path(artifacts)
    ds = Dataset.load(artifacts / "dataset.npz")
    if not (artifacts / "sources.npz").exists():
        raise ArtifactError(f"{artifacts / 'sources.npz'} is missing: run `recserve train` first")
    folded_until = float(ds.extra.get("folded_until", float("-inf")))
    user_pos = {int(u): i for i, u in enumerate(ds.user_ids)}
    item_pos = {int(u): i for i, u in enumerate(ds.item_ids)}
    counts = {"clicks": 0, "already_folded": 0, "duplicate": 0, "unknown_user": 0, "unknown_item": 0, "folded": 0}
    rows: list[tuple[int, int, int]] = []
    taken: set[tuple[int, int, int]] = set()
    newest = folded_until
    for e in read_events(events):
        if e["type"] != "click":
            continue
        counts["clicks"] += 1
        ts = float(e.get("ts", 0.0))
        if ts <= folded_until:
            counts["already_folded"] += 1
            continue
        u, i = user_pos.get(int(e.get("user", -1))), item_pos.get(int(e.get("item", -1)))
        if u is None:
            counts["unknown_user"] += 1
            continue
        if i is None:
            counts["unknown_item"] += 1
            continue
        if (u, i, int(ts)) in taken:
            counts["duplicate"] += 1             # the same click logged twice (a replayed or copied log)
            continue
        taken.add((u, i, int(ts)))
        rows.append((u, i, int(ts)))
        newest = max(newest, ts)
    counts["folded"] = len(rows)
    counts["users"] = len({u for u, _, _ in rows})
    if rows:
        new = np.array(rows, np.int64)
        users = np.concatenate([ds.users, new[:, 0]])
        items = np.concatenate([ds.items, new[:, 1]])
        ts = np.concatenate([ds.timestamps, new[:, 2]])
        split = np.concatenate([ds.split, np.full(len(new), UPDATE, ds.split.dtype)])
        order = np.lexsort((ts, users))                 # the dataset's invariant: by user, then time (stable)
        ds.users, ds.items, ds.timestamps, ds.split = users[order], items[order], ts[order], split[order]
        ds.extra = {**ds.extra, "folded_until": newest, "folded": int(ds.extra.get("folded", 0)) + len(rows)}
        tmp = artifacts / ".dataset.update.npz"
        ds.save(tmp)
        os.replace(tmp, artifacts / "dataset.npz")
    # the serve view's popularity and recent items, always from the dataset on disk: a crash between the two
    # files is repaired by running `update` again
    views = {name: read_view(artifacts / "sources.npz", name) for name in VIEWS}
    serve = views["serve"]
    X = interactions(ds, *VIEWS["serve"])                # as `recserve.sources.fit_view` counts them
    serve.pop = np.log1p(np.asarray(X.sum(axis=0)).ravel()).astype(np.float32)
    serve.recent = ds.last_history(*VIEWS["serve"], length=RECENT)
    serve.ctx_user, serve.ctx_item = context_tables(ds, VIEWS["serve"])   # the new events are the newest period
    for cached in ("pop_order", "is_new", "new_items"):  # derived from the old popularity
        serve.__dict__.pop(cached, None)
    tmp = artifacts / ".sources.update.npz"
    save_sources(tmp, views)
    os.replace(tmp, artifacts / "sources.npz")
    return counts
