"""`recommend` as one python model: the whole path (retrieval, then the ranker graph) in one process (embedded
flavor), or retrieval here and the `ranker` model, on Triton's onnxruntime / TensorRT backend, through BLS (native
flavor: config parameter `ranker_model`).

The same step code and files as the `retrieval` and `ranker` models (`recserve.serving.local.LocalPipeline`
over the repository), batched once per formed batch, one instance per core. It also answers users the model has
never seen, applies the request's rules and exploration, and falls back when a step fails (`LocalPipeline.serve`);
each answer's `source` and each fallback are counted in Triton's metrics (port 8002):
`recserve_responses_total{source=...}` and `recserve_fallbacks_total{kind=...}`; per personalized row, the best
item's score and the number of candidates retrieval found go into histograms
(`recserve_score_bucket{le, version}`, in the deciles of the exported reference; `recserve_candidates_bucket{le,
version}`, in fractions of K), and their PSI against the reference into `recserve_drift_psi` (recserve/drift.py).

While an A/B split runs (`recserve ab start`: config parameter `recserve_ab`), the newest loaded version, the one
Triton hands a request that names no version, forwards each request whose users are all in the other arm to that
arm's version through BLS, so any client (a third-party gRPC one included) is split as the front door splits
HTTP; the `version` output names who answered. Requests naming a version reach it this way too, unless they carry
the request parameter `recserve_pin`; the front door and `RecClient` ask for the arm's own version, never
forwarded. A forward that fails (the other version still loading, or a bad request) is served here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from recserve.drift import Buckets, Drift
from recserve.serving import spec
from recserve.serving.local import OPTIONS_KEY, LocalPipeline
from recserve.serving.split import PIN, read_split, version_of
from recserve.serving.steps.base import BatchedModel, log
from recserve.serving.steps.retrieval import check_item_tower, check_request

DRIFT_USERS = 256      # known users whose signals are the drift reference, computed at export
DRIFT_EVERY_S = 1.0
FLUSH_S = 0.5          # counts reach Triton's /metrics at most this long after the request that follows them
REFERENCE_FILE = "drift_reference.npz"    # recommend/V/: the drift reference, computed at export


def check(pipeline: LocalPipeline, inputs: dict[str, np.ndarray]) -> None:
    """A request as `recommend` takes it: checked (RequestError names a bad value), its rows' options parsed."""
    check_request(inputs, pipeline.retriever.user_ids, pipeline.k_max, allow_unknown=True)
    inputs[OPTIONS_KEY] = [pipeline.options(inputs, row) for row in range(len(inputs["user_id"]))]


