"""The embedded `recommend` model's load (recserve/serving/steps/fused.py), in process with a stand-in for
Triton's python-backend module: the drift reference the exporter writes is the one a load would compute; a
load that computes it (an older repository) on busy cores takes it from the ranker's own scores; and monitoring
that cannot start never keeps a version from serving."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from recserve.serving.local import LocalPipeline
from recserve.serving.repository import RepoOptions, parse, write_repository

pytestmark = pytest.mark.unit

DTYPES = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_STRING": np.object_,
          "TYPE_BOOL": np.bool_}


class Metric:
    def __init__(self, labels):
        self.labels, self.value = labels, 0.0

    def increment(self, n):
        self.value += n

    def set(self, v):
        self.value = v


class MetricFamily:
    COUNTER, GAUGE = "counter", "gauge"

    def __init__(self, name, kind, description):
        self.name, self.metrics = name, []
        Backend.families.append(self)

    def Metric(self, labels):      # noqa: N802 - the backend's name
        self.metrics.append(Metric(labels))
        return self.metrics[-1]


class Backend:
    families: list[MetricFamily] = []


@pytest.fixture
def backend(monkeypatch):
    Backend.families = []
    module = types.ModuleType("triton_python_backend_utils")
    module.MetricFamily = MetricFamily
    module.triton_string_to_numpy = DTYPES.__getitem__
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return Backend


@pytest.fixture(scope="module")
def repository(tiny_artifacts, tmp_path_factory):
    repo = tmp_path_factory.mktemp("recommend_load") / "repo"
    write_repository(tiny_artifacts, repo, RepoOptions(candidates=60))
    return repo


@pytest.fixture(scope="module")
def older_repository(repository, tmp_path_factory):
    """The repository as written before the exporter wrote the drift reference: a load computes it."""
    import shutil

    from recserve.serving.steps.fused import REFERENCE_FILE

    older = tmp_path_factory.mktemp("recommend_load_older") / "repo"
    shutil.copytree(repository, older)
    (older / "recommend" / "1" / REFERENCE_FILE).unlink()
    return older


def _load(repository):
    from recserve.serving.steps.fused import TritonPythonModel

    config = MessageToDict(parse((repository / "recommend" / "config.pbtxt").read_text()),
                           preserving_proto_field_name=True)
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_instance_name": "recommend_0_0",
                      "model_repository": str(repository / "recommend"), "model_version": "1"})
    return model


def _series(name: str) -> list[Metric]:
    return [m for f in Backend.families if f.name == name for m in f.metrics]


@pytest.fixture
def ranker_past_its_timeout(monkeypatch):
    """Every ranker run under a timeout runs past it, as on cores a load at nice 19 shares with the requests."""
    plain = LocalPipeline._rank

    def rank(self, feed):
        if self.ranker_timeout > 0:
            raise RuntimeError("the ranker ran past its timeout")
        return plain(self, feed)

    monkeypatch.setattr(LocalPipeline, "_rank", rank)


def test_a_load_on_busy_cores_takes_its_drift_reference_from_the_rankers_own_scores(
        backend, older_repository, ranker_past_its_timeout):
    model = _load(older_repository)   # with the serving timeout during the load, this raised: no personalized rows
    assert set(model.drift) == {"score", "query_norm"} and len(model.drift["score"].edges) >= 5
    assert not _series("recserve_fallbacks_total"), "the load's own requests are not counted as fallbacks"
    assert model.pipeline.ranker_timeout == pytest.approx(0.25), "requests are served with the timeout again"
    assert len(_series("recserve_score_bucket")) == len(model.drift["score"].edges) + 1
    # a request after the load: the timeout applies, the answer is the retrieval order, and the fallback counted
    user = int(model.pipeline.retriever.user_ids[0])
    request = {"user_id": np.array([[user]], np.int64), "k": np.array([[5]], np.int32)}
    model.validate(request)
    out = model._run([request])[0]
    assert out["source"][0, 0] == b"fallback"
    model.finalize()
    assert [m.labels for m in _series("recserve_fallbacks_total")] == [{"kind": "ranker"}]


def test_a_drift_reference_that_cannot_be_computed_leaves_the_version_serving_without_drift_gauges(
        backend, repository, monkeypatch):
    import recserve.serving.steps.fused as fused

    def no_reference(values):
        raise ValueError("a drift reference needs at least 10 finite values, got 0")

    monkeypatch.setattr(fused, "Drift", no_reference)
    model = _load(repository)
    assert model.drift == {} and not _series("recserve_drift_psi")
    users = model.pipeline.retriever.user_ids[:3].reshape(-1, 1).astype(np.int64)
    request = {"user_id": users, "k": np.full((3, 1), 5, np.int32)}
    model.validate(request)
    out = model._run([request])[0]
    assert [s.decode() for s in out["source"][:, 0]] == ["personalized"] * 3
    model.finalize()
    counted = {m.labels["le"]: m.value for m in _series("recserve_candidates_bucket")}
    assert counted["+Inf"] == 3, counted
    assert {m.labels["le"]: m.value for m in _series("recserve_score_bucket")} == {"+Inf": 3.0}


def test_the_exported_drift_reference_is_what_a_load_would_compute_and_an_older_repository_still_loads(
        backend, repository, older_repository):
    from recserve.serving.steps.fused import REFERENCE_FILE

    with np.load(repository / "recommend" / "1" / REFERENCE_FILE) as z:
        reference = {name: z[name] for name in z.files}
    assert set(reference) == {"score", "query_norm"} and len(reference["score"]) >= 10
    computed = _load(older_repository).drift
    read = _load(repository).drift
    for name in reference:
        assert np.allclose(read[name].edges, computed[name].edges, rtol=1e-5), name
        assert np.array_equal(read[name].reference, computed[name].reference), name
