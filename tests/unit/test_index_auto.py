"""`--index auto` (choose_index on the repository's own items and user queries), explicit HNSW / IVF repositories
served through the Retriever, and `recserve bench index`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from recserve import bench_index as bi
from recserve.cli import app
from recserve.errors import ArtifactError
from recserve.export.index import IndexSpec, auto_index, build_index, describe, recall_vs_exact
from recserve.serving.local import LocalPipeline
from recserve.serving.repository import RepoOptions, write_repository

pytestmark = pytest.mark.unit

FAST = {"repeats": 1, "min_time_s": 0.0}   # one timing pass per run: speed is not under test
# where the choice rests on speed: the best of 3 passes (a single cold pass, the first of the process, or one on
# a busy machine can make a 10x faster index look slower than exact)
TIMED = {"repeats": 3, "min_time_s": 0.0}
CANDIDATES = 60                            # K of the tiny repositories (240 items): the search is not all items
# Served ANN against served exact Flat on the tiny fixture: the top-10 of each user shares >= 90% of its items,
# averaged over all users (measured: 1.0 for HNSW, whose efSearch >= the search size makes it exact on 240 items;
# 0.96 for IVF searching 3 of 6 cells, the neighbour and popularity quotas and the ranker making up for it).
MIN_TOP10_OVERLAP = 0.9


@pytest.fixture(scope="module")
def catalogue():
    return bi.synthetic_catalogue(30_000, 300, dim=64, seed=3)


@pytest.fixture(scope="module")
def repos(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("index_repos")
    specs = {"auto": IndexSpec("auto"), "flat": IndexSpec("flat"), "hnsw": IndexSpec("hnsw"),
             "ivf": IndexSpec("ivf", nlist=6, nprobe=3)}
    for name, s in specs.items():
        write_repository(tiny_artifacts, root / name, RepoOptions(candidates=CANDIDATES, index=s))
    sharded = {"flat_2_shards": (IndexSpec("flat"), 2), "ivf_3_shards": (IndexSpec("ivf", nlist=6, nprobe=6), 3)}
    for name, (s, n) in sharded.items():
        write_repository(tiny_artifacts, root / name, RepoOptions(candidates=CANDIDATES, index=s, shards=n))
    return {name: root / name for name in [*specs, *sharded]}


def _index_info(repository: Path) -> dict:
    return json.loads((repository / "manifest.json").read_text())["index"]


# ------------------------------------------------------------------------------------------------ (a) small: exact
def test_auto_on_the_tiny_fixture_is_exact_flat_with_recall_one(repos):
    info = _index_info(repos["auto"])
    assert info["spec"] == {"kind": "flat"}
    assert info["recall_vs_exact"] == 1.0 and info["recall_k"] == 100
    assert info["auto"]["kind"] == "flat" and info["auto"]["recall@100"] == 1.0 and info["auto"]["qps"] > 0
    assert "exact_below" in info["auto"]["reason"] and info["auto"]["runs"] == 1
    assert info["queries"] == info["auto"]["queries"] > 0            # chosen on the queries recall is reported on
    index = faiss.read_index(str(repos["auto"] / "retrieval" / "1" / "index.faiss"))
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == info["n_items"]
    assert json.loads((repos["auto"] / "retrieval" / "1" / "index.json").read_text()) == info


def test_explicit_kinds_record_no_auto_choice_and_describe_only_their_parameters(repos):
    assert "auto" not in _index_info(repos["flat"]) and _index_info(repos["flat"])["spec"] == {"kind": "flat"}
    assert _index_info(repos["ivf"])["spec"] == {"kind": "ivf", "nlist": 6, "nprobe": 3}
    assert describe(IndexSpec("ivfpq", 64, 4, 8).resolved(10_000)) == {"kind": "ivfpq", "nlist": 64, "nprobe": 4,
                                                                       "pq_m": 8}
    assert describe(IndexSpec("auto").resolved(10)) == {"kind": "flat"}
    with pytest.raises(ArtifactError, match="--index 'annoy'"):
        RepoOptions(index=IndexSpec("annoy")).validate()


# ------------------------------------------------------------------------------------------- (b) large: approximate
def test_auto_above_the_threshold_picks_an_ann_index_that_reproduces_its_recall(catalogue):
    items, queries = catalogue
    sweeps = {"ivf": [{"nlist": 256, "nprobe": p} for p in (4, 8, 16, 32)],
              "hnsw": [{"M": 16, "efConstruction": 40, "efSearch": e} for e in (100, 150, 200)]}
    index, spec, report = auto_index(items, queries, k=100, target_recall=0.95, threads=2,
                                     kinds=("flat", "ivf", "hnsw"), sweeps=sweeps, **TIMED)
    assert len(items) >= bi.EXACT_BELOW and report["runs"] > 1
    assert spec.kind in ("ivf", "hnsw") and report["kind"] == spec.kind
    assert report["recall@100"] >= 0.95 and report["speedup_vs_exact"] > 1
    assert spec.params() == {k: v for k, v in report["params"].items() if k in spec.params()}
    assert index.ntotal == len(items)
    assert recall_vs_exact(index, items, queries, 100) == pytest.approx(report["recall@100"], abs=0.01)


def test_auto_hnsw_keeps_its_measured_ef_ratio_at_the_served_search_size(catalogue):
    items, queries = catalogue
    sweeps = {"hnsw": [{"M": 16, "efConstruction": 40, "efSearch": e} for e in (100, 150, 200)]}
    index, spec, report = auto_index(items, queries[:200], k=100, fetch_k=400, threads=2, kinds=("flat", "hnsw"),
                                     sweeps=sweeps, **TIMED)
    assert spec.kind == "hnsw" and report["params"]["efSearch"] in (100, 150, 200)
    served = report["served"]
    assert served["fetch_k"] == 400 and served["params"] == spec.params() and spec.efSearch == index.hnsw.efSearch
    scaled = math.ceil(report["params"]["efSearch"] * 400 / 100)   # the measured ratio, then x1.5 per raise
    assert spec.efSearch >= scaled and (served["raised"] > 0) == (spec.efSearch > scaled)
    assert served["recall@fetch_k"] >= 0.95 and served["qps"] > 0 and served["exact_qps"] > 0
    assert recall_vs_exact(index, items, queries[:200], 400) == pytest.approx(served["recall@fetch_k"], abs=1e-4)


def test_hnsw_efsearch_covers_the_served_search_because_faiss_returns_short_otherwise(catalogue):
    items, queries = catalogue
    index = bi.build_chosen(items[:5000], {"kind": "hnsw", "params": {"M": 16, "efSearch": 16}})
    _, ids = index.search(queries[:50], 200)
    assert (ids < 0).any()                                  # efSearch 16 < k 200: the results come back short
    assert IndexSpec("hnsw").resolved(30_000, fetch_k=700).efSearch == math.ceil(1.5 * 700)
    assert IndexSpec("hnsw", efSearch=200).resolved(30_000, fetch_k=700).efSearch == 700   # never below the search
    assert IndexSpec("hnsw", efSearch=900).resolved(30_000, fetch_k=700).efSearch == 900
    assert IndexSpec("hnsw").resolved(300, fetch_k=700).efSearch == 300                    # at most every item
    built, spec = build_index(items[:5000], IndexSpec("hnsw"), fetch_k=200)
    assert built.hnsw.efSearch == spec.efSearch == 300 and (built.search(queries[:50], 200)[1] >= 0).all()


# ------------------------------------------------------------------------------- (c) served through the Retriever
def _top10(repository: Path, artifacts: Path) -> np.ndarray:
    from recserve.data.dataset import Dataset

    users = Dataset.load(artifacts / "dataset.npz").user_ids
    zeros = np.zeros(len(users), np.int64)
    return LocalPipeline(repository).recommend(users, 10, zeros + 12, zeros + 2)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_repositories_load_in_the_local_pipeline_and_recommend_as_flat_does(repos, tiny_artifacts, kind):
    info = _index_info(repos[kind])
    retriever = LocalPipeline(repos[kind]).retriever
    if kind == "hnsw":
        assert isinstance(retriever.index, faiss.IndexHNSWFlat)
        assert retriever.index.hnsw.efSearch == info["spec"]["efSearch"] >= info["fetch_k"] > CANDIDATES
        assert info["recall_at_fetch_k"] >= 0.95 and info["recall_vs_exact"] >= 0.95
    else:   # 3 of 6 cells: really approximate (measured recall@100 0.73, at fetch_k 0.60)
        assert faiss.extract_index_ivf(retriever.index).nprobe == info["spec"]["nprobe"] == 3
        assert 0.0 < info["recall_at_fetch_k"] < 1.0 and 0.0 < info["recall_vs_exact"] < 1.0
    want, got = _top10(repos["flat"], tiny_artifacts), _top10(repos[kind], tiny_artifacts)
    overlap = np.mean([len(np.intersect1d(w[w >= 0], g[g >= 0])) / max(1, (w >= 0).sum()) for w, g in zip(want, got)])
    assert overlap >= MIN_TOP10_OVERLAP, overlap


def test_a_sharded_index_is_served_as_one_and_recommends_what_the_single_index_does(repos, tiny_artifacts):
    for name, n in (("flat_2_shards", 2), ("ivf_3_shards", 3)):
        step = repos[name] / "retrieval" / "1"
        assert sorted(p.name for p in step.glob("index*.faiss")) == [f"index.{s}.faiss" for s in range(n)]
        info = _index_info(repos[name])
        assert info["shards"] == n and info["recall_vs_exact"] == 1.0     # every IVF cell probed: exact
        retriever = LocalPipeline(repos[name]).retriever
        assert isinstance(retriever.index, faiss.IndexShards) and retriever.index.count() == n
        assert sum(faiss.read_index(str(step / f"index.{s}.faiss")).ntotal for s in range(n)) == info["n_items"]
        assert np.array_equal(_top10(repos[name], tiny_artifacts), _top10(repos["flat"], tiny_artifacts)), name
    assert _index_info(repos["flat"])["shards"] == 1


def test_more_shards_than_items_is_refused_naming_the_option(tiny_artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="--shards 100000"):
        write_repository(tiny_artifacts, tmp_path / "r", RepoOptions(candidates=CANDIDATES, shards=100_000))
    with pytest.raises(ArtifactError, match="--shards must be at least 1"):
        write_repository(tiny_artifacts, tmp_path / "r", RepoOptions(candidates=CANDIDATES, shards=0))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------------- (d) CLI
def test_cli_bench_index_writes_json_with_the_choice(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "index", "--items", "20000", "--n-queries", "200", "--json", str(out),
                                      "--kinds", "flat,ivf", "--threads", "2", "--repeats", "1", "--min-time-s", "0"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["items"] == 20_000 and saved["queries"] == 200 and saved["chosen"]["kind"] in ("flat", "ivf")
    assert saved["chosen"]["recall@100"] >= 0.95
    assert "IVF-Flat" in result.output and any(line.startswith("chosen: ") for line in result.output.splitlines())


def test_cli_bench_index_refuses_unknown_kinds_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["bench", "index", "--items", "1000", "--kinds", "flat,annoy"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == ["error: --kinds annoy not known: choose from flat,ivf,ivfpq,hnsw"]


def test_bench_on_artifacts_uses_the_served_blend_vectors(tiny_artifacts, repos):
    from recserve.export.index import equal_norm

    items, queries = bi.artifact_vectors(tiny_artifacts)
    served = np.load(repos["flat"] / "retrieval" / "1" / "blend_items.npy")
    np.testing.assert_array_equal(items, equal_norm(served))       # as the served approximate indexes see them
    norms = np.linalg.norm(items, axis=1)
    np.testing.assert_allclose(norms, norms.max(), rtol=1e-5)
    assert not queries[:, -1].any()                                 # queries padded with 0: the same products
    assert queries.shape[1] == items.shape[1] and len(queries) == _index_info(repos["flat"])["queries"]
    r = bi.run_bench(artifacts=tiny_artifacts, n_queries=50, kinds=("flat",), log=None, **FAST)
    assert (r["items"], r["queries"]) == (len(items), 50) and "not normalised" in r["metric"]
