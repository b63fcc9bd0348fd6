"""The index benchmark: synthetic vectors, the sweep's result and choice, rebuilding the choice, the CLI, sharding."""

from __future__ import annotations

import importlib.util
import json

import faiss
import numpy as np
import pytest

from recserve import bench_index as bi

pytestmark = pytest.mark.unit

FAST = {"repeats": 1, "min_time_s": 0.0}  # timing passes: one each, speed is not under test


@pytest.fixture(scope="module")
def small():
    items, queries = bi.synthetic_catalogue(20_000, 200, dim=64, seed=1)
    return items, queries


@pytest.fixture(scope="module")
def swept(small):
    items, queries = small
    return bi.choose_index(items, queries, target_recall=0.95, k=100, threads=2, force=True, **FAST)


def _unit_gaussian(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_synthetic_catalogue_is_deterministic_unit_norm_and_held_out():
    a_items, a_q = bi.synthetic_catalogue(5000, 300, dim=32, seed=4)
    b_items, b_q = bi.synthetic_catalogue(5000, 300, dim=32, seed=4)
    c_items, _ = bi.synthetic_catalogue(5000, 300, dim=32, seed=5)
    d_items, _ = bi.synthetic_catalogue(5000, 10, dim=32, seed=4)
    assert a_items.shape == (5000, 32) and a_q.shape == (300, 32)
    assert a_items.dtype == np.float32 and a_q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a_items, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a_q, axis=1), 1, atol=1e-5)
    assert np.array_equal(a_items, b_items) and np.array_equal(a_q, b_q)
    assert not np.allclose(a_items, c_items)
    assert np.array_equal(a_items, d_items)            # items do not depend on how many queries are drawn
    assert (a_q @ a_items.T).max() < 0.9999            # queries are not catalogue items


def test_synthetic_catalogue_is_clustered_not_isotropic():
    items, queries = bi.synthetic_catalogue(20_000, 200, dim=64, seed=0)
    iso = _unit_gaussian(20_000, 64, 0)
    top = lambda x: np.sort(queries @ x.T, axis=1)[:, -10:].mean()  # noqa: E731
    assert top(items) > top(iso) + 0.3                 # queries have close neighbours, unlike iid gaussian
    spectrum = np.linalg.svd(items - items.mean(0), compute_uv=False) ** 2
    assert spectrum[:8].sum() / spectrum.sum() > 2 * 8 / 64   # anisotropic: leading directions carry more


def test_recall_at_k_counts_shared_ids_and_never_minus_one():
    want = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    got = np.array([[4, 3, 9, -1], [8, 7, 6, 5]])
    assert bi.recall_at_k(got, want) == pytest.approx(6 / 8)
    assert bi.recall_at_k(np.full((1, 2), -1), np.array([[-1, 0]])) == 0.0


def test_sweep_result_structure_recalls_and_choice(swept):
    r = swept
    assert {"items", "dim", "threads", "queries", "exact", "chosen", "runs"} <= set(r)
    assert (r["items"], r["dim"], r["threads"], r["queries"]) == (20_000, 64, 2, 200)
    assert {"qps", "bytes_per_item", "build_s"} <= set(r["exact"]) and r["exact"]["qps"] > 0
    assert r["exact"]["bytes_per_item"] >= 64 * 4      # a flat index stores every float
    exact = [x for x in r["runs"] if x["kind"] == "flat"]
    assert len(exact) == 1 and exact[0]["recall@100"] == 1.0
    assert {x["kind"] for x in r["runs"]} == {"flat", "ivf", "ivfpq", "hnsw"}
    for x in r["runs"]:
        assert {"kind", "params", "qps", "recall@100", "bytes_per_item", "build_s"} <= set(x)
        assert 0.0 <= x["recall@100"] <= 1.0 and x["qps"] > 0 and x["bytes_per_item"] > 0
    pq = [x for x in r["runs"] if x["kind"] == "ivfpq"]
    assert pq[0]["bytes_per_item"] < exact[0]["bytes_per_item"] / 3   # 32-byte codes against 256-byte vectors
    ivf = [x["recall@100"] for x in r["runs"] if x["kind"] == "ivf"]
    assert ivf == sorted(ivf) and ivf[0] < 0.95 <= ivf[-1]             # more probes, more recall
    c = r["chosen"]
    ok = [x for x in r["runs"] if x["recall@100"] >= 0.95]
    assert c["recall@100"] >= 0.95
    assert c["qps"] == max(x["qps"] for x in ok)
    assert (c["kind"], c["params"]) in [(x["kind"], x["params"]) for x in ok if x["qps"] == c["qps"]]
    json.dumps(r)                                     # plain JSON types throughout


def test_build_chosen_reproduces_the_chosen_recall(small, swept):
    items, queries = small
    for chosen in (swept["chosen"], next(x for x in swept["runs"] if x["kind"] == "ivf" and x["recall@100"] >= 0.9)):
        index = bi.build_chosen(items, chosen)
        assert index.ntotal == len(items)
        exact = faiss.IndexFlatIP(items.shape[1])
        exact.add(items)
        _, want = exact.search(queries, 100)
        _, got = index.search(queries, 100)
        assert bi.recall_at_k(got, want) == pytest.approx(chosen["recall@100"], abs=0.02)


