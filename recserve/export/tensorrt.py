"""TensorRT engines from the QDQ ONNX models, for the native flavor on a GPU server.

The same QDQ model ONNX Runtime runs on a CPU is what TensorRT builds an INT8 engine from (explicit
quantization); layers without INT8 kernels fall back to FP16. One optimisation profile per dynamic
batcher preferred size, so every batch the batcher forms has a tuned kernel selection.

Nothing here runs without the `tensorrt` package and a CUDA GPU: `tensorrt_status()` says why in one line,
and the repository generator then writes the ONNX flavor instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one-line reason)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed (pip install tensorrt on a CUDA machine); writing the ONNX flavor"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible; writing the ONNX flavor"
    except ImportError:
        pass
    return True, f"TensorRT {trt.__version__}"


def profile_ranges(preferred: list[int], max_batch: int) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch sizes: one profile per preferred size, the last reaching max_batch."""
    bounds = sorted({p for p in preferred if p <= max_batch} | {max_batch})
    out, low = [], 1
    for b in bounds:
        out.append((low, b, b))
        low = b + 1
    return out


def build_engine(onnx_path: Path, plan_path: Path, input_shapes: dict[str, list[int]], preferred: list[int],
                 max_batch: int, int8: bool = True, workspace_gb: float = 2.0) -> dict:
    """Build and serialise an engine. `input_shapes` are per-row dims (without the batch axis)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)          # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)        # fallback precision for layers without INT8 kernels
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)    # the QDQ nodes carry the scales: no calibrator needed
    ranges = profile_ranges(preferred, max_batch)
    for low, opt, high in ranges:
        profile = builder.create_optimization_profile()
        for name, dims in input_shapes.items():
            profile.set_shape(name, [low, *dims], [opt, *dims], [high, *dims])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(plan))
    return {"profiles": ranges, "int8": int8, "fp16_fallback": True, "bytes": len(bytes(plan))}


class EngineRunner:
    """Runs a serialised engine on torch CUDA tensors; used to verify engines against ONNX Runtime."""

    def __init__(self, plan_path: Path):
        import tensorrt as trt
        import torch

        self.torch, self.trt = torch, trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self.torch, self.trt
        bufs = {n: torch.as_tensor(np.ascontiguousarray(feed[n])).cuda() for n in self.inputs}
        for n, t in bufs.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = torch.int64 if self.engine.get_tensor_dtype(n) == trt.int64 else torch.float32
            outs[n] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(n, outs[n].data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outs.items()}


ENGINE_MAX_REL_ERROR = 0.05     # INT8 engine vs ONNX Runtime FP32, relative to the output scale
ENGINE_MIN_TOP10_OVERLAP = 0.9  # ranker: share of the FP32 top 10 the engine keeps


def verify_engine(plan: Path, fp32_onnx: Path, feed: dict[str, np.ndarray]) -> dict:
    """The served ranker's engine vs ONNX Runtime on real rows; raises GateError past the limits."""
    import onnxruntime as ort

    from recserve.errors import GateError
    from recserve.ranking import overlap_at_k

    names = ["item_ids", "scores"]
    want = dict(zip(names, ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).run(names, feed)))
    got = EngineRunner(plan)(feed)
    real = want["item_ids"] >= 0
    rel = float(np.abs(got["scores"] - want["scores"])[real].max() / max(np.abs(want["scores"][real]).max(), 1e-12))
    report = {"max_rel_error": rel, "top10_overlap": overlap_at_k(got["item_ids"], want["item_ids"], 10)}
    if report["top10_overlap"] < ENGINE_MIN_TOP10_OVERLAP:
        raise GateError(f"TensorRT ranker engine keeps {report['top10_overlap']:.3f} of the FP32 top 10 "
                        f"(limit {ENGINE_MIN_TOP10_OVERLAP}); export with --precision fp32")
    if rel > ENGINE_MAX_REL_ERROR:
        raise GateError(f"TensorRT ranker engine's scores differ from ONNX Runtime FP32 by {rel:.3f} (relative; "
                        f"limit {ENGINE_MAX_REL_ERROR}); export with --precision fp32")
    return report
