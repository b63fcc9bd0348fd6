"""Items for display and for the rules a client applies itself, off the request path.

Raw item ids (or dense indices, as retrieval's `cand_idx`) in; titles, raw ids, genres, year buckets and item
vectors out ("" / -1 / zeros for an unknown id). The client's pipeline mode reads them to apply
`recserve.rules` to the ranker's list, and to map the retrieval order to raw ids when the ranker fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.rules import ItemTable
from recserve.serving import spec
from recserve.serving.steps.base import BatchedModel, RequestError


class Catalogue:
    def __init__(self, version_dir: Path):
        with np.load(version_dir / "items.npz") as z:
            self.table = ItemTable(z["item_ids"], z["genres"], z["year"], z["vectors"])
            self.titles = np.array([t.encode("utf-8") for t in z["titles"]] + [b""], dtype=object)
        t, self.n = self.table, len(self.table)
        # one extra row for an unknown id: "", -1 and zeros
        self.raw = np.append(t.item_ids, -1)
        self.genres = np.concatenate([t.genres, np.zeros((1, t.genres.shape[1]))]).astype(np.float32)
        self.year = np.append(t.year, 0).astype(np.int64)
        self.vectors = np.concatenate([t.vectors, np.zeros((1, t.vectors.shape[1]), np.float32)])

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        rows = self.table.rows(item_ids)
        return np.where(rows >= 0, rows, self.n)

    def __call__(self, item_ids: np.ndarray) -> np.ndarray:
        return self.titles[self.rows(item_ids)]

    def lookup(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"titles": self.titles[rows], "raw_item_ids": self.raw[rows], "item_genres": self.genres[rows],
                "item_year": self.year[rows], "item_vec": self.vectors[rows]}


class TritonPythonModel(BatchedModel):
    SPEC = spec.step("catalogue")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        self.catalogue = Catalogue(version_dir)

    MAX_IDS = spec.MAX_WIDTH

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        given = [n for n in ("item_ids", "item_idx") if n in inputs]
        if len(given) != 1:
            raise RequestError("send item_ids (raw ids) or item_idx (dense indices), one of the two")
        name = given[0]
        if inputs[name].shape[-1] > self.MAX_IDS:
            raise RequestError(f"{name} holds {inputs[name].shape[-1]} ids: ask for at most {self.MAX_IDS} "
                               "items per request")
        if name == "item_idx":
            idx = inputs[name]
            if idx.size and (idx.min() < 0 or idx.max() >= self.catalogue.n):
                raise RequestError(f"item_idx must be in 0..{self.catalogue.n - 1} (the catalogue's dense "
                                   f"indices), got {int(idx.min())}..{int(idx.max())}")

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "item_idx" in inputs:
            return self.catalogue.lookup(inputs["item_idx"])
        return self.catalogue.lookup(self.catalogue.rows(inputs["item_ids"]))
