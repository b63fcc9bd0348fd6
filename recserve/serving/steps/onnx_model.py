"""An ONNX graph run by ONNX Runtime inside a python-backend model (the embedded flavor).

The pip-installed tritonserver has no onnxruntime backend; this runs the very same model.onnx that the
native flavor hands to Triton's onnxruntime (or TensorRT) backend. Triton's [B, 1] rows are squeezed for a
graph input of rank 1, as `reshape: { shape: [] }` does in the native flavor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.serving import spec
from recserve.serving.steps.base import BatchedModel, check_finite, check_index, check_range, ort_session


class OnnxStep(BatchedModel):
    """A graph step. Its config's parameters bound the indices it gathers (written by `export repository`):
    the graph would fail the whole formed batch on one index out of range, so each request is checked first."""

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        self.SPEC = spec.step(self.model_name)
        self.session = ort_session(version_dir / "model.onnx", int(params.get("intra_op_threads", "1")))
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.bounds = {k: int(v) for k, v in params.items() if k.startswith("n_") or k == "k_max"}

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        b = self.bounds
        if self.model_name == "item_tower":
            check_index(inputs, "item_idx", b["n_items"])
            check_index(inputs, "item_year", b["n_year_buckets"])
            check_finite(inputs, "item_genres")

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: (v.reshape(v.shape[:-1]) if v.ndim == self.ranks[n] + 1 and v.shape[-1] == 1 else v)
                for n, v in inputs.items()}
        names = list(self.SPEC.output_names)
        return dict(zip(names, self.session.run(names, feed)))


def cut_to_items(parts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The ranker graph answers KMAX items per row, -1 past k: cut each response to the items it holds."""
    for part in parts:
        width = int((part["item_ids"] >= 0).sum(axis=1).max())
        for n in part:
            part[n] = part[n][:, :width]
    return parts


class RankerStep(OnnxStep):
    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        b = self.bounds
        check_index(inputs, "user_idx", b["n_users"])
        check_index(inputs, "cand_idx", b["n_items"], pad=True)
        check_range(inputs, "k", 1, b["k_max"], " (the most items one response carries)")
        check_range(inputs, "context_hour", 0, 23)
        check_range(inputs, "context_weekday", 0, 6)
        check_finite(inputs, "user_vec", "cand_src")

    def split(self, outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        return cut_to_items(super().split(outputs, sizes))
