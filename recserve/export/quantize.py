"""Static INT8 (QDQ) quantization of the three ONNX models, its accuracy gate, and its report.

Written under ARTIFACTS/onnx/:
  user_tower.int8.onnx, item_tower.int8.onnx, ranker.int8.onnx   same inputs and outputs as the FP32 files
  int8.json   settings, per-model report (quantized op types, QDQ node counts, error vs FP32) and gate figures
and the gate figures under the key "int8" of ARTIFACTS/metrics.json.

Only MatMul/Gemm are quantized: they are where the time goes, and embedding lookups (Gather) stay float
(an INT8 table would save memory, not time, and would cost accuracy on rare ids). Calibration uses real
training-period rows drawn with a seed, so two runs on the same artifacts write the same files.

The ranker's input vector concatenates features whose ranges differ by 300x (popularity ~6, the
elementwise product of unit vectors ~0.02): one per-tensor activation scale rounds the small ones to zero,
and plain INT8 lost 4-5% ndcg@10 on ML-100K. Before calibration each quantized layer's input channels are
therefore equalised the SmoothQuant way (Xiao et al. 2023): X W^T == (X / s)(W * s)^T with
s = max|X|^a / max|W|^(1-a), exact in FP32, which moves range differences from the activations (per-tensor
scale) into the weights (per-channel scale). 1 / s is folded into the layer before where that is a Gemm
(+ Relu); elsewhere (the ranker's x0 and cross-layer sums, the towers' concatenations) it costs one
elementwise Mul. On ML-100K this cut the std of the ranker's INT8 - FP32 score difference (150k test
candidates, scores spanning ~13 per user) from 0.57 to 0.09, and the ndcg@10 loss to noise level.
"""

from __future__ import annotations

import collections
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from recserve.data.dataset import TEST, TRAIN, Dataset
from recserve.errors import ArtifactError, GateError
from recserve.evaluate import RERANK_CANDIDATES, Evaluator, sources_for
from recserve.ranking import Seen, candidates, overlap_at_k
from recserve.reference import N_SRC, Tables, context_of, item_vectors, ranker_batch, user_vectors

MODELS = ("user_tower", "item_tower", "ranker")
QUANTIZED_OP_TYPES = ("MatMul", "Gemm")
# uint8 activations x int8 weights is the pair x86 kernels multiply natively (VNNI vpdpbusd takes u8 x s8).
# Accuracy is the same either way (asymmetric int8 is the uint8 grid shifted by 128), but with int8
# activations ORT 1.31 on x86 left 4 of the ranker's 7 Gemms as DequantizeLinear(weights) + FP32 Gemm at run
# time (slower than FP32); with uint8 all 7 became QGemm. reduce_range (7-bit weights) is only needed on
# AVX2/AVX-512 CPUs without VNNI, where u8 x s8 products can saturate; this CPU has VNNI.
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
# TensorRT builds engines only from symmetric signed QDQ (its ONNX parser rejects uint8 QuantizeLinear and
# non-zero zero points) and takes float biases. ONNX Runtime on x86 fuses none of that variant's Gemms into
# QGemm (that needs int32 biases) and runs them in FP32 on dequantized tensors: *slower* than FP32 (ranker on
# ML-100K 3.7 vs 3.3 ms), at about the same accuracy. So each target gets its own files.
TARGETS = {
    "cpu": {"activation_type": QuantType.QUInt8, "symmetric_activations": False, "quantize_bias": True},
    "tensorrt": {"activation_type": QuantType.QInt8, "symmetric_activations": True, "quantize_bias": False},
}
# MinMax: after equalisation, clipping hurt more than it helped; the extremes matter (the ranker's largest
# activations belong to its best candidates). On ML-100K Percentile (99.99) was less accurate (score error
# std 0.078 vs 0.075, max 1.5 vs 0.8) and Entropy chose the same ranges as MinMax, at a histogram pass more.
CALIBRATION = CalibrationMethod.MinMax
# A quantized layer's output is consumed by float ops (the cross layer's x0 * (Wx + b) + x, the towers'
# normalisation): a QGemm with float output skips one Quantize/Dequantize pair and its rounding error
# (quantizing outputs too took the ranker's largest error on ML-100K from 9% to 33% of the score scale).
# Behind a Relu the next layer's input quantization still lets ORT fuse Gemm + Relu + Quantize into one
# QGemm with uint8 output.
EXCLUDE_OUTPUT_QUANTIZATION = True
SMOOTH_ALPHA = 0.5       # of 0.3-0.8, the smallest ranker score error on ML-100K (0.3: +23%, 0.8: +30%)
MAX_REL_CHANGE = 0.01    # |int8 - fp32| / fp32 of ndcg@10 and recall@50 on the test split
MIN_OVERLAP = 0.95       # mean |top-100 INT8 towers & top-100 FP32 towers| / 100
OVERLAP_K = 100
# The ranker's calibration budget is spread over many users, a few of their retrieved candidates each: the
# user side of the input (ids, context, user vector) varies between users, not within (5 per user gave a
# score error std of 0.075 against 0.089 with 20 and 0.11 with 50).
CAL_CANDIDATES_PER_USER = 5
# Layers with fewer weights stay float: the genre projections (19x8 ranker, 19x16 item tower) and the
# ranker's head (398x1, whose output is the score). Quantizing them too made no measurable difference to
# the ranker's speed on ML-100K (1.72 vs 1.71 ms), only more rounding right on the score.
MIN_QUANTIZED_WEIGHTS = 2048


