"""Titles for display, off the request path: raw item ids in, titles out ("" for an unknown id)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.serving import spec
from recserve.serving.steps.base import BatchedModel, RequestError


class Catalogue:
    def __init__(self, version_dir: Path):
        with np.load(version_dir / "items.npz") as z:
            self.item_ids = z["item_ids"]
            self.titles = np.array([t.encode("utf-8") for t in z["titles"]] + [b""], dtype=object)

    def __call__(self, item_ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.item_ids, item_ids), 0, len(self.item_ids) - 1)
        return self.titles[np.where(self.item_ids[pos] == item_ids, pos, len(self.item_ids))]


class TritonPythonModel(BatchedModel):
    SPEC = spec.step("catalogue")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        self.catalogue = Catalogue(version_dir)

    MAX_IDS = spec.MAX_WIDTH

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        if inputs["item_ids"].shape[-1] > self.MAX_IDS:
            raise RequestError(f"item_ids holds {inputs['item_ids'].shape[-1]} ids: ask for at most {self.MAX_IDS} "
                               "titles per request")

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"titles": self.catalogue(inputs["item_ids"])}
