"""What every python-backend model shares: batching requests together, per-request errors, parameters."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("recserve.triton")


class RequestError(ValueError):
    """Raised by a row-level check; becomes an error response for that one request."""


class BatchedModel:
    """Concatenates the rows of every request in a formed batch, runs `compute` once, splits the result.

    Subclasses set INPUTS / OUTPUTS and implement `load(version_dir, params)` and
    `compute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]` (batch-major arrays).
    A `validate(inputs)` hook may raise RequestError for one request; its neighbours are still answered.
    """

    INPUTS: tuple[str, ...] = ()
    OPTIONAL: tuple[str, ...] = ()   # may be absent from a request; `fill_defaults` supplies them
    OUTPUTS: tuple[str, ...] = ()

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        self.params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.repository = Path(args["model_repository"])
        version_dir = self.repository / args["model_version"]
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.load(version_dir, self.params)

    def load(self, version_dir: Path, params: dict[str, str]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise RequestError when one request's values are unusable."""

    def fill_defaults(self, inputs: dict[str, np.ndarray], rows: int) -> None:
        """Add the OPTIONAL inputs a request did not send (in place)."""

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def split(self, outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        """Per-request outputs; override when a request's output shape depends on the request."""
        bounds = np.cumsum([0, *sizes])
        return [{n: v[a:b] for n, v in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]

    def execute(self, requests):
        pb = self.pb
        responses: list = [None] * len(requests)
        good, batches = [], []
        for r, request in enumerate(requests):
            inputs = {n: pb.get_input_tensor_by_name(request, n).as_numpy() for n in self.INPUTS}
            sent = {n: pb.get_input_tensor_by_name(request, n) for n in self.OPTIONAL}
            inputs.update({n: t.as_numpy() for n, t in sent.items() if t is not None})
            try:
                if len(inputs) < len(self.INPUTS) + len(self.OPTIONAL):
                    self.fill_defaults(inputs, len(inputs[self.INPUTS[0]]))
                self.validate(inputs)
            except RequestError as exc:
                log.warning("%s: rejected a request: %s", self.model_name, exc)
                # INVALID_ARG: HTTP 400 / gRPC INVALID_ARGUMENT, the client's mistake, not the server's
                responses[r] = pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
                continue
            good.append(r)
            batches.append(inputs)
        if good:
            merged = {n: np.concatenate([b[n] for b in batches]) for n in (*self.INPUTS, *self.OPTIONAL)}
            outputs = self.compute(merged)
            for r, out in zip(good, self.split(outputs, [len(b[self.INPUTS[0]]) for b in batches])):
                tensors = [pb.Tensor(n, np.ascontiguousarray(out[n]).astype(self.out_dtypes[n], copy=False))
                           for n in self.OUTPUTS]
                responses[r] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        pass
