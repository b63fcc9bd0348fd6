"""Input drift of the served path: the population stability index of what `recommend` sees, against a reference.

Two signals, per personalized row: `score`, the best item's ranker score, and `query_norm`, the norm of the
user's retrieval query (the blend vector: towers, ALS, popularity; the tower's own vector is unit length).
The reference is what the served path computes for a fixed sample of known users (the users and interactions
the version was exported with), written by the exporter beside `recommend`'s files (`drift_reference.npz`,
recserve/serving/steps/fused.py `write_reference`). Its deciles are the bins. Served rows are counted with exponential
forgetting (a window of about `window` rows), and

    PSI = sum over bins (p - q) * ln(p / q),   p served share, q reference share (both floored at 1e-4)

is exported as the gauge `recserve_drift_psi{signal=...}` (recserve/serving/steps/fused.py), NaN until the
window holds `MIN_ROWS` rows (an idle replica never alarms). The usual reading:
below 0.1 stable, 0.1-0.25 a shift worth a look, above 0.25 a different population
(deploy/prometheus/recserve-rules.yml alerts above 0.25 for 15 minutes). numpy only.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-4
MIN_ROWS = 200     # the least (forgetting-weighted) rows a PSI is reported for


def psi(served: np.ndarray, reference: np.ndarray) -> float:
    """PSI between two histograms (counts or shares) over the same bins."""
    p = np.maximum(np.asarray(served, np.float64) / max(float(np.sum(served)), 1e-12), FLOOR)
    q = np.maximum(np.asarray(reference, np.float64) / max(float(np.sum(reference)), 1e-12), FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


class Drift:
    """One signal: deciles of a reference sample as bins, and a forgetting histogram of served values."""

    def __init__(self, reference: np.ndarray, bins: int = 10, window: int = 1000):
        reference = np.asarray(reference, np.float64)
        reference = reference[np.isfinite(reference)]
        if len(reference) < bins:
            raise ValueError(f"a drift reference needs at least {bins} finite values, got {len(reference)}")
        self.edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
        self.reference = np.bincount(np.searchsorted(self.edges, reference, side="right"),
                                     minlength=len(self.edges) + 1).astype(np.float64)
        self.window = float(window)
        self.counts = np.zeros_like(self.reference)
        self.seen = 0

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.counts *= np.exp(-len(values) / self.window)
        self.counts += np.bincount(np.searchsorted(self.edges, values, side="right"), minlength=len(self.counts))
        self.seen += len(values)

    def value(self) -> float:
        """The PSI of the served window against the reference; NaN while the window holds fewer than
        `MIN_ROWS` rows (a handful of requests says nothing about a population, and would alarm)."""
        return psi(self.counts, self.reference) if self.counts.sum() >= MIN_ROWS else float("nan")


def le_label(edge: float) -> str:
    """A bucket bound as Prometheus's `le` label: 4 significant digits (values are binned by the printed bound)."""
    return "+Inf" if edge == np.inf else f"{edge:.4g}"


class Buckets:
    """A Prometheus histogram's cumulative buckets, counted in process and handed over in bulk.

    Triton 2.51's python backend has HISTOGRAM metrics, but each `observe` is one round trip to the server
    process, one per value (a metrics-API call per answer cost 6.7% of p50 at concurrency 1). So the model
    counts values here and `take()` gives the increments of every `NAME_bucket{le=...}` counter since the last
    call: PromQL's histogram_quantile() reads `le`-labelled counters as it reads a histogram's buckets.
    A value v falls in every bucket with v <= le; NaN is not counted."""

    def __init__(self, edges):
        bounds = sorted({float(le_label(float(e))) for e in np.asarray(edges, np.float64).reshape(-1)
                         if np.isfinite(e)})
        self.edges = np.array(bounds, np.float64)
        self.labels = [le_label(e) for e in self.edges] + ["+Inf"]
        self.pending = np.zeros(len(self.labels), np.int64)

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).reshape(-1)
        values = values[~np.isnan(values)]
        if len(values):
            self.pending += np.bincount(np.searchsorted(self.edges, values, side="left"),
                                        minlength=len(self.labels))

    def take(self) -> dict[str, int]:
        """{le label: how many values since the last call are <= it}, for the buckets that grew."""
        cumulative = np.cumsum(self.pending)
        self.pending[:] = 0
        return {label: int(n) for label, n in zip(self.labels, cumulative) if n}