# ---- ONNX Runtime sessions that look like the PyTorch modules, for reference.py and evaluate.py ----------------

def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class OrtModule:
    """Calls an ONNX Runtime session like a torch module: positional tensors in graph order -> first output."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess
        self.names = [i.name for i in sess.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feed = {n: a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for n, a in zip(self.names, args)}
        return torch.from_numpy(self.sess.run(None, feed)[0])


def ort_models(onnx_dir: Path, suffix: str = "", threads: int = 0) -> tuple[SimpleNamespace, OrtModule]:
    """(two_tower, ranker) stand-ins from `{name}{suffix}.onnx`, for `Evaluator.two_tower_ranker` and friends."""
    onnx_dir = Path(onnx_dir)
    meta = json.loads((onnx_dir / "export.json").read_text())
    towers = SimpleNamespace(
        user_tower=OrtModule(session(onnx_dir / f"user_tower{suffix}.onnx", threads)),
        item_tower=OrtModule(session(onnx_dir / f"item_tower{suffix}.onnx", threads)),
        cfg=SimpleNamespace(dim=meta["dim"], history_len=meta["history_len"]))
    return towers, OrtModule(session(onnx_dir / f"ranker{suffix}.onnx", threads))


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0]


# ---- calibration rows --------------------------------------------------------------------------------------

def calibration_batches(ds: Dataset, onnx_dir: Path, rows: int, seed: int, candidates_k: int = RERANK_CANDIDATES
                        ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real training-period inputs for each model, `rows` rows each, drawn reproducibly from `seed`.

    user_tower: training interactions' users with the history they had *before* that interaction (as the
    tower was trained); item_tower: catalogue items; ranker: training users (context of their last training
    interaction) against `CAL_CANDIDATES_PER_USER` of the candidates the FP32 towers retrieve for them.
    """
    rng = np.random.default_rng(seed)
    meta = json.loads((onnx_dir / "export.json").read_text())
    H = meta["history_len"]
    ut, it = session(onnx_dir / "user_tower.onnx"), session(onnx_dir / "item_tower.onnx")
    train = np.flatnonzero(ds.mask(TRAIN))
    if len(train) == 0:
        raise ArtifactError("the dataset has no training rows to calibrate INT8 models on")

    pick = np.sort(rng.choice(train, min(rows, len(train)), replace=False))
    users = {"user_idx": ds.users[pick], "user_cats": ds.user_cats[ds.users[pick]],
             "history": ds.rolling_history(pick, H)}
    items_idx = np.sort(rng.choice(ds.n_items, min(rows, ds.n_items), replace=False))
    items = {"item_idx": items_idx, "item_genres": ds.item_genres[items_idx], "item_year": ds.item_year[items_idx]}

    tables = Tables(ds, (TRAIN,), H)
    iv = run(it, {"item_idx": np.arange(ds.n_items), "item_genres": ds.item_genres, "item_year": ds.item_year})
    train_users = np.unique(ds.users[train])
    n_u = min(len(train_users), max(1, math.ceil(rows / CAL_CANDIDATES_PER_USER)))
    u = np.sort(rng.choice(train_users, n_u, replace=False))
    f = tables.users(u)
    uv = run(ut, {"user_idx": f.user_idx, "user_cats": f.user_cats, "history": f.history})
    seen = Seen(tables.seen_indptr, tables.seen)
    k = min(candidates_k, ds.n_items)
    artifacts = Path(onnx_dir).parent
    if (artifacts / "sources.npz").exists():      # the served candidate rule and its source scores
        from recserve.sources import Blend, load_blend, load_view, offline_candidates

        view = load_view(artifacts, "valid")
        cand, src = offline_candidates(load_blend(artifacts), uv, Blend.item_matrix(iv, view), view, u, seen, k)
    else:
        cand = candidates(uv @ iv.T, u, seen, k)
        src = np.zeros((*cand.shape, N_SRC), np.float32)
    per = min(cand.shape[1], math.ceil(rows / n_u))
    pick_cols = np.stack([rng.choice(cand.shape[1], per, replace=False) for _ in cand])      # (n_u, per)
    cand = np.maximum(np.take_along_axis(cand, pick_cols, 1), 0)
    src = np.take_along_axis(src, pick_cols[..., None], 1)
    last = np.searchsorted(ds.users[train], u, side="right") - 1                           # rows sorted by user
    hour, weekday = context_of(ds.timestamps[train][last])
    ranker = ranker_batch(tables, f, uv, hour, weekday, cand, iv, src)
    return {"user_tower": _split(users, 256), "item_tower": _split(items, 256),
            "ranker": _split(ranker, max(1, 256 // per))}


def rows_of(batch: dict[str, np.ndarray]) -> int:
    """Scored rows in a batch: candidates for the ranker, users or items for a tower."""
    return int(batch["cand_idx"].size) if "cand_idx" in batch else len(next(iter(batch.values())))


def _split(feed: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feed.values())))
    return [{k: np.ascontiguousarray(v[s:s + batch]) for k, v in feed.items()} for s in range(0, n, batch)]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


# ---- equalisation, quantization, inspection ----------------------------------------------------------------

def large_layers(model: onnx.ModelProto, min_weights: int = MIN_QUANTIZED_WEIGHTS) -> tuple[list[str], list[str]]:
    """(names of MatMul/Gemm nodes with a constant weight of at least `min_weights` elements, the other ones)."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]
    big = [n.name for n in mm if len(n.input) > 1 and sizes.get(n.input[1], 0) >= min_weights]
    return big, [n.name for n in mm if n.name not in big]


def smooth(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], alpha: float = SMOOTH_ALPHA,
           only: list[str] | None = None) -> tuple[int, int]:
    """Equalise the input channels of the MatMul/Gemm nodes named in `only` (default: all those with a constant
    weight), in place; returns (activations equalised, of those folded into the layer before).

    For an activation X feeding layers with weights W_j (input channel k): s_k = max|X_k|^a / max_j|W_jk|^(1-a),
    X -> X / s (folded into the Gemm producing X where possible, else one inserted Mul), W_j -> W_j * s.
    Exact in FP32; see the module docstring for why.
    """
    g = _Graph(model)
    groups: dict[str, list[tuple[int, int]]] = {}          # activation -> [(node index, W's input-channel axis)]
    for i, node in enumerate(g.nodes):
        wanted = node.name in only if only is not None else node.op_type in QUANTIZED_OP_TYPES
        if (wanted and len(node.input) > 1 and node.input[0] not in g.inits and g.private_const(node.input[1])
                and g.array(node.input[1]).ndim == 2):           # a vector weight (x @ w) has no channels to equalise
            attrs = {a.name: a.i for a in node.attribute}
            if not attrs.get("transA", 0):
                groups.setdefault(node.input[0], []).append((i, int(node.op_type == "Gemm" and attrs.get("transB", 0))))
    if not groups:
        return 0, 0
    amax = _channel_absmax(model, list(groups), batches)
    before: dict[int, list[onnx.NodeProto]] = collections.defaultdict(list)
    folded = 0
    for x, consumers in groups.items():
        wmax = np.max([np.abs(g.array(g.nodes[i].input[1])).max(axis=1 - ax) for i, ax in consumers], 0)
        s = (np.maximum(amax[x], 1e-6) ** alpha / np.maximum(wmax, 1e-6) ** (1 - alpha)).astype(np.float32)
        target = g.fold_target(x, len(consumers))
        if target is not None:
            producer, out_axis = target
            weight, *bias = g.nodes[producer].input[1:3]
            g.scale(weight, 1.0 / s, out_axis)
            if bias and bias[0]:
                g.scale(bias[0], 1.0 / s, 0)
            folded += 1
        else:
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}/smooth_inv"))
            before[min(i for i, _ in consumers)].append(
                helper.make_node("Mul", [x, f"{x}/smooth_inv"], [f"{x}/smooth"], name=f"{x}/smooth"))
        for i, ax in consumers:
            g.scale(g.nodes[i].input[1], s, ax)
            if target is None:
                g.nodes[i].input[0] = f"{x}/smooth"
    del model.graph.node[:]
    model.graph.node.extend([m for i, n in enumerate(g.nodes) for m in (*before[i], n)])
    return len(groups), folded


class _Graph:
    """Copies of a model's nodes (edited, then written back) with the lookups equalisation needs."""

    def __init__(self, model: onnx.ModelProto):
        self.inits = {i.name: i for i in model.graph.initializer}
        self.nodes = [onnx.NodeProto() for _ in model.graph.node]
        for copy, node in zip(self.nodes, model.graph.node):
            copy.CopyFrom(node)
        self.uses = collections.Counter(name for n in self.nodes for name in n.input)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self.outputs = {o.name for o in model.graph.output}

    def private_const(self, name: str) -> bool:
        return name in self.inits and self.uses[name] == 1

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def scale(self, name: str, factor: np.ndarray, axis: int) -> None:
        """Multiply initializer `name` by `factor` along `axis` (a 1-D initializer elementwise)."""
        w = self.array(name)
        w = w * np.expand_dims(factor, 1 - axis) if w.ndim == 2 else w * factor
        self.inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))

    def fold_target(self, x: str, n_consumers: int) -> tuple[int, int] | None:
        """(index, output-channel axis of its weight) of a Gemm whose output channels can absorb 1 / s.

        X = Gemm(...) or Relu(Gemm(...)) (relu(z / s) == relu(z) / s for s > 0), used only by the layers being
        equalised. A Mul there would cost a pass over X and, between Relu and Quantize, keeps ONNX Runtime from
        fusing Gemm + Relu + Quantize into one QGemm (it fuses Gemm + Relu in FP32 instead).
        """
        if self.uses[x] != n_consumers or x in self.outputs or x not in self.producer:
            return None
        p = self.producer[x]
        if self.nodes[p].op_type == "Relu":
            z = self.nodes[p].input[0]
            if self.uses[z] != 1 or z in self.outputs or z not in self.producer:
                return None
            p = self.producer[z]
        node = self.nodes[p]
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or not self.private_const(node.input[1]):
            return None
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and not (self.private_const(bias) and len(self.inits[bias].dims) == 1):
            return None
        return p, 0 if attrs.get("transB", 0) else 1


