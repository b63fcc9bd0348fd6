"""`recommend` in the embedded flavor: the whole path (retrieval, then the ranker graph) in one process.

The same step code and files as the `retrieval` and `ranker` models (`recserve.serving.local.LocalPipeline`
over the repository), batched once per formed batch, one instance per core. It also answers users the model has
never seen, applies the request's rules and exploration, and falls back when a step fails (`LocalPipeline.serve`);
each answer's `source` and each fallback are counted in Triton's metrics (port 8002):
`recserve_responses_total{source=...}` and `recserve_fallbacks_total{kind=...}`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.serving import spec
from recserve.serving.local import OPTIONS_KEY, LocalPipeline
from recserve.serving.steps.base import BatchedModel, log
from recserve.serving.steps.retrieval import check_item_tower, check_request


class TritonPythonModel(BatchedModel):
    SPEC = spec.FUSED

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        root = self.repository.parent
        self.pipeline = LocalPipeline(root, threads=int(params.get("threads", "1")),
                                      ranker_timeout=float(params.get("ranker_timeout_ms", "250")) / 1000,
                                      version=int(version_dir.name))
        check_item_tower(self.pipeline.retriever.meta, root / "retrieval" / version_dir.name)
        self._counters: dict[tuple[str, str], object] = {}
        self._families = {}
        try:
            family = self.pb.MetricFamily
            self._families = {
                "fallbacks": family(name="recserve_fallbacks_total", kind=family.COUNTER,
                                    description="requests answered by a fallback, by the step that failed"),
                "responses": family(name="recserve_responses_total", kind=family.COUNTER,
                                    description="rows answered by recommend, by source"),
            }
        except Exception:  # noqa: BLE001 - a backend without the metrics API still serves
            log.warning("recommend: custom metrics are not available in this python backend")
        self.pipeline.on_fallback = lambda kind: self._count("fallbacks", "kind", kind)
        self._warm_up()
        log.warning("recommend: retrieval and ranker in one process over %s, version %s", root, version_dir.name)

    def _warm_up(self, users: int = 8) -> None:
        """A few real requests before the instance takes traffic: the first ONNX Runtime runs and FAISS searches
        are slow (allocations, page faults), and a version switch (`recserve deploy`) hands traffic straight over."""
        ids = self.pipeline.retriever.user_ids[:users].reshape(-1, 1).astype(np.int64)
        for rows in (ids[:1], ids):
            request = {"user_id": rows, "k": np.full((len(rows), 1), min(10, self.pipeline.k_max), np.int32)}
            self.validate(request)
            self.pipeline.serve([request])

    def _count(self, family: str, label: str, value: str) -> None:
        if family not in self._families:
            return
        key = (family, value)
        if key not in self._counters:
            self._counters[key] = self._families[family].Metric(labels={label: value})
        self._counters[key].increment(1)

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        check_request(inputs, self.pipeline.retriever.user_ids, self.pipeline.k_max, allow_unknown=True)
        inputs[OPTIONS_KEY] = [self.pipeline.options(inputs, row) for row in range(len(inputs["user_id"]))]

    def _run(self, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outputs = self.pipeline.serve(batches)
        for out in outputs:
            for s in out["source"].reshape(-1):
                self._count("responses", "source", s.decode())
        return outputs
