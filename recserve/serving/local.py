"""The served path run in-process: the same step code, graphs, index and tables as the server, no Triton.

The served-vs-offline parity test scores it over the test split, and the plain FastAPI baseline of the
serving benchmark serves it. It follows the serving spec's wiring, as the ensemble and the client do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recserve.serving import spec
from recserve.serving.steps.base import ort_session
from recserve.serving.steps.retrieval import Retriever, check_request


class LocalPipeline:
    """`recommend` over a repository written by `recserve export repository`, in this process."""

    def __init__(self, repository: Path, threads: int = 1):
        repository = Path(repository)
        manifest = json.loads((repository / "manifest.json").read_text())
        self.k_max = int(manifest["k_max"])
        self.retriever = Retriever(repository / "retrieval" / "1",
                                   {"k_max": str(self.k_max), "omp_threads": str(threads),
                                    "intra_op_threads": str(threads)})
        self.ranker = ort_session(repository / "ranker" / "1" / "model.onnx", threads)
        self.ranker_inputs = spec.step("ranker").input_names
        self.outputs = [t.name for t in spec.RESPONSE]

    def check(self, request: dict[str, np.ndarray]) -> None:
        """Raise RequestError naming a bad value; completes the request in place (context, user index)."""
        check_request(request, self.retriever.user_ids, self.k_max)

    def run(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked request rows -> item_ids, scores ([B, KMAX], -1 past k): retrieval, then the ranker graph."""
        tensors = {**request, **self.retriever(request)}
        return dict(zip(self.outputs, self.ranker.run(self.outputs, {n: tensors[n] for n in self.ranker_inputs})))

    def __call__(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Request tensors ([B, 1] rows) -> item_ids, scores ([B, KMAX], -1 past k). Raises RequestError."""
        tensors = dict(request)
        self.check(tensors)
        return self.run(tensors)

    def recommend(self, user_ids: np.ndarray, k: int, hour: np.ndarray, weekday: np.ndarray) -> np.ndarray:
        """(B, k) raw item ids for many users at once (-1 where fewer items exist)."""
        col = lambda a, dtype=np.int64: np.asarray(a, dtype).reshape(-1, 1)  # noqa: E731
        out = self({"user_id": col(user_ids), "k": col(np.full(len(user_ids), k), np.int32),
                    "hour": col(hour), "weekday": col(weekday)})
        return out["item_ids"][:, :k]
