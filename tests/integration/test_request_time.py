"""Request-time behaviours of the served `recommend` (real server): cold start with its source, rules applied
after ranking, seeded exploration with propensities, the client's fallback file and caches."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests

from recserve.client import RecClient
from recserve.data.dataset import Dataset
from recserve.errors import ServerError
from recserve.server import free_port

PROTOCOLS = ("grpc", "http")
UNKNOWN = 987654321


@pytest.fixture(scope="module")
def known(served) -> list[int]:
    return np.load(served.repository / "retrieval" / "1" / "users.npz")["user_ids"][:5].tolist()


@pytest.fixture(scope="module")
def catalogue(served):
    ds = Dataset.load(served.artifacts / "dataset.npz")
    return {int(i): (ds.item_genres[r] > 0, int(ds.item_year[r])) for r, i in enumerate(ds.item_ids)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_unknown_user_gets_popular_items_with_their_source(served, protocol):
    with RecClient(served.url(protocol), protocol) as client:
        answers = [client.recommend(UNKNOWN + i, k=5, hour=12, weekday=2) for i in range(20)]
    assert all(a.source == "popular" and len(a.items) == 5 for a in answers)
    assert len({tuple(a.item_ids) for a in answers}) == 1, "the same context gives the same popular list"


def test_popular_depends_on_the_request_context(served):
    with RecClient(served.url("grpc")) as client:
        lists = {tuple(client.recommend(UNKNOWN, k=10, hour=h, weekday=w).item_ids) for h in (0, 8, 16) for w in (0, 5)}
    assert len(lists) > 1


def test_a_segment_gets_popular_items_of_that_segment(served):
    ds = Dataset.load(served.artifacts / "dataset.npz")
    with RecClient(served.url("grpc")) as client:
        base = client.recommend(UNKNOWN, k=10, hour=12, weekday=2)
        segs = [client.recommend(UNKNOWN, k=10, hour=12, weekday=2, segment=[v] + [0] * (ds.user_cats.shape[1] - 1))
                for v in range(1, len(ds.user_cat_vocab[ds.user_cat_names[0]]))]
    assert all(s.source == "segment" for s in segs)
    assert any(s.item_ids != base.item_ids for s in segs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_unknown_user_with_a_history_gets_personalised_items_without_those(served, protocol, known):
    with RecClient(served.url(protocol), protocol) as client:
        popular = client.recommend(UNKNOWN, k=10, hour=12, weekday=2)
        ids = client.recommend(known[0], k=3).item_ids
        rec = client.recommend(UNKNOWN, k=10, hour=12, weekday=2, history=ids)
    assert rec.source == "history" and len(rec.items) == 10
    assert not set(ids) & set(rec.item_ids)
    assert rec.item_ids != popular.item_ids


def test_excluded_items_never_come_back_and_the_rest_keeps_its_order(served, known):
    with RecClient(served.url("grpc")) as client:
        plain = client.recommend(known[0], k=8).item_ids
        ruled = client.recommend(known[0], k=6, exclude=plain[:2]).item_ids
    assert not set(plain[:2]) & set(ruled)
    assert ruled[:6] == [i for i in plain if i not in plain[:2]][:6]


def test_max_per_genre_caps_every_genre_in_the_top_k(served, known, catalogue):
    with RecClient(served.url("grpc")) as client:
        for user in known:
            rec = client.recommend(user, k=10, max_per_genre=2)
            counts = np.sum([catalogue[i][0] for i in rec.item_ids], axis=0)
            assert counts.max() <= 2, (user, counts)


def test_mmr_and_freshness_reorder_and_stay_deterministic(served, known, catalogue):
    with RecClient(served.url("grpc")) as client:
        plain = client.recommend(known[1], k=10).item_ids
        mmr = client.recommend(known[1], k=10, mmr_lambda=0.0).item_ids
        fresh = client.recommend(known[1], k=10, freshness=50.0).item_ids
        assert client.recommend(known[1], k=10, mmr_lambda=0.0).item_ids == mmr
    assert mmr[0] == plain[0] and mmr != plain       # the best item first, then the least similar ones
    years = lambda ids: np.mean([catalogue[i][1] for i in ids])  # noqa: E731
    assert years(fresh) >= years(plain)


@pytest.mark.parametrize("explore", ["epsilon:0.5", "softmax:1.0"])
def test_exploration_is_reproducible_from_its_seed_and_carries_propensities(served, known, explore):
    with RecClient(served.url("grpc")) as client:
        a = client.recommend(known[0], k=10, explore=explore, seed=11)
        b = client.recommend(known[0], k=10, explore=explore, seed=11)
        others = {tuple(client.recommend(known[0], k=10, explore=explore, seed=s).item_ids) for s in range(12, 20)}
    assert a.item_ids == b.item_ids
    assert len(others) > 1
    props = [it.propensity for it in a.items]
    assert all(p is not None and 0 < p <= 1 for p in props)
    assert json.loads(a.to_json())["items"][0]["propensity"] == props[0]


def test_epsilon_greedy_first_item_follows_the_stated_distribution(served, known):
    """Many seeded draws at the server: the greedy item comes first with probability 1 - eps + eps / n."""
    from scipy.stats import binomtest

    eps, draws = 0.5, 200
    with RecClient(served.url("grpc")) as client:
        greedy = client.recommend(known[2], k=1).item_ids[0]
        recs = [client.recommend(known[2], k=1, explore=f"epsilon:{eps}", seed=s) for s in range(draws)]
    stated = recs[0].items[0].propensity if recs[0].item_ids[0] == greedy else None
    firsts = [r.item_ids[0] for r in recs]
    hits = sum(f == greedy for f in firsts)
    p_greedy = next(r.items[0].propensity for r in recs if r.item_ids[0] == greedy)
    assert stated is None or stated == p_greedy
    assert 1 - eps < p_greedy <= 1
    assert binomtest(hits, draws, p_greedy).pvalue > 0.001, (hits, draws, p_greedy)


def test_the_client_ttl_cache_skips_the_server_for_a_repeated_request(served, known):
    with RecClient(served.url("grpc"), cache_ttl=60) as client:
        a = client.recommend(known[4], k=5, hour=3, weekday=3)
        b = client.recommend(known[4], k=5, hour=3, weekday=3)
        client.recommend(known[4], k=5, explore="epsilon:0.1")      # exploring: never cached
        client.recommend(known[4], k=5, explore="epsilon:0.1")
    assert a is b and client.cache_hits == 1 and client.cache_misses == 1


def test_sources_are_counted_in_the_servers_metrics(served):
    metrics = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
    with RecClient(served.url("grpc")) as client:
        client.recommend(UNKNOWN, k=3, hour=1, weekday=1)
    text = requests.get(metrics, timeout=5).text
    assert 'recserve_responses_total{source="popular"}' in text
    assert 'recserve_responses_total{source="personalized"}' in text


def test_an_unreachable_server_is_answered_from_the_fallback_file_in_bounded_time(served):
    fallback = served.repository / "fallback.json"
    t0 = time.monotonic()
    with RecClient(f"127.0.0.1:{free_port()}", "grpc", timeout=1.0, fallback=fallback) as client:
        rec = client.recommend(1, k=5)
        assert client.fallbacks == 1                                # counted, as the server counts its own
    took = time.monotonic() - t0
    assert rec.source == "fallback" and len(rec.items) == 5
    assert rec.item_ids == [i["item_id"] for i in json.loads(fallback.read_text())["items"][:5]]
    assert took < 5.0
    with RecClient(f"127.0.0.1:{free_port()}", "http", timeout=1.0) as client, pytest.raises(ServerError):
        client.recommend(1, k=5)                                    # without the file: the error, as before


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("options", [
    {"exclude": "first"}, {"max_per_genre": 1}, {"mmr_lambda": 0.5}, {"freshness": 2.0},
    {"max_per_genre": 2, "mmr_lambda": 0.7, "freshness": 0.5, "exclude": "first"},
    {"explore": "epsilon:0.3", "seed": 11}, {"explore": "softmax:0.5", "seed": 3, "max_per_genre": 2},
])
def test_the_client_pipeline_applies_the_rules_and_exploration_as_recommend_does(served, known, protocol, options):
    changed = []
    with RecClient(served.url(protocol), protocol) as client:
        for user in known:
            opts = dict(options)
            if opts.get("exclude") == "first":
                opts["exclude"] = client.recommend(user, k=3, hour=9, weekday=1).item_ids[:2]
            ens = client.recommend(user, k=8, hour=9, weekday=1, **opts)
            pipe = client.recommend(user, k=8, hour=9, weekday=1, mode="pipeline", **opts)
            assert pipe.item_ids == ens.item_ids and pipe.source == ens.source == "personalized"
            np.testing.assert_allclose([i.score for i in pipe.items], [i.score for i in ens.items], rtol=1e-5)
            if "explore" in opts:
                np.testing.assert_allclose([i.propensity for i in pipe.items], [i.propensity for i in ens.items],
                                           rtol=1e-6)
            plain = client.recommend(user, k=8, hour=9, weekday=1, mode="pipeline")
            assert "exclude" not in opts or not set(opts["exclude"]) & set(pipe.item_ids)
            assert len(pipe.items) == 8
            changed.append(plain.item_ids != pipe.item_ids)
    assert any(changed), "the options changed no list: the comparison above proves nothing"


def test_the_client_pipeline_answers_a_user_the_model_never_saw_as_recommend_does(served):
    items = np.load(served.repository / "catalogue" / "1" / "items.npz")["item_ids"][:3].tolist()
    with RecClient(served.url("grpc")) as client:
        for extra in ({"history": items}, {"segment": [1]}, {}):
            pipe = client.recommend(UNKNOWN, k=5, hour=4, weekday=1, mode="pipeline", exclude=items[:1], **extra)
            ens = client.recommend(UNKNOWN, k=5, hour=4, weekday=1, exclude=items[:1], **extra)
            assert pipe.source == ens.source and pipe.item_ids == ens.item_ids and len(pipe.items) == 5
            assert pipe.source == {"history": "history", "segment": "segment"}.get(next(iter(extra), ""), "popular")


def test_a_request_gets_only_the_outputs_it_names_and_all_when_it_names_none(served, known):
    url = f"http://{served.url('http')}/v2/models/recommend/infer"
    inputs = [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [known[0]]},
              {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [5]}]
    some = requests.post(url, json={"inputs": inputs, "outputs": [{"name": "item_ids"}, {"name": "version"}]},
                         timeout=10).json()
    every = requests.post(url, json={"inputs": inputs}, timeout=10).json()
    assert [o["name"] for o in some["outputs"]] == ["item_ids", "version"]
    assert {o["name"] for o in every["outputs"]} == {"item_ids", "scores", "source", "propensity", "version"}
    item_ids = lambda doc: next(o["data"] for o in doc["outputs"] if o["name"] == "item_ids")  # noqa: E731
    assert item_ids(some) == item_ids(every) and len(item_ids(some)) == 5
    assert next(o["data"] for o in some["outputs"] if o["name"] == "version") == [str(served.manifest["model_version"])]
