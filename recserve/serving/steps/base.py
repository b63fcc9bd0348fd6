"""What every python-backend step shares: one compute per formed batch, per-request errors, the spec's names.

A step names its model in the serving spec (`SPEC = spec.step("...")`) and implements `load` and
`compute(inputs) -> outputs` on batch-major arrays (the rows of every request of a formed batch,
concatenated). `validate` may raise RequestError for one request: that request gets INVALID_ARG
(HTTP 400, gRPC INVALID_ARGUMENT) and its neighbours in the batch are still answered.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from recserve.serving.spec import Step

log = logging.getLogger("recserve.triton")


class RequestError(ValueError):
    """Raised by a request-level check; becomes an error response for that one request."""


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session for a step process that shares the cores with other steps."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # several step processes share the cores: idle threads must sleep, not spin
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class BatchedModel:
    SPEC: Step

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        self.params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.repository = Path(args["model_repository"])
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.load(self.repository / args["model_version"], self.params)

    def load(self, version_dir: Path, params: dict[str, str]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise RequestError when one request's values are unusable; may fill optional inputs in place."""

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def split(self, outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        """Per-request outputs; override when a request's output width depends on the request."""
        if len(sizes) == 1:
            return [outputs]
        bounds = np.cumsum([0, *sizes])
        return [{n: v[a:b] for n, v in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]

    def execute(self, requests):
        pb, names = self.pb, self.SPEC.input_names
        responses: list = [None] * len(requests)
        good, batches = [], []
        for r, request in enumerate(requests):
            inputs = {}
            for n in names:
                t = pb.get_input_tensor_by_name(request, n)
                if t is not None:
                    inputs[n] = t.as_numpy()
            try:
                self.validate(inputs)
            except RequestError as exc:
                log.warning("%s: rejected a request: %s", self.model_name, exc)
                responses[r] = pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
                continue
            good.append(r)
            batches.append(inputs)
        if not good:
            return responses
        if len(batches) == 1:
            merged = batches[0]
        else:
            merged = {n: np.concatenate([b[n] for b in batches]) for n in batches[0]}
        outputs = self.compute(merged)
        sizes = [len(next(iter(b.values()))) for b in batches]
        for r, out in zip(good, self.split(outputs, sizes)):
            responses[r] = pb.InferenceResponse(output_tensors=[
                pb.Tensor(n, np.ascontiguousarray(out[n], dtype=self.out_dtypes[n])) for n in self.SPEC.output_names])
        return responses

    def finalize(self) -> None:
        pass
