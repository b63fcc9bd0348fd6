"""`recserve update`: clicks of the event log folded into the served data, never into evaluation's views."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from recserve.data.dataset import UPDATE, Dataset
from recserve.events import EventLog
from recserve.export import graphs
from recserve.sources import read_view
from recserve.update import update


@pytest.fixture
def copy(tiny_artifacts, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    return out


def _unseen_item(ds: Dataset, user: int) -> int:
    seen = set(ds.items[ds.users == user].tolist())
    return next(i for i in range(ds.n_items) if i not in seen)


def test_clicks_become_the_users_newest_items_and_seen_in_the_serve_view_only(copy, tmp_path):
    ds = Dataset.load(copy / "dataset.npz")
    test_before = graphs.serving_tables(copy, "test")
    test_pop_before = read_view(copy / "sources.npz", "test").pop.copy()
    serve_pop_before = read_view(copy / "sources.npz", "serve").pop.copy()
    user, item = 3, _unseen_item(ds, 3)
    log = EventLog(tmp_path / "events.jsonl")
    now = int(ds.timestamps.max()) + 3600
    log.write({"type": "click", "request_id": "r1", "user": int(ds.user_ids[user]), "item": int(ds.item_ids[item]),
               "ts": now})
    log.write({"type": "click", "request_id": "r1", "user": int(ds.user_ids[user]), "item": int(ds.item_ids[item]),
               "ts": now})                                                    # the same click, logged twice
    log.write({"type": "click", "request_id": "r2", "user": 10 ** 12, "item": int(ds.item_ids[0]), "ts": now})
    log.write({"type": "click", "request_id": "r3", "user": int(ds.user_ids[0]), "item": 10 ** 12, "ts": now})
    log.write({"type": "impression", "request_id": "r1", "user": int(ds.user_ids[user]), "items": [1], "ts": now})
    log.close()
    counts = update(copy, tmp_path / "events.jsonl")
    assert counts == {"clicks": 4, "already_folded": 0, "duplicate": 1, "unknown_user": 1, "unknown_item": 1,
                      "folded": 1, "users": 1}

    after = Dataset.load(copy / "dataset.npz")
    assert len(after.users) == len(ds.users) + 1 and int((after.split == UPDATE).sum()) == 1
    order = np.lexsort((after.timestamps, after.users))
    assert (order == np.arange(len(order))).all(), "still sorted by user, then time"
    served = graphs.serving_tables(copy, "serve")
    assert served.history[user, 0] == item, "the click is the user's newest item"
    row = served.seen[served.seen_indptr[user]:served.seen_indptr[user + 1]]
    assert item in row, "a clicked item is seen: never recommended again"
    assert read_view(copy / "sources.npz", "serve").recent[user, 0] == item
    test_after = graphs.serving_tables(copy, "test")
    assert (test_after.history == test_before.history).all() and (test_after.seen == test_before.seen).all(), \
        "evaluation's views never see folded clicks"
    assert (read_view(copy / "sources.npz", "test").pop == test_pop_before).all()
    serve_pop = read_view(copy / "sources.npz", "serve").pop
    assert serve_pop[item] > serve_pop_before[item] and np.delete(serve_pop == serve_pop_before, item).all()

    again = update(copy, tmp_path / "events.jsonl")
    assert again["folded"] == 0 and again["already_folded"] == 4
    assert len(Dataset.load(copy / "dataset.npz").users) == len(after.users)