def test_build_chosen_sets_the_search_parameter(small):
    items, _ = small
    ivf = bi.build_chosen(items[:5000], {"kind": "ivf", "params": {"nlist": 64, "nprobe": 7}})
    hnsw = bi.build_chosen(items[:2000], {"kind": "hnsw", "params": {"M": 8, "efSearch": 123}})
    assert faiss.extract_index_ivf(ivf).nprobe == 7 and faiss.extract_index_ivf(ivf).nlist == 64
    assert hnsw.hnsw.efSearch == 123


def test_small_catalogue_shortcut_returns_exact_flat(small):
    items, queries = small
    r = bi.choose_index(items[:5000], queries[:50], **FAST)
    assert r["chosen"]["kind"] == "flat" and [x["kind"] for x in r["runs"]] == ["flat"]
    assert "exact_below" in r["chosen"]["reason"]
    swept = bi.choose_index(items[:5000], queries[:50], exact_below=1000, kinds=("flat", "ivf"), **FAST)
    assert "ivf" in {x["kind"] for x in swept["runs"]}


def test_exact_is_chosen_when_no_approximate_run_reaches_the_target(small):
    items, queries = small
    r = bi.choose_index(items[:5000], queries[:50], target_recall=0.99, kinds=("flat", "ivf"), force=True,
                        sweeps={"ivf": [{"nlist": 64, "nprobe": 1}]}, **FAST)
    assert r["runs"][1]["recall@100"] < 0.99
    assert r["chosen"]["kind"] == "flat" and "no approximate run" in r["chosen"]["reason"]


def test_budget_skips_the_remaining_sweep(small):
    items, queries = small
    r = bi.choose_index(items[:5000], queries[:50], budget_s=0.0, force=True, **FAST)
    assert [x["kind"] for x in r["runs"]] == ["flat"] and r["skipped"]


def test_main_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bi.main(["--items", "4000", "--n-queries", "40", "--kinds", "flat,ivf", "--threads", "1",
                      "--repeats", "1", "--min-time-s", "0", "--json", str(out_json), "--png", str(out_png)])
    saved = json.loads(out_json.read_text())
    assert saved["items"] == 4000 and saved["queries"] == 40 and saved["threads"] == 1
    assert saved["chosen"] == result["chosen"] and len(saved["runs"]) > 1
    assert "IVF-Flat" in capsys.readouterr().out       # the table was printed
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: no PNG")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_benchmarks_vector_files(tmp_path):
    items, queries = _unit_gaussian(3000, 16, 2) * 3, _unit_gaussian(80, 16, 3)   # items not unit-norm yet
    np.save(tmp_path / "items.npy", items)
    np.save(tmp_path / "queries.npy", queries)
    r = bi.main(["--vectors", str(tmp_path / "items.npy"), "--queries", str(tmp_path / "queries.npy"),
                 "--n-queries", "50", "--kinds", "flat", "--repeats", "1", "--min-time-s", "0"])
    assert (r["items"], r["dim"], r["queries"]) == (3000, 16, 50)


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_flat_search_equals_one_flat_index(n_shards):
    items, queries = _unit_gaussian(3001, 32, 7), _unit_gaussian(64, 32, 8)   # continuous: no tied scores
    single = faiss.IndexFlatIP(32)
    single.add(items)
    want_d, want_i = single.search(queries, 50)
    shards = bi.shard_index(items, n_shards)
    assert shards.ntotal == len(items) and shards.count() == n_shards
    got_d, got_i = shards.search(queries, 50)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
    parts = [faiss.IndexFlatIP(32) for _ in range(n_shards)]
    for part, rows in zip(parts, np.array_split(items, n_shards)):
        part.add(rows)
    apart_d, apart_i = bi.sharded_search(parts, queries, 50)
    np.testing.assert_array_equal(apart_i, want_i)
    np.testing.assert_allclose(apart_d, want_d, rtol=1e-5, atol=1e-6)


def test_sharded_ivf_shares_one_trained_quantiser():
    items, queries = bi.synthetic_catalogue(8000, 50, dim=32, seed=2)
    shards = bi.shard_index(items, 2, {"kind": "ivf", "params": {"nlist": 32, "nprobe": 32}})   # every list: exact
    q0, q1 = (faiss.extract_index_ivf(shards.at(i)).quantizer for i in range(2))
    assert np.array_equal(faiss.vector_to_array(faiss.downcast_index(q0).codes),
                          faiss.vector_to_array(faiss.downcast_index(q1).codes))
    exact = faiss.IndexFlatIP(32)
    exact.add(items)
    _, want = exact.search(queries, 20)
    _, got = shards.search(queries, 20)
    assert bi.recall_at_k(got, want) == 1.0
