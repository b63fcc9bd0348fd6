"""What every python-backend step shares: one compute per formed batch, per-request errors, the spec's names.

A step names its model in the serving spec (`SPEC = spec.step("...")`) and implements `load` and
`compute(inputs) -> outputs` on batch-major arrays (the rows of every request of a formed batch,
concatenated). `validate` may raise RequestError for one request: that request gets INVALID_ARG
(HTTP 400, gRPC INVALID_ARGUMENT) and its neighbours in the batch are still answered.

No request can fail its neighbours: when `compute` raises on a merged batch, each request is computed alone,
and only the ones that still fail get an error. That error names the model and says the server log has the
details; the traceback goes to the log, never to the client (it carries source paths).
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


def check_index(inputs: dict[str, np.ndarray], name: str, n: int, pad: bool = False) -> None:
    """`name` holds indices into a table of n rows (-1 allowed as padding when `pad`)."""
    v = inputs[name]
    low = -1 if pad else 0
    if v.size and (int(v.min()) < low or int(v.max()) >= n):
        bad = v[(v < low) | (v >= n)].flat[0]
        raise RequestError(f"{name}={int(bad)} is out of range: indices run 0..{n - 1}"
                           + (" (-1 pads)" if pad else ""))


def check_finite(inputs: dict[str, np.ndarray], *names: str) -> None:
    for name in names:
        if not np.isfinite(inputs[name]).all():
            raise RequestError(f"{name} holds NaN or infinity: send finite numbers")


def check_range(inputs: dict[str, np.ndarray], name: str, low: int, high: int, hint: str = "") -> None:
    v = inputs[name]
    if v.size and (int(v.min()) < low or int(v.max()) > high):
        bad = int(v[(v < low) | (v > high)].flat[0])
        raise RequestError(f"{name}={bad} is out of range: choose {low}..{high}{hint}")


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
        self.instance = args.get("model_instance_name", self.model_name)
        self.params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.repository = Path(args["model_repository"])
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.load(self.repository / args["model_version"], self.params)

    def serving_thread(self) -> None:
        """Per-thread settings for the thread that answers requests, called from it (`initialize` may have run in
        another one: recserve.serving.steps.gentle)."""

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
                missing = [n for n in self.SPEC.required if n not in inputs]
                if missing:
                    raise RequestError(f"missing input {', '.join(missing)}: {self.model_name} needs "
                                       f"{', '.join(self.SPEC.required)}")
                self.validate(inputs)
            except RequestError as exc:
                log.warning("%s: rejected a request: %s", self.model_name, exc)
                responses[r] = self._error(str(exc), pb.TritonError.INVALID_ARG)
                continue
            except Exception:
                log.exception("%s: the check of a request failed", self.model_name)
                responses[r] = self._internal()
                continue
            good.append(r)
            batches.append(inputs)
        if not good:
            return responses
        try:
            results = self._run(batches)
        except Exception:
            if len(batches) == 1:
                log.exception("%s: a request failed", self.model_name)
                results = [None]
            else:   # find the request that fails; its neighbours are still answered
                log.exception("%s: a batch of %d requests failed; computing each alone", self.model_name, len(batches))
                results = []
                for b in batches:
                    try:
                        results.append(self._run([b])[0])
                    except Exception:
                        log.exception("%s: a request failed", self.model_name)
                        results.append(None)
        for r, out in zip(good, results):
            # only the outputs the request asked for (none named: all); building the others is wasted work
            asked = set(requests[r].requested_output_names())
            names = [n for n in self.SPEC.output_names if n in asked]
            responses[r] = self._internal() if out is None else pb.InferenceResponse(output_tensors=[
                pb.Tensor(n, np.ascontiguousarray(out[n], dtype=self.out_dtypes[n]))
                for n in (names or self.SPEC.output_names)])
        return responses

    def _run(self, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        merged = batches[0] if len(batches) == 1 else {n: np.concatenate([b[n] for b in batches]) for n in batches[0]}
        return self.split(self.compute(merged), [len(next(iter(b.values()))) for b in batches])

    def _error(self, message: str, code):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))

    def _internal(self):
        return self._error(f"{self.model_name} could not answer this request (an internal error; the server log "
                           "has the details)", self.pb.TritonError.INTERNAL)

    def finalize(self) -> None:
        pass
