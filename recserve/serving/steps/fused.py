"""`recommend` in the embedded flavor: the whole path (retrieval, then the ranker graph) in one process.

The same step code and files as the `retrieval` and `ranker` models (`recserve.serving.local.LocalPipeline`
over the repository), batched once per formed batch, one instance per core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.serving import spec
from recserve.serving.local import LocalPipeline
from recserve.serving.steps.base import BatchedModel, log
from recserve.serving.steps.onnx_model import cut_to_items
from recserve.serving.steps.retrieval import check_item_tower


class TritonPythonModel(BatchedModel):
    SPEC = spec.FUSED

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        root = self.repository.parent
        self.pipeline = LocalPipeline(root, threads=int(params.get("threads", "1")))
        check_item_tower(self.pipeline.retriever.meta, root / "retrieval")
        log.warning("recommend: retrieval and ranker in one process over %s", root)

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        self.pipeline.check(inputs)

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.pipeline.run(inputs)

    def split(self, outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        return cut_to_items(super().split(outputs, sizes))