def served_signals(pipeline: LocalPipeline, batches: list[dict[str, np.ndarray]],
                   outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per personalized row that is not the supervisor's canary: the best item's score and the norm of the
    retrieval query (the retrieval step's, for the known rows of this call, in order); per known row that is
    not a canary, the candidates retrieval found."""
    idx = np.concatenate([b["user_idx"].reshape(-1) for b in batches])
    canary = np.concatenate([(b["exclude"] < 0).any(axis=1) if "exclude" in b else np.zeros(len(b["user_id"]), bool)
                             for b in batches])
    personal = np.concatenate([o["source"].reshape(-1) == b"personalized" for o in outputs])
    top = np.concatenate([o["scores"][:, 0] for o in outputs])
    known = np.flatnonzero(idx >= 0)
    keep = personal[known] & ~canary[known] & (top[known] > -1e30)    # a row with no item has no score
    norms = getattr(pipeline.retriever, "last_query_norms", None)
    found = getattr(pipeline.retriever, "last_candidates", None)
    out = {"score": top[known][keep]}
    if norms is not None and len(norms) == len(known):
        out["query_norm"] = norms[keep]
    if found is not None and len(found) == len(known):
        out["candidates"] = found[~canary[known]]      # the ranker's fallback rows too: retrieval answered
    return out


def reference_signals(pipeline: LocalPipeline, users: int = DRIFT_USERS) -> dict[str, np.ndarray]:
    """The drift signals (score, query_norm) of a fixed sample of known users, as the served path computes them.
    Run with the ranker's timeout off (LocalPipeline's default): the reference is the ranker's own scores."""
    known = pipeline.retriever.user_ids
    pick = np.unique(np.linspace(0, len(known) - 1, min(users, len(known))).astype(np.int64))
    seen: dict[str, list[np.ndarray]] = {"score": [], "query_norm": []}
    for part in np.array_split(pick, max(1, len(pick) // 64)):
        request = {"user_id": known[part].reshape(-1, 1).astype(np.int64), "k": np.ones((len(part), 1), np.int32)}
        check(pipeline, request)
        for name, values in served_signals(pipeline, [request], pipeline.serve([request])).items():
            if name in seen:
                seen[name].append(values)
    return {name: np.concatenate(v) if v else np.zeros(0, np.float64) for name, v in seen.items()}


def write_reference(repository: Path, version: int) -> Path:
    """At export (recserve.serving.repository.write_repository): the drift reference of `version`, beside
    recommend's files, so that each instance reads it rather than computing it while it loads (0.7 s of a
    0.8 s load on ML-100K, at nice 19 on cores a deploy shares with the requests), and every instance bins
    by the same deciles."""
    path = Path(repository) / spec.ENSEMBLE / str(version) / REFERENCE_FILE
    np.savez(path, **reference_signals(LocalPipeline(repository, version=version)))
    return path


class TritonPythonModel(BatchedModel):
    SPEC = spec.FUSED

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        root = self.repository.parent
        self.version, self.version_dir = version_dir.name, version_dir
        self.pipeline = LocalPipeline(root, threads=int(params.get("threads", "1")),
                                      ranker_timeout=float(params.get("ranker_timeout_ms", "250")) / 1000,
                                      version=int(version_dir.name))
        check_item_tower(self.pipeline.retriever.meta, root / "retrieval" / version_dir.name)
        self._counters: dict[tuple[str, str], object] = {}
        self._pending: dict[tuple[str, str], int] = {}
        self._flushed_at = time.monotonic()
        self._families = {}
        # `custom_metrics` "0" (loadtest/bench_metrics_cost.py measures with and without): no counters, no drift
        self.custom_metrics = params.get("custom_metrics", "1") != "0"
        if self.custom_metrics:
            try:
                family = self.pb.MetricFamily
                self._families = {
                    "fallbacks": family(name="recserve_fallbacks_total", kind=family.COUNTER,
                                        description="requests answered by a fallback, by the step that failed"),
                    "responses": family(name="recserve_responses_total", kind=family.COUNTER,
                                        description="rows answered by recommend, by source"),
                    "forwarded": family(name="recserve_ab_forwarded_total", kind=family.COUNTER,
                                        description="requests the newest version handed to their A/B arm's version"),
                }
            except Exception:  # noqa: BLE001 - a backend without the metrics API still serves
                log.warning("recommend: custom metrics are not available in this python backend")
        self.pipeline.on_fallback = lambda kind: self._count("fallbacks", "kind", kind)
        self.ab_split = split = read_split(params)
        # only the version Triton serves to requests naming none splits them (the older arm never forwards)
        self.splits_here = bool(split) and int(self.version) == max(int(split["a"]), int(split["b"]))
        # The load waits for the ranker: its warm-up and the drift reference must be the ranker's own answers. With
        # the serving timeout, a deploy onto busy cores (this load runs at nice 19) timed every reference batch
        # out into the retrieval order, and the load failed (loadtest/bench_swap.py on ML-100K).
        timeout, self.pipeline.ranker_timeout = self.pipeline.ranker_timeout, 0.0
        try:
            self._warm_up()
            self.drift, self._drift_failed, self._histograms = {}, False, {}
            self._drift_gauges, self._drift_at = {}, time.monotonic()
            if self.custom_metrics:
                self._drift_reference()
                self._histograms_from_reference()
        finally:
            self.pipeline.ranker_timeout = timeout
        # native flavor: the ranker graph on Triton's onnxruntime / TensorRT backend, asked through BLS from here on
        # (the warm-up and the drift reference above ran it in process: no other model need be loaded yet)
        self.ranker_model = params.get("ranker_model")
        if self.ranker_model:
            self.pipeline.remote_rank = self._bls_rank
        log.warning("recommend: retrieval and ranker in one process over %s, version %s", root, version_dir.name)

    def serving_thread(self) -> None:
        self.pipeline.retriever.serving_thread()
        self.pipeline.serving_thread()

    def _bls_rank(self, feed: dict[str, np.ndarray], timeout: float) -> list[np.ndarray]:
        """The `ranker` model of this version, asked through BLS (Triton's python backend calling another model);
        an error or a timeout raises, and the pipeline serves the retrieval order."""
        pb = self.pb
        names = self.pipeline.outputs
        args = {"model_name": self.ranker_model, "model_version": int(self.version), "requested_output_names": names,
                "inputs": [pb.Tensor(n, np.ascontiguousarray(v)) for n, v in feed.items()]}
        if timeout > 0:
            args["timeout"] = int(timeout * 1e6)          # microseconds
        response = pb.InferenceRequest(**args).exec()
        if response.has_error():
            raise RuntimeError(f"{self.ranker_model}: {response.error().message()}")
        return [pb.get_output_tensor_by_name(response, n).as_numpy() for n in names]

    def _warm_up(self, users: int = 8) -> None:
        """A few real requests before the instance takes traffic: the first ONNX Runtime runs and FAISS searches
        are slow (allocations, page faults), and a version switch (`recserve deploy`) hands traffic straight over."""
        ids = self.pipeline.retriever.user_ids[:users].reshape(-1, 1).astype(np.int64)
        for rows in (ids[:1], ids):
            request = {"user_id": rows, "k": np.full((len(rows), 1), min(10, self.pipeline.k_max), np.int32)}
            self.validate(request)
            self.pipeline.serve([request])

    def _drift_reference(self) -> None:
        """The drift reference (the exported one, or computed here for a repository written before it was
        exported; recserve/drift.py), then the PSI gauges."""
        path = self.version_dir / REFERENCE_FILE
        if path.exists():
            with np.load(path) as z:
                seen = {name: z[name] for name in z.files}
        else:
            seen = reference_signals(self.pipeline)
        try:
            self.drift = {name: Drift(v) for name, v in seen.items()}
        except ValueError as exc:      # monitoring never keeps a version from serving
            log.warning("recommend: no drift gauges for version %s: %s", self.version, exc)
            self.drift = {}
            return
        try:
            family = self.pb.MetricFamily(name="recserve_drift_psi", kind=self.pb.MetricFamily.GAUGE,
                                          description="population stability index of served rows against the "
                                                      "reference exported with the version, by signal "
                                                      "(score, query_norm)")
            labels = {"version": self.version, "model_instance": self.instance}   # "instance" is the scrape's
            self._drift_family = family          # a family must outlive its metrics (the backend says so)
            self._drift_gauges = {name: family.Metric(labels={"signal": name, **labels}) for name in self.drift}
            for gauge in self._drift_gauges.values():
                gauge.set(float("nan"))       # until enough rows were served (recserve.drift.MIN_ROWS)
        except Exception:  # noqa: BLE001 - a backend without the metrics API still serves
            log.warning("recommend: no drift gauges: custom metrics are not available in this python backend")
        self._drift_at = time.monotonic()

    def _histograms_from_reference(self) -> None:
        """The histogram series, every bucket from the start (histogram_quantile needs them all): the score's
        bounds are the reference's deciles (so a served population like the reference fills each tenth), the
        candidates' are fractions of K, with K - 1 (rows that got fewer than K)."""
        k = int(self.pipeline.retriever.k)
        bounds = {"score": self.drift["score"].edges if "score" in self.drift else [],
                  "candidates": sorted({0, k // 10, k // 4, k // 2, (3 * k) // 4, (9 * k) // 10, k - 1})}
        about = {"score": "the best item's score per personalized row, in the deciles of the exported reference",
                 "candidates": "candidates retrieval found per known-user row (K at most)"}
        try:
            for name, edges in bounds.items():
                family = self.pb.MetricFamily(name=f"recserve_{name}_bucket", kind=self.pb.MetricFamily.COUNTER,
                                              description=about[name] + "; cumulative buckets by le")
                buckets = Buckets(edges)
                series = {le: family.Metric(labels={"le": le, "version": self.version}) for le in buckets.labels}
                self._histograms[name] = (buckets, series, family)    # a family must outlive its metrics
        except Exception:  # noqa: BLE001 - a backend without the metrics API still serves
            log.warning("recommend: no histograms: custom metrics are not available in this python backend")
            self._histograms = {}

    def _observe(self, batches: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> None:
        if not (self.drift or self._histograms):
            return
        for name, values in served_signals(self.pipeline, batches, outputs).items():
            if name in self.drift:
                self.drift[name].observe(values)
            if name in self._histograms:
                self._histograms[name][0].observe(values)
        if time.monotonic() - self._drift_at >= DRIFT_EVERY_S:       # a PSI per second is plenty for Prometheus
            self._drift_at = time.monotonic()
            for name, gauge in self._drift_gauges.items():
                gauge.set(self.drift[name].value())

    def _count(self, family: str, label: str, value: str) -> None:
        """Counted here, handed to Triton at most every `FLUSH_S`: each call of the backend's metrics API is a
        round trip to the server process (with one per answer, p50 at concurrency 1 was 6.7% above the same
        server without custom metrics in one run of loadtest/bench_metrics_cost.py)."""
        if family not in self._families:
            return
        key = (family, value)
        if key not in self._counters:       # a series exists from its first count on
            self._counters[key] = self._families[family].Metric(labels={label: value})
            self._counters[key].increment(1)
            return
        self._pending[key] = self._pending.get(key, 0) + 1
        self._flush()

    def _flush(self, force: bool = False) -> None:
        if (self._pending or self._histograms) and (force or time.monotonic() - self._flushed_at >= FLUSH_S):
            self._flushed_at = time.monotonic()
            pending, self._pending = self._pending, {}
            for key, n in pending.items():
                self._counters[key].increment(n)
            for buckets, series, _ in self._histograms.values():
                for le, n in buckets.take().items():
                    series[le].increment(n)

    def finalize(self) -> None:
        self._flush(force=True)

    def execute(self, requests):
        if not self.splits_here:
            return super().execute(requests)
        responses: list = [None] * len(requests)
        here = []
        for r, request in enumerate(requests):
            target = self._arm_elsewhere(request)
            responses[r] = self._forward(request, target) if target is not None else None
            if responses[r] is None:
                here.append(r)
        if here:
            for r, response in zip(here, super().execute([requests[r] for r in here])):
                responses[r] = response
        return responses

    def _arm_elsewhere(self, request) -> int | None:
        """The other arm's version when every user of the request belongs to it (and the request is not pinned)."""
        try:
            if json.loads(request.parameters() or "{}").get(PIN):
                return None
            users = self.pb.get_input_tensor_by_name(request, "user_id")
            versions = ({version_of(self.ab_split, int(u)) for u in users.as_numpy().reshape(-1)}
                        if users is not None else set())
        except Exception:  # noqa: BLE001 - a malformed request is this version's to refuse, by name
            return None
        return versions.pop() if len(versions) == 1 and int(self.version) not in versions else None

    def _forward(self, request, version: int):
        """The request as asked of `version` of this model through BLS, or None (served here) when that fails."""
        pb = self.pb
        inputs = [t for t in (pb.get_input_tensor_by_name(request, n) for n in self.SPEC.input_names) if t is not None]
        names = list(request.requested_output_names()) or list(self.SPEC.output_names)
        try:
            response = pb.InferenceRequest(model_name=self.model_name, model_version=int(version), inputs=inputs,
                                           requested_output_names=names).exec()
        except Exception:  # noqa: BLE001
            log.exception("recommend: forwarding a request to version %s failed; serving it here", version)
            return None
        if response.has_error():     # a bad request gets this version's own INVALID_ARG; still loading: served here
            return None
        self._count("forwarded", "version", str(version))
        return pb.InferenceResponse(output_tensors=response.output_tensors())

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        check(self.pipeline, inputs)

    def _run(self, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outputs = self.pipeline.serve(batches)
        try:
            self._observe(batches, outputs)
        except Exception:  # noqa: BLE001 - monitoring never fails a request
            if not self._drift_failed:
                log.exception("recommend: drift monitoring failed; it and the histograms are off for this instance")
            self._drift_failed, self.drift, self._histograms = True, {}, {}
        for out in outputs:
            for s in out["source"].reshape(-1):
                self._count("responses", "source", s.decode())
        return outputs
