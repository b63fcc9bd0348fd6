"""The synthetic generator: determinism, shapes, planted structure, scale, and the ML-1M round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recserve.data import RawData, generate, load_movielens, synth, write_ml1m
from recserve.data.movielens import AGE_BUCKETS
from recserve.errors import DataError

pytestmark = pytest.mark.unit

START_1997, END_2003 = 852076800, 1072915199


@pytest.fixture(scope="module")
def small():
    """Exact sampling (users * items is small)."""
    return synth.generate_with_truth(600, 800, 30000, seed=3)


@pytest.fixture(scope="module")
def pooled():
    """Candidate-pool sampling: 50k items, 200k interactions."""
    return synth.generate_with_truth(2000, 50000, 200000, seed=5)


def _preferred_share(raw: RawData, truth: synth.SynthTruth) -> tuple[float, float]:
    """Share of interactions in the user's preferred categories, and the share popularity-blind picking gives."""
    users = raw.ratings["user_id"].to_numpy() - 1
    category = truth.item_category[raw.ratings["item_id"].to_numpy() - 1]
    preferred = (truth.user_categories[users] == category[:, None]).any(axis=1)
    size = np.bincount(truth.item_category) / len(truth.item_category)
    chance = np.where(truth.user_categories >= 0, size[np.maximum(truth.user_categories, 0)], 0).sum(axis=1)
    return float(preferred.mean()), float(chance[users].mean())


