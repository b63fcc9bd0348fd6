"""Request-time rules and exploration (recserve/rules.py), against small cases and a reference written here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import chisquare

from recserve.ranking import PAD_ID, PAD_SCORE
from recserve.rules import ItemTable, Rules, apply_rules


def _table(n: int, genres=None, year=None, vectors=None) -> ItemTable:
    """Items with raw ids 10, 20, ..., 10 n."""
    genres = np.zeros((n, 2), np.float32) if genres is None else np.asarray(genres, np.float32)
    year = np.zeros(n, np.int64) if year is None else np.asarray(year, np.int64)
    return ItemTable(np.arange(1, n + 1, dtype=np.int64) * 10, genres, year, vectors)


def _ranked(n: int, b: int = 1, scores=None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.tile(np.arange(1, n + 1, dtype=np.int64) * 10, (b, 1))
    sc = np.linspace(1.0, 0.0, n) if scores is None else np.asarray(scores, np.float64)
    return ids, np.tile(sc.astype(np.float32), (b, 1))


# ---- a pure-Python reference of the policy (module docstring, points 1-4) ----

def _state(ids, sc, rules: Rules, table: ItemTable, chosen: list[int]) -> dict[int, float]:
    """{input position: adjusted relevance} of the allowed items after the positions `chosen` were picked."""
    rows = {p: int(np.searchsorted(table.item_ids, i)) for p, i in enumerate(ids)
            if i in set(table.item_ids.tolist())}
    years = table.year.astype(float)
    span = years.max() - years.min()

    def genres(p):
        return {g for g in range(table.genres.shape[1]) if p in rows and table.genres[rows[p], g]}

    def sim(p, q):
        if table.vectors is not None:
            if p not in rows or q not in rows:
                return 0.0
            a, b = table.vectors[rows[p]], table.vectors[rows[q]]
            return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        union = genres(p) | genres(q)
        return len(genres(p) & genres(q)) / len(union) if union else 0.0

    def relevance(p):
        rel = float(sc[p])
        if rules.freshness and p in rows and span > 0:
            rel += rules.freshness * (years[rows[p]] - years.min()) / span
        return rel

    # MMR compares relevance min-max scaled to [0, 1] over the row's candidates with similarity in [0, 1]
    cands = [p for p, i in enumerate(ids) if i >= 0 and i not in rules.exclude]
    lo = min((relevance(p) for p in cands), default=0.0)
    hi = max((relevance(p) for p in cands), default=0.0)
    out = {}
    for p, i in enumerate(ids):
        if i < 0 or i in rules.exclude or p in chosen:
            continue
        if rules.max_per_genre and any(sum(g in genres(c) for c in chosen) >= rules.max_per_genre for g in genres(p)):
            continue
        rel = relevance(p)
        if rules.mmr_lambda < 1:
            scaled = (rel - lo) / (hi - lo) if hi > lo else 0.0
            rel = rules.mmr_lambda * scaled - (1 - rules.mmr_lambda) * max((sim(p, c) for c in chosen), default=0.0)
        out[p] = rel
    return out


def _reference_greedy(ids, sc, k, rules, table) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < k:
        state = _state(ids, sc, rules, table, chosen)
        if not state:
            break
        chosen.append(max(state, key=lambda p: (state[p], -p)))
    return [int(ids[p]) for p in chosen] + [PAD_ID] * (k - len(chosen))


def _reference_propensity(ids, sc, out_ids, rules, table) -> list[float]:
    """The probability of each returned item at its position given the ones before it."""
    pos_of = {int(i): p for p, i in enumerate(ids)}
    chosen, probs = [], []
    for i in out_ids:
        if i < 0:
            probs.append(0.0)
            continue
        state = _state(ids, sc, rules, table, chosen)
        p = pos_of[int(i)]
        if rules.explore == "epsilon":
            greedy = max(state, key=lambda q: (state[q], -q))
            probs.append(rules.epsilon / len(state) + (1 - rules.epsilon) * (p == greedy))
        else:
            z = np.array(list(state.values())) / rules.temperature
            w = np.exp(z - z.max())
            probs.append(float(w[list(state).index(p)] / w.sum()))
        chosen.append(p)
    return probs


# ---- defaults, exclusion ----

def test_default_rules_return_the_first_k_unchanged_with_propensity_one():
    ids = np.array([[5, 3, 9, 1], [7, 2, PAD_ID, PAD_ID]], np.int64)
    sc = np.array([[0.9, 0.5, 0.2, 0.1], [0.4, 0.3, PAD_SCORE, PAD_SCORE]], np.float32)
    got_ids, got_sc, prop = apply_rules(ids, sc, 3, Rules(), None)
    assert got_ids.tolist() == [[5, 3, 9], [7, 2, PAD_ID]]
    np.testing.assert_array_equal(got_sc, np.array([[0.9, 0.5, 0.2], [0.4, 0.3, PAD_SCORE]], np.float32))
    assert prop.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    wide = apply_rules(ids, sc, 6, Rules(), None)        # k > N pads every output
    assert wide[0].tolist() == [[5, 3, 9, 1, PAD_ID, PAD_ID], [7, 2] + [PAD_ID] * 4]
    assert wide[1].dtype == np.float32 and wide[2][0].tolist() == [1, 1, 1, 1, 0, 0]
    unsorted = np.array([[0.1, 0.9, 0.5, 0.7]], np.float32)            # the input order is kept, not re-sorted
    assert apply_rules(ids[:1], unsorted, 3, Rules(), None)[0].tolist() == [[5, 3, 9]]


def test_exclusion_removes_the_ids_and_fills_from_the_rest_in_order():
    ids, sc = _ranked(6)
    got_ids, got_sc, prop = apply_rules(ids, sc, 4, Rules(exclude=(20, 40, 999)), None)
    assert got_ids.tolist() == [[10, 30, 50, 60]]
    np.testing.assert_array_equal(got_sc[0], sc[0, [0, 2, 4, 5]])
    assert prop.tolist() == [[1.0] * 4]
    got_ids, _, prop = apply_rules(ids, sc, 4, Rules(exclude=(10, 20, 30)), None)
    assert got_ids.tolist() == [[40, 50, 60, PAD_ID]] and prop.tolist() == [[1, 1, 1, 0]]


def test_exclusion_also_applies_on_the_reordering_path():
    ids, sc = _ranked(5)
    got = apply_rules(ids, sc, 3, Rules(exclude=(10,), max_per_genre=5), _table(5))[0]
    assert got.tolist() == [[20, 30, 40]]


# ---- genre cap ----

def test_max_per_genre_caps_each_genre_skips_to_the_next_allowed_and_pads_when_too_few():
    #          A       A       A       B       none    A
    genres = [[1, 0], [1, 0], [1, 0], [0, 1], [0, 0], [1, 0]]
    ids, sc = _ranked(6)
    got_ids, got_sc, prop = apply_rules(ids, sc, 5, Rules(max_per_genre=2), _table(6, genres))
    assert got_ids.tolist() == [[10, 20, 40, 50, PAD_ID]]         # 30 and 60 would be the third A
    assert got_sc[0, -1] == PAD_SCORE and prop.tolist() == [[1, 1, 1, 1, 0]]


def test_items_without_a_genre_are_not_capped():
    ids, sc = _ranked(5)
    got = apply_rules(ids, sc, 5, Rules(max_per_genre=1), _table(5))[0]    # nobody has a genre
    assert got.tolist() == [[10, 20, 30, 40, 50]]


def test_a_multi_genre_item_counts_towards_each_of_its_genres():
    #          A+B     A       B       A+B
    genres = [[1, 1], [1, 0], [0, 1], [1, 1]]
    ids, sc = _ranked(4)
    got = apply_rules(ids, sc, 4, Rules(max_per_genre=1), _table(4, genres))[0]
    assert got.tolist() == [[10, PAD_ID, PAD_ID, PAD_ID]]
    got = apply_rules(ids, sc, 4, Rules(max_per_genre=2), _table(4, genres))[0]
    assert got.tolist() == [[10, 20, 30, PAD_ID]]


def test_genre_cap_holds_and_matches_the_reference_on_random_rows():
    rng = np.random.default_rng(3)
    n, g = 30, 4
    table = _table(n, rng.random((n, g)) < 0.35, rng.integers(0, 20, n))
    ids = np.stack([rng.permutation(table.item_ids) for _ in range(5)])
    ids[1, 25:] = PAD_ID
    ids[2, 3] = 12345                                                 # unknown id: kept, no genre
    sc = -np.sort(-rng.normal(size=ids.shape), axis=1).astype(np.float32)
    rules = Rules(max_per_genre=2, freshness=0.7, exclude=(int(ids[0, 0]),))
    got = apply_rules(ids, sc, 12, rules, table)[0]
    for r in range(len(ids)):
        assert got[r].tolist() == _reference_greedy(ids[r], sc[r], 12, rules, table)
        rows = table.rows(got[r][got[r] >= 0])
        known = table.genres[rows[rows >= 0]]
        assert (known.sum(0) <= 2).all()
    assert 12345 in got[2]


# ---- MMR ----

def test_mmr_moves_a_near_duplicate_below_a_dissimilar_item():
    vectors = np.array([[1, 0], [1, 0], [0, 1]], np.float32)          # item 20 duplicates item 10
    ids, sc = _ranked(3, scores=[1.0, 0.9, 0.8])
    table = _table(3, vectors=vectors)
    got_ids, got_sc, prop = apply_rules(ids, sc, 3, Rules(mmr_lambda=0.5), table)
    assert got_ids.tolist() == [[10, 30, 20]]
    np.testing.assert_array_equal(got_sc[0], sc[0, [0, 2, 1]])        # the ranker's scores travel with the ids
    assert prop.tolist() == [[1, 1, 1]]


def test_mmr_without_vectors_uses_genre_jaccard_similarity():
    genres = [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    ids, sc = _ranked(3, scores=[1.0, 0.9, 0.8])
    assert apply_rules(ids, sc, 3, Rules(mmr_lambda=0.5), _table(3, genres))[0].tolist() == [[10, 30, 20]]
    rng = np.random.default_rng(5)
    table = _table(12, rng.random((12, 3)) < 0.5)
    ids, sc = _ranked(12, scores=np.sort(rng.random(12))[::-1])
    rules = Rules(mmr_lambda=0.6)
    assert apply_rules(ids, sc, 8, rules, table)[0][0].tolist() == _reference_greedy(ids[0], sc[0], 8, rules, table)


def test_mmr_lambda_one_is_the_relevance_order():
    rng = np.random.default_rng(1)
    n = 40
    v = rng.normal(size=(n, 8)).astype(np.float32)
    table = _table(n, rng.random((n, 3)) < 0.4, vectors=v)
    ids = np.stack([rng.permutation(table.item_ids) for _ in range(3)])
    sc = -np.sort(-rng.normal(size=ids.shape), axis=1).astype(np.float32)
    plain = apply_rules(ids, sc, 15, Rules(), table)
    for rules in (Rules(mmr_lambda=1.0), Rules(mmr_lambda=1.0, max_per_genre=99)):   # the second: greedy path
        for a, b in zip(apply_rules(ids, sc, 15, rules, table), plain):
            np.testing.assert_array_equal(a, b)
    diverse = apply_rules(ids, sc, 15, Rules(mmr_lambda=0.3), table)[0]
    assert diverse[0].tolist() == _reference_greedy(ids[0], sc[0], 15, Rules(mmr_lambda=0.3), table)
    assert not np.array_equal(diverse, plain[0])


# ---- freshness ----

def test_freshness_boost_reorders_towards_newer_items_in_proportion():
    ids, sc = _ranked(3, scores=[1.0, 0.8, 0.7])
    table = _table(3, year=[0, 5, 10])                                 # f = 0, 0.5, 1
    assert apply_rules(ids, sc, 3, Rules(freshness=0.25), table)[0].tolist() == [[10, 30, 20]]  # 1, .925, .95
    assert apply_rules(ids, sc, 3, Rules(freshness=0.5), table)[0].tolist() == [[30, 20, 10]]   # 1, 1.05, 1.2


def test_freshness_is_normalised_over_the_catalogue_not_the_row():
    table = _table(4, year=[10, 12, 14, 30])                        # item 40 (not in the row) sets the max
    ids, sc = _ranked(3, scores=[1.0, 0.95, 0.9])
    # f = 0, .1, .2 (not 0, .5, 1 as a row-wise normalisation would give)
    assert apply_rules(ids, sc, 3, Rules(freshness=1.0), table)[0].tolist() == [[30, 20, 10]]  # 1, 1.05, 1.1
    assert apply_rules(ids, sc, 3, Rules(freshness=0.4), table)[0].tolist() == [[10, 20, 30]]  # 1, .99, .98


def test_zero_freshness_and_all_zero_years_are_no_ops():
    ids, sc = _ranked(5, scores=[0.5, 0.4, 0.3, 0.2, 0.1])
    newest_last = _table(5, year=[1, 2, 3, 4, 5])
    assert apply_rules(ids, sc, 5, Rules(freshness=0.0, max_per_genre=9), newest_last)[0].tolist() == [ids[0].tolist()]
    assert apply_rules(ids, sc, 5, Rules(freshness=5.0), _table(5))[0].tolist() == [ids[0].tolist()]
    assert apply_rules(ids, sc, 5, Rules(freshness=5.0), newest_last)[0].tolist() == [ids[0, ::-1].tolist()]


# ---- seeds ----

def test_same_seed_same_output_different_seeds_differ():
    ids, sc = _ranked(30, b=2, scores=np.zeros(30))
    for explore in ("epsilon", "softmax"):
        rules = Rules(explore=explore, epsilon=0.9, seed=7)
        a, b = apply_rules(ids, sc, 8, rules, None), apply_rules(ids, sc, 8, rules, None)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a[0][0], a[0][1])                  # rows draw from their own streams
        outs = {tuple(apply_rules(ids, sc, 8, dataclasses.replace(rules, seed=s), None)[0][0]) for s in range(4)}
        assert len(outs) > 1
        unseeded = {tuple(apply_rules(ids, sc, 8, dataclasses.replace(rules, seed=None), None)[0][0])
                    for _ in range(3)}
        assert len(unseeded) > 1


def test_a_row_draws_depend_on_seed_and_row_index_not_on_batch_size_or_k():
    ids, sc = _ranked(20, b=3, scores=np.linspace(1, 0, 20))
    rules = Rules(explore="softmax", temperature=0.3, seed=11)
    one = apply_rules(ids[:1], sc[:1], 6, rules, None)
    three = apply_rules(ids, sc, 6, rules, None)
    longer = apply_rules(ids[:1], sc[:1], 9, rules, None)
    for x, y, z in zip(one, three, longer):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[0], z[0, :6])


# ---- exploration: distributions and propensities ----

DRAWS = 20_000


def test_epsilon_greedy_first_position_distribution_and_propensities():
    n, eps = 10, 0.3
    ids, sc = _ranked(n, b=DRAWS)
    got_ids, _, prop = apply_rules(ids, sc, 2, Rules(explore="epsilon", epsilon=eps, seed=2024), None)
    stated = np.full(n, eps / n)
    stated[0] += 1 - eps
    counts = np.bincount(got_ids[:, 0] // 10 - 1, minlength=n)
    assert chisquare(counts, DRAWS * stated).pvalue > 0.001
    np.testing.assert_allclose(prop[:, 0], stated[got_ids[:, 0] // 10 - 1], rtol=1e-6)
    # second position: the greedy item is the best one not yet taken, 9 allowed
    first_pos = got_ids[:, 0] // 10 - 1
    second_greedy = np.where(first_pos == 0, 1, 0)
    want = np.where(got_ids[:, 1] // 10 - 1 == second_greedy, 1 - eps + eps / 9, eps / 9)
    np.testing.assert_allclose(prop[:, 1], want, rtol=1e-6)
    assert len(np.unique(got_ids, axis=1)) == DRAWS and (got_ids[:, 0] != got_ids[:, 1]).all()


def test_epsilon_zero_is_greedy_and_one_is_uniform_over_the_allowed_set():
    genres = [[1, 0], [1, 0], [0, 0], [1, 0]]
    ids, sc = _ranked(4, b=4000)
    table = _table(4, genres)
    greedy = apply_rules(ids, sc, 3, Rules(explore="epsilon", epsilon=0.0, max_per_genre=1, seed=1), table)
    assert (greedy[0] == [10, 30, PAD_ID]).all() and (greedy[2] == [1, 1, 0]).all()
    uniform = apply_rules(ids, sc, 2, Rules(explore="epsilon", epsilon=1.0, max_per_genre=1, seed=1), table)
    # after a genre-A first item only item 30 (no genre) is allowed: the second pick is forced
    after_a = uniform[0][:, 0] != 30
    assert (uniform[0][after_a, 1] == 30).all() and (uniform[2][after_a, 1] == 1.0).all()
    np.testing.assert_allclose(uniform[2][:, 0], 0.25)


def _softmax(x):
    w = np.exp(x - x.max())
    return w / w.sum()


def test_softmax_first_position_distribution_and_second_position_given_the_first():
    n, temp = 10, 0.5
    scores = np.linspace(1.0, -1.0, n)
    ids, sc = _ranked(n, b=DRAWS, scores=scores)
    got_ids, _, prop = apply_rules(ids, sc, 2, Rules(explore="softmax", temperature=temp, seed=99), None)
    p1 = _softmax(sc[0].astype(np.float64) / temp)
    first = got_ids[:, 0] // 10 - 1
    assert chisquare(np.bincount(first, minlength=n), DRAWS * p1).pvalue > 0.001
    np.testing.assert_allclose(prop[:, 0], p1[first], rtol=1e-5)
    given = first == 0                                                   # Plackett-Luce: item 0 removed
    p2 = _softmax(sc[0, 1:].astype(np.float64) / temp)
    second = got_ids[given, 1] // 10 - 2
    assert chisquare(np.bincount(second, minlength=n - 1), given.sum() * p2).pvalue > 0.001
    np.testing.assert_allclose(prop[given, 1], p2[second], rtol=1e-5)


@pytest.mark.parametrize("explore", ["epsilon", "softmax"])
def test_propensities_match_the_reference_policy_with_every_rule_on(explore):
    rng = np.random.default_rng(8)
    n = 25
    table = _table(n, rng.random((n, 3)) < 0.4, rng.integers(0, 9, n), rng.normal(size=(n, 4)).astype(np.float32))
    ids = np.stack([rng.permutation(table.item_ids) for _ in range(6)])
    ids[0, 20:] = PAD_ID
    sc = -np.sort(-rng.normal(size=ids.shape), axis=1).astype(np.float32)
    rules = Rules(exclude=(int(ids[1, 0]),), max_per_genre=2, mmr_lambda=0.7, freshness=0.5,
                  explore=explore, epsilon=0.4, temperature=0.7, seed=5)
    got_ids, got_sc, prop = apply_rules(ids, sc, 10, rules, table)
    for r in range(len(ids)):
        np.testing.assert_allclose(prop[r], _reference_propensity(ids[r], sc[r], got_ids[r], rules, table),
                                   rtol=1e-5, atol=1e-7)
        kept = got_ids[r] >= 0
        assert len(set(got_ids[r][kept].tolist())) == kept.sum() and int(ids[1, 0]) not in got_ids[r]
        lookup = dict(zip(ids[r].tolist(), sc[r].tolist()))
        np.testing.assert_array_equal(got_sc[r][kept], [lookup[i] for i in got_ids[r][kept]])


# ---- validation, parsing ----

@pytest.mark.parametrize("field,value", [
    ("epsilon", -0.1), ("epsilon", 1.5), ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("inf")),
    ("mmr_lambda", 1.2), ("mmr_lambda", -0.5), ("max_per_genre", -1), ("max_per_genre", 1.5),
    ("explore", "greedy"), ("freshness", float("nan")), ("freshness", float("inf")), ("seed", -3),
    ("exclude", ("a",)),
])
def test_validate_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Rules(**{field: value})
    bad = object.__new__(Rules)                                # validate() on its own, bypassing __post_init__
    for f in dataclasses.fields(Rules):
        object.__setattr__(bad, f.name, f.default)
    if field != "exclude":
        object.__setattr__(bad, field, value)
        with pytest.raises(ValueError, match=field):
            bad.validate()


def test_validate_accepts_the_bounds():
    Rules(epsilon=0.0, mmr_lambda=0.0, explore="epsilon").validate()
    Rules(epsilon=1.0, mmr_lambda=1.0, temperature=1e-3, freshness=-2.0, max_per_genre=3, seed=0).validate()
    assert Rules(exclude=[5, 3, 5]).exclude == (3, 5)


def test_parse_explore():
    assert Rules.parse_explore("epsilon:0.2") == {"explore": "epsilon", "epsilon": 0.2}
    assert Rules.parse_explore("softmax:0.5") == {"explore": "softmax", "temperature": 0.5}
    assert Rules.parse_explore(" none ") == {"explore": "none"}
    assert dataclasses.replace(Rules(), **Rules.parse_explore("softmax:2")).temperature == 2.0
    for text, field in [("eps", "explore"), ("epsilon", "explore"), ("none:1", "explore"), ("epsilon:x", "epsilon"),
                        ("epsilon:2", "epsilon"), ("softmax:0", "temperature"), ("softmax:-1", "temperature")]:
        with pytest.raises(ValueError, match=field):
            Rules.parse_explore(text)


def test_deterministic_only_without_exploration():
    assert Rules().deterministic and Rules(max_per_genre=2, mmr_lambda=0.5, freshness=1.0).deterministic
    assert not Rules(explore="epsilon").deterministic and not Rules(explore="softmax", seed=3).deterministic


# ---- inputs ----

def test_item_table_rows_and_build():
    table = ItemTable.build([30, 10, 20], [[0, 1], [1, 0], [1, 1]], [3, 1, 2])
    assert table.item_ids.tolist() == [10, 20, 30] and table.year.tolist() == [1, 2, 3]
    assert table.genres.tolist() == [[1, 0], [1, 1], [0, 1]]
    assert table.rows(np.array([[20, 99], [PAD_ID, 10]])).tolist() == [[1, -1], [-1, 0]]
    with pytest.raises(ValueError, match="increasing"):
        ItemTable(np.array([2, 1]), np.zeros((2, 1)), np.zeros(2))
    with pytest.raises(ValueError, match="genres"):
        ItemTable(np.array([1, 2]), np.zeros((3, 1)), np.zeros(2))


def test_rules_that_read_metadata_need_a_table_and_shapes_must_match():
    ids, sc = _ranked(3)
    with pytest.raises(ValueError, match="ItemTable"):
        apply_rules(ids, sc, 2, Rules(max_per_genre=1), None)
    with pytest.raises(ValueError, match="scores"):
        apply_rules(ids, sc[:, :2], 2, Rules(), None)
    assert apply_rules(ids[:0], sc[:0], 2, Rules(explore="softmax", seed=1), None)[0].shape == (0, 2)