def _channel_absmax(model: onnx.ModelProto, names: list[str], batches: list[dict[str, np.ndarray]]
                    ) -> dict[str, np.ndarray]:
    """max |value| of each tensor in `names` per channel (last axis) over the calibration batches, FP32."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for x in names:
        probe.graph.output.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax: dict[str, np.ndarray] = {}
    for b in batches:
        for x, v in zip(names, sess.run(names, {i.name: b[i.name] for i in sess.get_inputs()})):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(0)
            amax[x] = np.maximum(amax[x], m) if x in amax else m
    return amax


def quantize_model(src: Path, dst: Path, batches: list[dict[str, np.ndarray]], *, alpha: float | None = SMOOTH_ALPHA,
                   activation_type: QuantType = ACTIVATION_TYPE, calibrate_method: CalibrationMethod = CALIBRATION,
                   exclude_output: bool = EXCLUDE_OUTPUT_QUANTIZATION, reduce_range: bool = False,
                   min_weights: int = MIN_QUANTIZED_WEIGHTS, symmetric_activations: bool = False,
                   quantize_bias: bool = True) -> dict[str, int]:
    """FP32 `src` -> QDQ INT8 `dst`, calibrated on `batches`; returns how many layer inputs were equalised."""
    with tempfile.TemporaryDirectory(prefix="recserve-int8-") as tmp:
        model = onnx.load(str(src))
        quantize, keep_float = large_layers(model, min_weights)
        equalised, folded = smooth(model, batches, alpha, quantize) if alpha is not None else (0, 0)
        onnx.save(model, f"{tmp}/smoothed.onnx")
        # ORT's recommended pre-pass (ONNX shape inference + basic graph optimisation; it also marks the model
        # so the quantizer stops warning). On these dynamo exports it changed no quantized node and no output.
        # Its symbolic shape inference is skipped: it fails on the user tower's Expand, and shapes are known.
        quant_pre_process(f"{tmp}/smoothed.onnx", f"{tmp}/pre.onnx", skip_symbolic_shape=True)
        extra = {"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES)} if exclude_output else {}
        extra |= {"ActivationSymmetric": symmetric_activations, "QuantizeBias": quantize_bias}
        quantize_static(f"{tmp}/pre.onnx", str(dst), _Reader(batches), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=reduce_range,
                        activation_type=activation_type, weight_type=WEIGHT_TYPE, calibrate_method=calibrate_method,
                        nodes_to_quantize=quantize, nodes_to_exclude=keep_float, extra_options=extra)
    return {"equalised_inputs": equalised, "folded_into_previous_layer": folded}


def describe(path: Path) -> dict:
    """What was quantized: op types fed by DequantizeLinear(int8 weight), QDQ node counts, float Gather tables."""
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    counts = collections.Counter(n.op_type for n in g.node)

    def int8_weight(name: str) -> bool:
        dq = producer.get(name)
        return (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits
                and inits[dq.input[0]].data_type == onnx.TensorProto.INT8)

    quantized = [n for n in g.node if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1 and int8_weight(n.input[1])]
    float_ops = [n.name for n in g.node if n.op_type in QUANTIZED_OP_TYPES and n not in quantized]
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits]
    return {
        "quantized_op_types": sorted({n.op_type for n in quantized}),
        "quantized_nodes": len(quantized),
        "float_matmul_gemm_nodes": float_ops,
        "qdq_nodes": {"QuantizeLinear": counts["QuantizeLinear"], "DequantizeLinear": counts["DequantizeLinear"]},
        "float_gather_tables": sum(inits[n.input[0]].data_type == onnx.TensorProto.FLOAT for n in gathers),
        "quantized_gather_tables": sum(inits[n.input[0]].data_type != onnx.TensorProto.FLOAT for n in gathers),
        "bytes": path.stat().st_size,
    }


def _output_error(fp32: Path, int8: Path, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    a, b = session(fp32), session(int8)
    want = np.concatenate([run(a, x).reshape(-1) for x in batches])
    got = np.concatenate([run(b, x).reshape(-1) for x in batches])
    err = np.abs(got - want)
    scale = max(float(np.abs(want).max()), 1e-12)
    return {"rows": sum(map(rows_of, batches)), "max_abs_error": float(err.max()),
            "max_rel_error": float(err.max()) / scale, "mean_rel_error": float(err.mean()) / scale}


def quantize_artifacts(artifacts: Path, calibration_rows: int = 2000, seed: int = 0, gate: bool = True, *,
                       target: str = "cpu") -> dict:
    """Write ARTIFACTS/onnx/{user_tower,item_tower,ranker}.int8.onnx and int8.json; run the gate unless `gate` is off.

    `target`: "cpu" (ONNX Runtime, uint8 activations) or "tensorrt" (symmetric int8, float biases: what
    TensorRT's parser accepts). Raises GateError (after removing the INT8 files, so nothing ungated can be
    packaged) when the gate fails.
    """
    artifacts = Path(artifacts)
    onnx_dir = artifacts / "onnx"
    missing = [f"{n}.onnx" for n in MODELS if not (onnx_dir / f"{n}.onnx").exists()]
    if missing or not (onnx_dir / "export.json").exists():
        raise ArtifactError(f"{onnx_dir} lacks {', '.join(missing) or 'export.json'}: run "
                            f"`recserve export onnx --artifacts {artifacts}` first")
    if calibration_rows < 1:
        raise ArtifactError(f"calibration_rows must be at least 1, got {calibration_rows}")
    if target not in TARGETS:
        raise ArtifactError(f"INT8 target {target!r} is not known: choose {' or '.join(TARGETS)}")
    options = TARGETS[target]
    ds = Dataset.load(artifacts / "dataset.npz")
    batches = calibration_batches(ds, onnx_dir, calibration_rows, seed)
    check = calibration_batches(ds, onnx_dir, min(calibration_rows, 1000), seed + 1)   # other rows, for the report
    report: dict = {
        "format": 1, "onnxruntime": ort.__version__, "seed": seed,
        "settings": {"target": target, "quant_format": "QDQ", "op_types_to_quantize": list(QUANTIZED_OP_TYPES),
                     "activations": f"{options['activation_type'].name} per tensor, "
                                    f"{'symmetric' if options['symmetric_activations'] else 'asymmetric'}",
                     "weights": f"{WEIGHT_TYPE.name} per channel, symmetric",
                     "biases": "int32" if options["quantize_bias"] else "float", "calibration": CALIBRATION.name,
                     "smooth_alpha": SMOOTH_ALPHA, "output_quantization": not EXCLUDE_OUTPUT_QUANTIZATION,
                     "min_quantized_weights": MIN_QUANTIZED_WEIGHTS},
        "models": {}, "gate": None,
    }
    for name in MODELS:
        src, dst = onnx_dir / f"{name}.onnx", onnx_dir / f"{name}.int8.onnx"
        smoothing = quantize_model(src, dst, batches[name], **options)
        rows = sum(map(rows_of, batches[name]))
        report["models"][name] = {"file": dst.name, "calibration_rows": rows, "smoothing": smoothing,
                                  **describe(dst), "fp32_bytes": src.stat().st_size,
                                  "error_vs_fp32": _output_error(src, dst, check[name])}
    _write_report(onnx_dir, report)
    if gate:
        try:
            report["gate"] = int8_gate(artifacts)
        except GateError:
            for name in MODELS:
                (onnx_dir / f"{name}.int8.onnx").unlink(missing_ok=True)
            failed = int8_report(artifacts) or {}
            failed["files_removed"] = "the gate failed: the INT8 files were deleted"
            _write_report(onnx_dir, failed)
            raise
    return report


# ---- the gate -------------------------------------------------------------------------------------------------

def retrieval_overlap(ev: Evaluator, a: SimpleNamespace, b: SimpleNamespace, k: int = OVERLAP_K) -> float:
    """Mean over the evaluator's users of |top-k by towers a & top-k by towers b| / k (exact, known items excluded)."""
    tops = []
    for towers in (a, b):
        iv = item_vectors(towers, ev.ds)
        uv = user_vectors(towers, ev.tables.users(ev.users))
        tops.append(candidates(uv @ iv.T, ev.users, ev.seen, k))
    return overlap_at_k(*tops, min(k, ev.ds.n_items))