def _top_decile_share(raw: RawData) -> float:
    counts = np.sort(np.bincount(raw.ratings["item_id"], minlength=len(raw.items) + 1)[1:])[::-1]
    return float(counts[: len(counts) // 10].sum() / counts.sum())


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate(300, 400, 9000, seed=11), generate(300, 400, 9000, seed=11), generate(300, 400, 9000, seed=12)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert not a.ratings["item_id"].equals(c.ratings["item_id"])


def test_pool_sampling_is_deterministic_too():
    a, b = generate(400, 40000, 20000, seed=2), generate(400, 40000, 20000, seed=2)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)


def test_shapes_dtypes_and_ranges(small):
    raw, _ = small
    assert raw.source == "synth"
    ratings = raw.ratings
    assert list(ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(t) for t in ratings.dtypes] == ["int64", "int64", "float32", "int64"]
    assert abs(len(ratings) - 30000) <= 0.02 * 30000
    per_user = ratings.groupby("user_id").size()
    assert len(per_user) == 600 and per_user.min() >= 5 and per_user.max() <= 400
    assert not ratings.duplicated(["user_id", "item_id"]).any()  # without replacement
    assert ratings["item_id"].between(1, 800).all()
    assert set(ratings["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ratings["timestamp"].between(START_1997, END_2003).all()
    assert (ratings.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()
    assert list(raw.items.columns) == ["item_id", "title", "genres", "year"]
    assert raw.items["item_id"].tolist() == list(range(1, 801))
    assert raw.items.loc[16, "title"] == f"Item 17 ({raw.items.loc[16, 'year']})"
    assert all(1 <= len(g) <= 2 and all(name.startswith("cat") for name in g) for g in raw.items["genres"])
    assert list(raw.users.columns) == ["user_id", "age", "gender", "occupation"]
    assert set(raw.users["age"]) <= set(AGE_BUCKETS) and set(raw.users["gender"]) == {"F", "M"}
    assert raw.users["occupation"].map(lambda o: 0 <= int(o) <= 20).all()


def test_interaction_counts_are_skewed_per_user(small):
    per_user = small[0].ratings.groupby("user_id").size()
    assert per_user.max() > 4 * per_user.median()  # a lognormal-ish long tail


def test_popularity_is_zipf_like(small, pooled):
    # Uniform popularity would put about 10% of interactions on the top 10% of items.
    assert _top_decile_share(small[0]) > 0.25
    assert _top_decile_share(pooled[0]) > 0.35


def test_users_stick_to_their_preferred_categories(small, pooled):
    for raw, truth in (small, pooled):
        share, chance = _preferred_share(raw, truth)
        assert share > 3 * chance


def test_structure_is_visible_without_the_truth(small):
    """Users' top-category share is far above that of the same interactions with users shuffled."""
    raw, _ = small
    genres = raw.items.set_index("item_id")["genres"].str[0]
    frame = raw.ratings[["user_id", "item_id"]].assign(genre=lambda f: f["item_id"].map(genres).to_numpy())

    def top_share(f: pd.DataFrame) -> float:
        counts = f.groupby(["user_id", "genre"]).size()
        return float((counts.groupby(level=0).max() / counts.groupby(level=0).sum()).mean())

    shuffled = frame.assign(genre=np.random.default_rng(0).permutation(frame["genre"].to_numpy()))
    assert top_share(frame) > 1.8 * top_share(shuffled)


def test_ratings_follow_affinity(small):
    raw, truth = small
    users, items = raw.ratings["user_id"].to_numpy() - 1, raw.ratings["item_id"].to_numpy() - 1
    affinity = np.einsum("ij,ij->i", truth.user_vectors[users], truth.item_vectors[items])
    assert np.corrcoef(affinity, raw.ratings["rating"])[0, 1] > 0.4


def test_hour_of_day_clusters_per_user(small):
    raw, truth = small
    hours = raw.ratings["timestamp"].to_numpy() % 86400 / 3600
    angle = hours / 24 * 2 * np.pi
    # Mean resultant length per user: 1 = always the same hour, about 0 = spread over the day.
    frame = pd.DataFrame({"user": raw.ratings["user_id"], "c": np.cos(angle), "s": np.sin(angle)})
    per_user = frame.groupby("user")[["c", "s"]].mean()
    assert np.hypot(per_user["c"], per_user["s"]).mean() > 0.5
    overall = np.hypot(np.cos(angle).mean(), np.sin(angle).mean())
    assert overall < 0.3


def test_user_attributes_follow_the_dominant_category(pooled):
    raw, truth = pooled
    frame = raw.users.assign(dominant=truth.user_categories[:, 0], male=raw.users["gender"] == "M")
    male_share = frame.groupby("dominant")["male"].mean()
    assert male_share.max() - male_share.min() > 0.3


def test_pool_sampling_approximates_exact_sampling(monkeypatch):
    exact = synth.generate_with_truth(1500, 1200, 60000, seed=9)
    monkeypatch.setattr(synth, "_EXACT_LIMIT", 0)
    pooled = synth.generate_with_truth(1500, 1200, 60000, seed=9)
    # Same latents (separate random streams), different sampler.
    np.testing.assert_array_equal(exact[1].item_vectors, pooled[1].item_vectors)
    assert not exact[0].ratings["item_id"].equals(pooled[0].ratings["item_id"])
    assert _preferred_share(*pooled)[0] == pytest.approx(_preferred_share(*exact)[0], abs=0.03)
    assert _top_decile_share(pooled[0]) == pytest.approx(_top_decile_share(exact[0]), abs=0.03)


def test_scale_smoke_50k_items(pooled):
    raw, _ = pooled
    assert abs(len(raw.ratings) - 200000) <= 0.02 * 200000
    assert not raw.ratings.duplicated(["user_id", "item_id"]).any()
    assert raw.ratings.groupby("user_id").size().min() >= 5
    assert raw.ratings["item_id"].nunique() > 20000


def test_round_trip_through_ml1m_files(tmp_path, small):
    raw, _ = small
    out = write_ml1m(raw, tmp_path / "synth")
    assert sorted(p.name for p in out.iterdir()) == ["movies.dat", "ratings.dat", "users.dat"]
    assert (out / "movies.dat").read_text(encoding="latin-1").splitlines()[16].startswith("17::Item 17 (")
    back = load_movielens(out)
    assert back.source == "ml-1m"
    pd.testing.assert_frame_equal(back.ratings, raw.ratings)
    pd.testing.assert_frame_equal(back.items, raw.items)
    pd.testing.assert_frame_equal(back.users, raw.users)


def test_write_ml1m_of_other_data(tmp_path):
    raw = RawData(
        ratings=pd.DataFrame({"user_id": [1, 2], "item_id": [5, 6], "rating": np.array([3.5, 4.0], np.float32),
                              "timestamp": [964982703, 964982704]}),
        items=pd.DataFrame({"item_id": [5, 6], "title": ["Amélie", "Señor (1999)"], "genres": [["Comedy"], []],
                            "year": [2001, 1999]}),
        users=None, source="ml-csv",
    )  # fmt: skip
    back = load_movielens(write_ml1m(raw, tmp_path))
    assert back.ratings["rating"].tolist() == [3.5, 4.0]
    assert back.items["title"].tolist() == ["Amélie (2001)", "Señor (1999)"]  # the known year is appended
    assert back.items["genres"].tolist() == [["Comedy"], []] and back.users is None


def test_write_ml1m_refuses_titles_the_format_cannot_carry(tmp_path, small):
    items = small[0].items.copy()
    items.loc[0, "title"] = "Part 1::Part 2 (1990)"
    with pytest.raises(DataError, match="'::'"):
        write_ml1m(RawData(small[0].ratings, items, None, "synth"), tmp_path)


@pytest.mark.parametrize(
    ("n_users", "n_items", "n_interactions", "needle"),
    [(100, 50, 400, "between 5 and 25 per user"), (10, 20, 1000, "between 5 and 10 per user"),
     (10, 5, 100, "n_items >= 10")],
)  # fmt: skip
def test_inconsistent_sizes_are_refused(n_users, n_items, n_interactions, needle):
    with pytest.raises(DataError, match=needle):
        generate(n_users, n_items, n_interactions)


def test_users_whose_pool_is_too_small_are_sampled_exactly(monkeypatch):
    monkeypatch.setattr(synth, "_EXACT_LIMIT", 0)  # force pools, on a catalogue whose categories are tiny
    topped_up = []
    exact = synth._sample_exact

    def spy(truth, user_ids, counts, rng):
        topped_up.append(len(user_ids))
        return exact(truth, user_ids, counts, rng)

    monkeypatch.setattr(synth, "_sample_exact", spy)
    raw = generate(200, 60, 4000, seed=4)
    assert topped_up and topped_up[0] > 0
    assert abs(len(raw.ratings) - 4000) <= 0.02 * 4000
    assert not raw.ratings.duplicated(["user_id", "item_id"]).any()
    assert raw.ratings.groupby("user_id").size().between(5, 30).all()


def test_with_drift_each_pick_leans_to_what_was_released_around_its_time():
    _, plain = synth.generate_with_truth(400, 300, 12000, seed=7)
    raw, truth = synth.generate_with_truth(400, 300, 12000, seed=7, drift=8.0)
    assert plain.user_era is None and plain.item_release is None and truth.item_release.shape == (300,)
    r = raw.ratings
    now = (r["timestamp"].to_numpy() - START_1997) / (END_2003 - START_1997)
    release = truth.item_release[r["item_id"].to_numpy() - 1]
    blind = np.abs(now[:, None] - truth.item_release[None, :]).mean()      # the same times, items picked blind
    assert np.abs(now - release).mean() < 0.6 * blind
    assert np.corrcoef(now, release)[0, 1] > 0.6
    # users stay for years, so a user's own newest picks are later releases than their oldest
    first, last = r.groupby("user_id").head(3), r.groupby("user_id").tail(3)
    rel = lambda f: truth.item_release[f["item_id"].to_numpy() - 1].mean()   # noqa: E731
    assert rel(last) > rel(first) + 0.05
    assert not r.duplicated(["user_id", "item_id"]).any()
    assert (r.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing)).all()
    assert abs(len(r) - 12000) <= 0.02 * 12000


@pytest.mark.parametrize(("kwargs", "needle"), [({"drift": -1.0}, "drift must be"),
                                                ({"drift": float("nan")}, "drift must be"),
                                                ({"drift": 2.0, "n_items": 50000}, "drift needs exact sampling")])
def test_bad_drift_is_refused_naming_it(kwargs, needle):
    sizes = {"n_users": 1000, "n_items": 300, "n_interactions": 20000, **kwargs}
    with pytest.raises(DataError, match=needle):
        generate(**sizes)
