"""Encoding raw logs into a Dataset: temporal split, feature tables, histories, persistence, fingerprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recserve.data import RawData, generate
from recserve.data.dataset import (
    TEST,
    TRAIN,
    VALID,
    Dataset,
    build_dataset,
    fingerprint,
    temporal_split,
    tie_order,
)
from recserve.errors import ArtifactError, DataError

pytestmark = pytest.mark.unit

PAD = 4  # n_items of the hand-built data set below

# File order is deliberately not time order, and (10, 200) is rated twice: the first row (t=30) must win.
RATINGS = pd.DataFrame({
    "user_id": np.array([20, 10, 10, 10, 20, 30, 10, 20], dtype=np.int64),
    "item_id": np.array([300, 200, 100, 400, 100, 200, 200, 400], dtype=np.int64),
    "rating": np.array([5, 4, 3, 2, 1, 5, 1, 3], dtype=np.float32),
    "timestamp": np.array([50, 30, 10, 20, 40, 5, 60, 45], dtype=np.int64),
})  # fmt: skip
# Item 500 is never rated: it gets no index, and its genre (Horror) no column.
ITEMS = pd.DataFrame({
    "item_id": np.array([100, 200, 300, 400, 500], dtype=np.int64),
    "title": ["A (1995)", "B", "C (1900)", "D (2000)", "E (1990)"],
    "genres": pd.Series([["Drama", "Comedy"], ["Action"], [], ["Comedy"], ["Horror"]], dtype=object),
    "year": np.array([1995, -1, 1900, 2000, 1990], dtype=np.int64),
})  # fmt: skip
USERS = pd.DataFrame({
    "user_id": np.array([10, 20, 30, 40], dtype=np.int64),
    "age": ["25", "18", "25", "56"],
    "gender": ["M", "F", None, "F"],
    "occupation": ["3", "3", "7", "1"],
    "zip": ["111", "222", "333", "444"],
})  # fmt: skip


def _raw(ratings: pd.DataFrame = RATINGS, items: pd.DataFrame = ITEMS, users: pd.DataFrame | None = USERS) -> RawData:
    return RawData(ratings=ratings.copy(), items=items.copy(), users=None if users is None else users.copy(),
                   source="hand")


def _interactions(rows: list[tuple[int, int, int]], users: pd.DataFrame | None = None) -> RawData:
    """RawData from (user, item, time) triples, every item with a row in the item table."""
    u, i, t = (np.array(c, dtype=np.int64) for c in zip(*rows))
    ids = np.unique(i)
    items = pd.DataFrame({"item_id": ids, "title": [f"Item {x}" for x in ids],
                          "genres": pd.Series([["g"] for _ in ids], dtype=object), "year": np.full(len(ids), -1)})
    ratings = pd.DataFrame({"user_id": u, "item_id": i, "rating": np.ones(len(u), np.float32), "timestamp": t})
    return RawData(ratings=ratings, items=items, users=users, source="rows")


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return build_dataset(_raw())


# ---- temporal_split ---------------------------------------------------------------------------------------


def test_temporal_split_per_user_counts_and_order():
    users = np.repeat(np.arange(6), [10, 1, 2, 5, 20, 3])
    expected = np.concatenate([
        [TRAIN] * 7 + [VALID] + [TEST] * 2,       # 10: floor(2) test, floor(1) valid
        [TRAIN],                                  # 1: nothing to learn the user from otherwise
        [TRAIN, TEST],                            # 2: at least one test row
        [TRAIN] * 4 + [TEST],                     # 5: floor(0.5) valid is none
        [TRAIN] * 14 + [VALID] * 2 + [TEST] * 4,  # 20
        [TRAIN] * 2 + [TEST],                     # 3
    ])  # fmt: skip
    split = temporal_split(users)
    assert split.dtype == np.int8
    np.testing.assert_array_equal(split, expected)


def test_temporal_split_keeps_one_training_row_and_handles_empty_input():
    users = np.repeat(np.arange(3), [2, 4, 1])
    # valid_frac would take a user's last training row: it is capped so that one stays
    np.testing.assert_array_equal(temporal_split(users, 0.5, 0.5), [TRAIN, TEST, TRAIN, VALID, TEST, TEST, TRAIN])
    assert len(temporal_split(np.zeros(0, np.int64))) == 0


def test_temporal_split_is_monotone_within_every_user():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 60, 200)
    users = np.repeat(np.arange(200), counts)
    split = temporal_split(users)
    for u, n in enumerate(counts):
        s = split[users == u]
        assert (np.diff(s) >= 0).all()  # TRAIN rows, then VALID, then TEST: the newest rows are held out
        assert (s == TEST).sum() == (max(1, n // 5) if n >= 2 else 0)
        assert (s == TRAIN).sum() >= 1


# ---- build_dataset ----------------------------------------------------------------------------------------


def test_ids_are_densified_and_rows_sorted_by_user_then_time(ds):
    np.testing.assert_array_equal(ds.user_ids, [10, 20, 30])
    np.testing.assert_array_equal(ds.item_ids, [100, 200, 300, 400])  # 500 was never rated
    assert ds.n_users == 3 and ds.n_items == 4
    np.testing.assert_array_equal(ds.users, [0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(ds.items, [0, 3, 1, 0, 3, 2, 1])
    np.testing.assert_array_equal(ds.timestamps, [10, 20, 30, 40, 45, 50, 5])  # (10, 200) kept at t=30, not 60
    np.testing.assert_array_equal(ds.split, [TRAIN, TRAIN, TEST, TRAIN, TRAIN, TEST, TRAIN])
    assert ds.titles.tolist() == ["A (1995)", "B", "C (1900)", "D (2000)"]
    assert ds.source == "hand" and ds.fingerprint == fingerprint(_raw())


def test_genres_multi_hot_over_rated_items_and_year_buckets(ds):
    assert ds.genre_names == ["Action", "Comedy", "Drama"]
    assert ds.item_genres.dtype == np.float32
    np.testing.assert_array_equal(ds.item_genres, [[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    # 5-year buckets from 1900 start at 1; 0 means unknown
    np.testing.assert_array_equal(ds.item_year, [(1995 - 1900) // 5 + 1, 0, 1, (2000 - 1900) // 5 + 1])


def test_user_attributes_vocab_with_unknown_at_zero(ds):
    assert ds.user_cat_names == ["age", "gender", "occupation"]  # zip is not a feature
    assert ds.user_cat_vocab == {"age": ["<unknown>", "18", "25"], "gender": ["<unknown>", "F", "M"],
                                 "occupation": ["<unknown>", "3", "7"]}
    np.testing.assert_array_equal(ds.user_cats, [[2, 2, 1], [1, 1, 1], [2, 0, 2]])
    assert ds.user_cat_cards == [3, 3, 3]


def test_users_missing_from_the_user_table_get_unknown():
    ds = build_dataset(_raw(users=USERS[USERS.user_id != 20]))
    np.testing.assert_array_equal(ds.user_cats[1], [0, 0, 0])


@pytest.mark.parametrize("users", [None, USERS[["user_id"]]], ids=["no-user-file", "id-only"])
def test_constant_none_column_without_user_attributes(users):
    ds = build_dataset(_raw(users=users))
    assert ds.user_cat_names == ["none"] and ds.user_cat_vocab == {"none": ["<unknown>"]}
    assert ds.user_cats.shape == (3, 1) and not ds.user_cats.any()
    assert ds.user_cat_cards == [1]


def test_items_without_genres_still_get_one_column():
    ds = build_dataset(_raw(items=ITEMS.assign(genres=pd.Series([[]] * 5, dtype=object))))
    assert ds.genre_names == ["none"] and ds.item_genres.shape == (4, 1) and not ds.item_genres.any()


def test_rated_items_missing_from_the_item_table_raise():
    bad = pd.concat([RATINGS, pd.DataFrame({"user_id": [10], "item_id": [999], "rating": [np.float32(3)],
                                             "timestamp": [99]})], ignore_index=True)
    with pytest.raises(DataError, match=r"1 rated item ids have no row in the item file \(e.g. 999\)"):
        build_dataset(_raw(ratings=bad))


def test_no_interactions_raise():
    with pytest.raises(DataError, match="no interactions"):
        build_dataset(_raw(ratings=RATINGS.iloc[:0]))


def test_item_popularity_counts_training_rows(ds):
    np.testing.assert_allclose(ds.item_popularity(TRAIN), np.log1p([2, 1, 0, 2]), rtol=1e-6)
    np.testing.assert_allclose(ds.item_popularity(TRAIN, TEST), np.log1p([2, 2, 1, 2]), rtol=1e-6)


# ---- histories and seen items -----------------------------------------------------------------------------


def test_last_history_newest_first_padded_with_n_items(ds):
    np.testing.assert_array_equal(ds.last_history(TRAIN, length=3), [[3, 0, PAD], [3, 0, PAD], [1, PAD, PAD]])
    np.testing.assert_array_equal(ds.last_history(TRAIN, VALID, TEST, length=2), [[1, 3], [2, 3], [1, PAD]])
    np.testing.assert_array_equal(ds.last_history(VALID, length=2), np.full((3, 2), PAD))


def test_rolling_history_sees_only_earlier_training_rows_of_the_same_user():
    # user 1: 10 rows -> 7 TRAIN, 1 VALID, 2 TEST; user 2 follows directly
    raw = _interactions([(1, 100 + t, t) for t in range(10)] + [(2, 200, 1), (2, 201, 2)])
    ds = build_dataset(raw)
    assert ds.split[:10].tolist() == [TRAIN] * 7 + [VALID] + [TEST] * 2
    pad = ds.n_items
    h = ds.rolling_history(np.arange(len(ds.users)), length=3)
    np.testing.assert_array_equal(h[0], [pad, pad, pad])      # first row: nothing before it
    np.testing.assert_array_equal(h[2], [1, 0, pad])          # newest first, never the row's own item
    np.testing.assert_array_equal(h[7], [6, 5, 4])            # the VALID row sees the TRAIN rows before it
    for r in (8, 9):                                          # TEST rows never see the VALID or TEST rows
        assert set(h[r][h[r] != pad]) <= {4, 5, 6} and 6 in h[r]
    np.testing.assert_array_equal(h[10], [pad, pad, pad])     # user 2 does not inherit user 1's rows
    np.testing.assert_array_equal(h[11], [ds.items[10], pad, pad])
    # subsets of rows give the same answer as the full computation
    np.testing.assert_array_equal(ds.rolling_history(np.array([9, 2]), length=3), h[[9, 2]])


def test_rolling_history_property_on_generated_data():
    ds = build_dataset(generate(60, 80, 900, seed=4))
    rows = np.arange(len(ds.users))
    h = ds.rolling_history(rows, length=20)
    train = ds.split == TRAIN
    assert (ds.split != TRAIN).any() and (h != ds.n_items).any()
    for r in rows:
        got = h[r][h[r] != ds.n_items]
        earlier = (ds.users == ds.users[r]) & (rows < r) & train
        if train[r]:  # training examples: exactly the newest earlier items (up to 20), newest first
            np.testing.assert_array_equal(got, ds.items[earlier][::-1][:20])
        else:
            assert set(got) <= set(ds.items[earlier])
        assert ds.items[r] not in got
        assert (ds.timestamps[earlier] <= ds.timestamps[r]).all()


def test_seen_csr(ds):
    indptr, seen = ds.seen_csr(TRAIN)
    np.testing.assert_array_equal(indptr, [0, 2, 4, 5])
    np.testing.assert_array_equal(seen, [0, 3, 0, 3, 1])
    indptr, seen = ds.seen_csr(TRAIN, VALID, TEST)
    np.testing.assert_array_equal(indptr, [0, 3, 6, 7])
    np.testing.assert_array_equal(seen, [0, 1, 3, 0, 2, 3, 1])
    indptr, seen = ds.seen_csr(VALID)
    np.testing.assert_array_equal(indptr, [0, 0, 0, 0])
    assert len(seen) == 0


# ---- persistence and fingerprint --------------------------------------------------------------------------


def test_save_load_round_trip(ds, tmp_path: Path):
    ds.extra = {"note": "kept"}
    try:
        ds.save(tmp_path / "dataset.npz")
        back = Dataset.load(tmp_path / "dataset.npz")
    finally:
        ds.extra = {}
    for name in ("user_ids", "item_ids", "titles", "item_genres", "item_year", "user_cats", "users", "items",
                 "timestamps", "split"):
        want, got = getattr(ds, name), getattr(back, name)
        np.testing.assert_array_equal(got, want, err_msg=name)
        if name != "titles":  # titles come back as fixed-width str instead of object: same values
            assert got.dtype == want.dtype, name
    assert back.genre_names == ds.genre_names and back.user_cat_names == ds.user_cat_names
    assert back.user_cat_vocab == ds.user_cat_vocab
    assert (back.source, back.fingerprint, back.extra) == (ds.source, ds.fingerprint, {"note": "kept"})
    np.testing.assert_array_equal(back.last_history(TRAIN, VALID, TEST), ds.last_history(TRAIN, VALID, TEST))


def test_load_missing_file_names_the_fix(tmp_path: Path):
    with pytest.raises(ArtifactError, match="recserve train"):
        Dataset.load(tmp_path / "dataset.npz")


def test_fingerprint_stable_across_processes_and_sensitive_to_data():
    fp = fingerprint(generate(30, 40, 300, seed=9))
    assert len(fp) == 16 and fp == fingerprint(generate(30, 40, 300, seed=9))
    code = ("from recserve.data import generate; from recserve.data.dataset import fingerprint; "
            "print(fingerprint(generate(30, 40, 300, seed=9)))")
    other_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_run.stdout.strip() == fp
    assert fingerprint(generate(30, 40, 300, seed=10)) != fp
    raw = _raw()
    base = fingerprint(raw)
    moved = RATINGS.copy()
    moved.loc[3, "timestamp"] += 1
    assert fingerprint(_raw(ratings=moved)) != base  # one timestamp changed
    assert fingerprint(_raw(items=ITEMS.iloc[:4])) != base  # the item table changed


def test_timestamp_ties_are_broken_by_a_fixed_order_not_by_file_order():
    raw = generate(n_users=30, n_items=40, n_interactions=600, seed=3)
    raw.ratings["timestamp"] = raw.ratings["timestamp"] // 100_000 * 100_000     # many equal timestamps
    shuffled = RawData(raw.ratings.sample(frac=1.0, random_state=1).reset_index(drop=True), raw.items, raw.users,
                       raw.source, raw.files)
    a, b = build_dataset(raw), build_dataset(shuffled)
    for field in ("users", "items", "timestamps", "split"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    tie = np.flatnonzero((np.diff(a.users) == 0) & (np.diff(a.timestamps) == 0))
    key = tie_order(a.user_ids[a.users], a.item_ids[a.items])
    assert len(tie) and (key[tie] < key[tie + 1]).all()