def _rel(new: float, old: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return (new - old) / old


def int8_gate(artifacts: Path, max_rel_change: float = MAX_REL_CHANGE, min_overlap: float = MIN_OVERLAP) -> dict:
    """FP32 vs INT8 ONNX models on the test split; records the figures, raises GateError when one is out of bounds.

    Figures: ndcg@10 and recall@50 of blend+ranker, the served candidate rule and ranker (relative change
    |int8 - fp32| / fp32 <= max_rel_change)
    and the top-100 overlap of exact retrieval by INT8 vs FP32 towers (>= min_overlap).
    """
    artifacts = Path(artifacts)
    onnx_dir = artifacts / "onnx"
    missing = [f"{n}.int8.onnx" for n in MODELS if not (onnx_dir / f"{n}.int8.onnx").exists()]
    if missing:
        raise ArtifactError(f"{onnx_dir} lacks {', '.join(missing)}: run quantization first")
    ds = Dataset.load(artifacts / "dataset.npz")
    fp32_towers, fp32_ranker = ort_models(onnx_dir)
    int8_towers, int8_ranker = ort_models(onnx_dir, ".int8")
    sources = sources_for(artifacts, TEST) if (artifacts / "sources.npz").exists() else None
    ev = Evaluator(ds, TEST, fp32_towers.cfg.history_len, sources=sources)
    fp32 = ev.two_tower_ranker(fp32_towers, fp32_ranker)
    int8 = ev.two_tower_ranker(int8_towers, int8_ranker)
    rel = {m: round(_rel(int8[m], fp32[m]), 6) for m in ("ndcg@10", "recall@50")}
    overlap = round(retrieval_overlap(ev, int8_towers, fp32_towers), 6)
    failed = [f"{m} relative change {rel[m]:+.4f} (fp32 {fp32[m]:.5f}, int8 {int8[m]:.5f}) is outside "
              f"the limit +-{max_rel_change:g}" for m in rel if not abs(rel[m]) <= max_rel_change]
    if not overlap >= min_overlap:
        failed.append(f"top{OVERLAP_K}_overlap {overlap:.4f} is below the limit {min_overlap:g}")
    figures = {
        "split": "test", "users": int(len(ev.users)), "rerank_candidates": RERANK_CANDIDATES,
        "runtime": f"onnxruntime {ort.__version__} CPU, FP32 vs INT8 ONNX models",
        "blend+ranker": {"fp32": fp32, "int8": int8}, "rel_change": rel, f"top{OVERLAP_K}_overlap": overlap,
        "limits": {"max_abs_rel_change": max_rel_change, f"min_top{OVERLAP_K}_overlap": min_overlap},
        "passed": not failed, "failed": failed,
    }
    _merge_json(artifacts / "metrics.json", "int8", figures)
    report = int8_report(artifacts) or {}
    report["gate"] = figures
    _write_report(onnx_dir, report)
    if failed:
        raise GateError("INT8 accuracy gate failed: " + "; ".join(failed) + ". Calibrate on more rows "
                        "(calibration_rows, e.g. 8000) or serve the FP32 models (--precision fp32).")
    return figures


def _merge_json(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _write_report(onnx_dir: Path, report: dict) -> None:
    (onnx_dir / "int8.json").write_text(json.dumps(report, indent=2))


def int8_report(artifacts: Path) -> dict | None:
    """ARTIFACTS/onnx/int8.json (settings, per-model report, gate figures), or None before quantization."""
    path = Path(artifacts) / "onnx" / "int8.json"
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["quantize_artifacts", "int8_gate", "int8_report", "OrtModule", "ort_models", "MAX_REL_CHANGE",
           "MIN_OVERLAP"]
