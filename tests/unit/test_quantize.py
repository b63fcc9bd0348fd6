"""INT8 quantization on a small trained model: QDQ structure, INT8 vs FP32 outputs, the gate, the benchmark."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from recserve.bench import bench_int8, format_bench
from recserve.data.dataset import Dataset
from recserve.errors import ArtifactError, GateError
from recserve.export import quantize as q

pytestmark = pytest.mark.unit

# INT8 vs FP32 on real rows the calibration did not see: the largest absolute difference, relative to the
# largest |FP32 output|, stays under 5e-2 (measured on this data: < 1e-2 for every model; 8-bit activations
# alone put the step at ~1/255 of each tensor's range, and a few layers add their errors up).
MAX_REL_ERROR = 5e-2


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "artifacts"
    shutil.copytree(tiny_artifacts, out)     # quantizing writes into the artifacts
    q.quantize_artifacts(out, calibration_rows=2000, seed=0, gate=True)
    return out


def _copy(artifacts: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in ("dataset.npz", "metrics.json"):
        shutil.copy(artifacts / f, dest / f)
    shutil.copytree(artifacts / "onnx", dest / "onnx")
    return dest


def test_int8_files_quantize_the_large_matmul_gemm_layers_and_leave_embedding_tables_float(artifacts):
    report = q.int8_report(artifacts)
    for name in q.MODELS:
        path = artifacts / "onnx" / f"{name}.int8.onnx"
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0, name
        large, small = q.large_layers(onnx.load(str(artifacts / "onnx" / f"{name}.onnx")))
        d = q.describe(path)
        assert d["quantized_nodes"] == len(large) > 0, name
        assert sorted(d["float_matmul_gemm_nodes"]) == sorted(small), name
        # every Gather reads a float table straight from an initializer, never a DequantizeLinear output
        inits = {i.name: i for i in model.graph.initializer}
        gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
        assert gathers and all(inits[n.input[0]].data_type == onnx.TensorProto.FLOAT for n in gathers), name
        assert d["quantized_gather_tables"] == 0
        assert report["models"][name]["qdq_nodes"] == d["qdq_nodes"]
        assert set(report["models"][name]["quantized_op_types"]) <= set(q.QUANTIZED_OP_TYPES)


def test_matmul_weights_are_quantized_too_once_the_size_floor_is_lifted(artifacts, tmp_path):
    ds = Dataset.load(artifacts / "dataset.npz")
    batches = q.calibration_batches(ds, artifacts / "onnx", 200, seed=0)["ranker"]
    q.quantize_model(artifacts / "onnx" / "ranker.onnx", tmp_path / "r.onnx", batches, min_weights=0)
    d = q.describe(tmp_path / "r.onnx")
    # every linear map is quantized, the genre projection's MatMul included (the serving arrangement's 3-D
    # layers export as MatMul + Add rather than Gemm)
    assert "MatMul" in d["quantized_op_types"] and set(d["quantized_op_types"]) <= set(q.QUANTIZED_OP_TYPES)
    assert d["float_matmul_gemm_nodes"] == [] and d["quantized_gather_tables"] == 0


def test_int8_outputs_match_fp32_on_real_rows_within_the_stated_tolerance(artifacts):
    ds = Dataset.load(artifacts / "dataset.npz")
    onnx_dir = artifacts / "onnx"
    held_out = q.calibration_batches(ds, onnx_dir, 1000, seed=123)        # other rows than the calibration's
    for name in q.MODELS:
        fp32, int8 = q.session(onnx_dir / f"{name}.onnx"), q.session(onnx_dir / f"{name}.int8.onnx")
        want = np.concatenate([q.run(fp32, b).ravel() for b in held_out[name]])
        got = np.concatenate([q.run(int8, b).ravel() for b in held_out[name]])
        assert np.isfinite(got).all()
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < MAX_REL_ERROR, (name, rel)
        assert not np.array_equal(got, want), name                       # it really is another model


def test_gate_figures_are_recorded_in_metrics_json_and_int8_json(artifacts):
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert {"protocol", "models", "int8"} <= set(metrics)
    gate = metrics["int8"]
    assert gate["passed"] and gate["failed"] == []
    assert set(gate["rel_change"]) == {"ndcg@10", "recall@50"}
    assert all(abs(v) <= q.MAX_REL_CHANGE for v in gate["rel_change"].values())
    assert q.MIN_OVERLAP <= gate["top100_overlap"] <= 1.0
    assert gate["limits"] == {"max_abs_rel_change": q.MAX_REL_CHANGE, "min_top100_overlap": q.MIN_OVERLAP}
    fp32, int8 = gate["blend+ranker"]["fp32"], gate["blend+ranker"]["int8"]
    for m in ("ndcg@10", "recall@50"):
        assert gate["rel_change"][m] == pytest.approx((int8[m] - fp32[m]) / fp32[m], abs=1e-5)
    # the ONNX Runtime adapters reproduce the PyTorch evaluation of the same models
    for m, v in metrics["models"]["blend+ranker"].items():
        assert fp32[m] == pytest.approx(v, abs=2e-3), m
    report = q.int8_report(artifacts)
    assert report["gate"] == gate and set(report["models"]) == set(q.MODELS)
    assert report["settings"]["op_types_to_quantize"] == ["MatMul", "Gemm"]


def test_int8_report_is_none_before_quantization(tmp_path):
    assert q.int8_report(tmp_path) is None


@pytest.mark.parametrize("limits, figure", [(dict(max_rel_change=-1.0), "ndcg@10"),
                                            (dict(min_overlap=1.5), "top100_overlap")])
def test_a_failing_gate_raises_gate_error_naming_the_figure_value_and_limit(artifacts, tmp_path, limits, figure):
    art = _copy(artifacts, tmp_path / "art")
    with pytest.raises(GateError, match=figure) as err:
        q.int8_gate(art, **limits)
    assert "limit" in str(err.value) and "fp32" in str(err.value)
    assert json.loads((art / "metrics.json").read_text())["int8"]["passed"] is False
    assert q.int8_report(art)["gate"]["failed"]


def test_quantize_artifacts_removes_the_int8_files_when_the_gate_fails(artifacts, tmp_path, monkeypatch):
    art = _copy(artifacts, tmp_path / "art")
    monkeypatch.setattr(q, "int8_gate", functools.partial(q.int8_gate, max_rel_change=-1.0))
    with pytest.raises(GateError, match="recall@50"):
        q.quantize_artifacts(art)
    assert not list((art / "onnx").glob("*.int8.onnx"))


def test_tensorrt_target_writes_symmetric_int8_qdq_with_float_biases(artifacts, tmp_path):
    art = _copy(artifacts, tmp_path / "art")
    report = q.quantize_artifacts(art, calibration_rows=500, gate=False, target="tensorrt")
    assert report["settings"]["target"] == "tensorrt" and report["settings"]["biases"] == "float"
    for name in q.MODELS:
        model = onnx.load(str(art / "onnx" / f"{name}.int8.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        zero_points = [inits[n.input[2]] for n in qdq]
        # what TensorRT's ONNX parser accepts: signed int8, every zero point 0, no int32 (bias) tensors
        assert qdq and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points), name
        assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points), name
        assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in qdq if n.input[0] in inits), name
        assert report["models"][name]["error_vs_fp32"]["max_rel_error"] < MAX_REL_ERROR, name
    with pytest.raises(ArtifactError, match="target"):
        q.quantize_artifacts(art, target="gpu")


def test_bench_int8_returns_positive_timings_for_every_model_and_thread_setting(artifacts):
    rows = bench_int8(artifacts, candidates=50, repeats=3, threads=(1, 0), batch=32, warmup=1, ranker_users=(1, 8))
    assert [(r["model"], r["threads"]) for r in rows] == [
        (m, t) for m in ("ranker", "ranker", "user_tower", "item_tower") for t in (1, 0)]
    assert [r["rows_per_request"] for r in rows[::2]] == [50, 8 * 50, 32, 32]
    for r in rows:
        for p in ("fp32", "int8"):
            assert 0 < r[f"{p}_ms_median"] <= r[f"{p}_ms_p90"] and r[f"{p}_rows_per_s"] > 0
        assert r["speedup"] > 0
    table = format_bench(rows)
    assert "ranker" in table and "speed-up" in table
