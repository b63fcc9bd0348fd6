"""Serving benchmark: the real Triton server against the in-process PyTorch reference, side by side.

Starts ``tritonserver`` on free 127.0.0.1 ports (:class:`recserve.server.TritonServer`) and drives it with a
bounded closed-loop load generator: ``C`` threads, each with its own :class:`recserve.client.RecClient`, each
sending its next request as soon as the last one is answered, for ``--duration`` seconds after
``--warmup`` seconds. Cells (target x concurrency):

- ``ensemble/grpc``, ``ensemble/http``: one call to the server-side ensemble ``recommend``;
- ``pipeline/grpc``: the client calls the six stages itself (``RecClient(mode="pipeline")``);
- ``reference``: :meth:`recserve.reference.Reference.recommend` in this process, no server (the no-serving
  baseline: PyTorch eager, exact search).

For every server cell, Triton's per-model statistics are read before and after the measured window; the
difference gives inference_count / execution_count, the average batch Triton's dynamic batcher formed.

    python loadtest/bench_serving.py --repository model_repository --artifacts work/artifacts \\
        --duration 10 --concurrency 1,8 --json work/bench_serving.json

The load generator and the server share this machine's cores: on a small machine the figures measure
both together, which is the honest number for a single-box deployment, not the server's ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from recserve.client import RecClient
from recserve.errors import RecserveError
from recserve.server import TritonServer, free_port

HOST = "127.0.0.1"  # only a server this script starts is measured
Call = Callable[[int, int, int], int]  # (user_id, hour, weekday) -> number of items


@dataclass
class Cell:
    """One measured cell: a target at one concurrency."""

    target: str
    concurrency: int
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    mean_items: float = 0.0
    first_error: str | None = None
    models: dict[str, dict[str, float]] = field(default_factory=dict)


def closed_loop(
    make_call: Callable[[], Call],
    user_ids: np.ndarray,
    concurrency: int,
    duration: float,
    warmup: float,
    seed: int = 0,
    on_measure_start: Callable[[], None] | None = None,
    join_timeout: float = 30.0,
) -> Cell:
    """Run ``concurrency`` threads for ``warmup + duration`` seconds; time the requests started after warmup.

    ``make_call`` runs once per thread (each thread gets its own client). The measured window is
    [end of warmup, end of duration]; a request started inside it counts, even if it ends after.
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    items: list[list[int]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    first_error: list[str] = []
    last_end = [0.0] * concurrency
    stop = threading.Event()
    ready = threading.Barrier(concurrency + 1)
    t0 = [0.0]

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        try:
            call = make_call()
        except Exception as exc:  # a client that cannot be made is an error of every request it would send
            first_error.append(f"{type(exc).__name__}: {exc}")
            errors[i] += 1
            ready.wait()
            return
        ready.wait()
        measure_from, until = t0[0] + warmup, t0[0] + warmup + duration
        while not stop.is_set():
            start = time.perf_counter()
            if start >= until:
                break
            user = int(user_ids[rng.randrange(len(user_ids))])
            try:
                n = call(user, rng.randrange(24), rng.randrange(7))
                ok = True
            except Exception as exc:  # RecserveError by contract; counted, never fatal to the run
                ok, n = False, 0
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
            end = time.perf_counter()
            if start >= measure_from:
                if ok:
                    latencies[i].append(end - start)
                    items[i].append(n)
                else:
                    errors[i] += 1
                last_end[i] = end

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    t0[0] = time.perf_counter()
    ready.wait()
    try:
        time.sleep(max(0.0, t0[0] + warmup - time.perf_counter()))
        if on_measure_start is not None:
            on_measure_start()
        time.sleep(max(0.0, t0[0] + warmup + duration - time.perf_counter()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(join_timeout)
    lat = np.array([x for per in latencies for x in per]) * 1000.0
    seconds = max(max(last_end) - (t0[0] + warmup), 1e-9) if lat.size or any(errors) else duration
    cell = Cell(target="", concurrency=concurrency, seconds=seconds, requests=int(lat.size), errors=sum(errors),
                first_error=first_error[0] if first_error else None)
    if lat.size:
        cell.rps = lat.size / seconds
        cell.p50_ms, cell.p90_ms, cell.p99_ms = (float(np.percentile(lat, q)) for q in (50, 90, 99))
        cell.mean_ms = float(lat.mean())
        cell.mean_items = float(np.mean([n for per in items for n in per]))
    return cell


# -- Triton statistics -----------------------------------------------------------------------------

def _ns(stats: dict, key: str) -> tuple[int, int]:
    entry = stats.get("inference_stats", {}).get(key, {})
    return int(entry.get("count", 0)), int(entry.get("ns", 0))


def model_stats(grpc_url: str) -> dict[str, dict[str, int]]:
    """Cumulative per-model counters (summed over versions); int64 fields arrive as JSON strings."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        raw = client.get_inference_statistics(as_json=True, client_timeout=10.0)
    finally:
        client.close()
    out: dict[str, dict[str, int]] = {}
    for stats in raw.get("model_stats", []):
        row = out.setdefault(stats["name"], {"inference_count": 0, "execution_count": 0, "success": 0,
                                             "queue_ns": 0, "compute_infer_ns": 0})
        row["inference_count"] += int(stats.get("inference_count", 0))
        row["execution_count"] += int(stats.get("execution_count", 0))
        row["success"] += _ns(stats, "success")[0]
        row["queue_ns"] += _ns(stats, "queue")[1]
        row["compute_infer_ns"] += _ns(stats, "compute_infer")[1]
    return out


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per model with traffic in the window: inferences, executions, avg batch, avg queue and compute (µs)."""
    delta: dict[str, dict[str, float]] = {}
    for name, now in sorted(after.items()):
        then = before.get(name, {})
        d = {key: now[key] - then.get(key, 0) for key in now}
        if d["inference_count"] <= 0 and d["success"] <= 0:
            continue
        delta[name] = {
            "inferences": d["inference_count"],
            "executions": d["execution_count"],
            "avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else float("nan"),
            "queue_us": d["queue_ns"] / d["success"] / 1e3 if d["success"] else float("nan"),
            "compute_us": d["compute_infer_ns"] / d["success"] / 1e3 if d["success"] else float("nan"),
        }
    return delta


# -- targets ----------------------------------------------------------------------------------------

def server_call(url: str, protocol: str, mode: str, k: int, timeout: float, candidates: int) -> Callable[[], Call]:
    def make() -> Call:
        client = RecClient(url, protocol=protocol, timeout=timeout, candidates=candidates)

        def call(user: int, hour: int, weekday: int) -> int:
            return len(client.recommend(user, k=k, hour=hour, weekday=weekday, mode=mode).items)

        return call

    return make


def reference_call(reference, k: int) -> Callable[[], Call]:
    index_of = {int(u): i for i, u in enumerate(reference.ds.user_ids)}

    def make() -> Call:
        def call(user: int, hour: int, weekday: int) -> int:
            if user not in index_of:
                raise RecserveError(f"unknown user {user}")
            (idx, _scores), = reference.recommend(np.array([index_of[user]]), np.array([hour]), np.array([weekday]), k)
            return len(reference.ds.item_ids[idx])  # raw ids, as the server returns

        return call

    return make


def load_user_ids(artifacts: Path, repository: Path) -> np.ndarray:
    for path in (artifacts / "onnx" / "user_features.npz", repository / "user_features" / "1" / "user_features.npz"):
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return z["user_ids"].astype(np.int64)
    raise SystemExit(f"bench_serving: no user ids in {artifacts}/onnx/user_features.npz or the repository; "
                     "run `recserve export onnx` and `recserve export repository` first")


# -- report ------------------------------------------------------------------------------------------

def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def markdown(cells: list[Cell]) -> str:
    lines = ["| target | concurrency | req/s | p50 ms | p90 ms | p99 ms | mean ms | requests | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c.target} | {c.concurrency} | {_f(c.rps)} | {_f(c.p50_ms, 2)} | {_f(c.p90_ms, 2)} | "
                     f"{_f(c.p99_ms, 2)} | {_f(c.mean_ms, 2)} | {c.requests} | {c.errors} |")
    served = [c for c in cells if c.models]
    if served:
        names = sorted({name for c in served for name in c.models})
        for key, title, digits in (("avg_batch", "average batch formed (inference_count / execution_count)", 2),
                                   ("queue_us", "average queue time per request, µs", 0),
                                   ("compute_us", "average compute_infer time per request, µs", 0)):
            lines += ["", f"Triton per-model statistics: {title}", "",
                      "| model | " + " | ".join(f"{c.target} c={c.concurrency}" for c in served) + " |",
                      "|---|" + "---:|" * len(served)]
            for name in names:
                values = [_f(c.models[name][key], digits) if name in c.models else "" for c in served]
                lines.append(f"| {name} | " + " | ".join(values) + " |")
    errors = [c for c in cells if c.first_error]
    if errors:
        lines += [""] + [f"- {c.target} c={c.concurrency}: first error: {c.first_error}" for c in errors]
    return "\n".join(lines)


def _finite(value: object) -> object:
    """NaN (a cell without successes, a model without executions) becomes null: strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _csv_list(text: str, cast: type = str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--artifacts", type=Path, default=Path("work/artifacts"),
                        help="trained artifacts: user ids (onnx/user_features.npz) and the reference's checkpoints")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell")
    parser.add_argument("--concurrency", default="1,8", help="comma list of closed-loop concurrencies")
    parser.add_argument("--protocols", default="grpc,http", help="protocols for the ensemble cells")
    parser.add_argument("--pipeline-protocols", default="grpc", help="protocols for the pipeline cells ('' for none)")
    parser.add_argument("--no-reference", action="store_true", help="skip the in-process PyTorch baseline")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the cells as JSON here")
    parser.add_argument("--server-log", type=Path, help="tritonserver log file (default: a temporary file)")
    args = parser.parse_args(argv)
    concurrencies = _csv_list(args.concurrency, int)
    protocols, pipeline_protocols = _csv_list(args.protocols), _csv_list(args.pipeline_protocols)
    bad = [p for p in protocols + pipeline_protocols if p not in ("grpc", "http")]
    if bad or not concurrencies or min(concurrencies) < 1 or args.duration <= 0:
        parser.error(f"check --protocols/--pipeline-protocols (grpc,http), --concurrency (>=1), --duration (>0) {bad}")
    if not (args.repository / "manifest.json").is_file():
        parser.error(f"{args.repository} has no manifest.json; run `recserve export repository` first")
    manifest = json.loads((args.repository / "manifest.json").read_text(encoding="utf-8"))
    candidates = int(manifest["candidates"])
    user_ids = load_user_ids(args.artifacts, args.repository)
    join_timeout = args.timeout + 5.0
    load_before = os.getloadavg()[0]
    cells: list[Cell] = []

    def run(target: str, make: Callable[[], Call], concurrency: int, grpc_url: str | None) -> None:
        snapshot: dict[str, dict[str, dict[str, int]]] = {}
        on_start = (lambda: snapshot.update(before=model_stats(grpc_url))) if grpc_url else None
        cell = closed_loop(make, user_ids, concurrency, args.duration, args.warmup, args.seed, on_start, join_timeout)
        cell.target = target
        if grpc_url and "before" in snapshot:
            cell.models = stats_delta(snapshot["before"], model_stats(grpc_url))
        print(f"  {target:14s} c={concurrency:<3d} {cell.rps:8.1f} req/s  p50 {_f(cell.p50_ms, 2):>7s} ms  "
              f"p99 {_f(cell.p99_ms, 2):>7s} ms  errors {cell.errors}", file=sys.stderr, flush=True)
        cells.append(cell)

    targets = [("ensemble", p) for p in protocols] + [("pipeline", p) for p in pipeline_protocols]
    if targets:
        ports = set()
        while len(ports) < 3:
            ports.add(free_port(HOST))
        http_port, grpc_port, metrics_port = sorted(ports)
        log = args.server_log or Path(tempfile.mkdtemp(prefix="bench-serving-")) / "tritonserver.log"
        print(f"starting tritonserver on {args.repository} (log {log})", file=sys.stderr, flush=True)
        with TritonServer(args.repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          host=HOST, log_file=log, ready_timeout=300.0) as server:
            urls = {"grpc": server.url("grpc"), "http": server.url("http")}
            for mode, protocol in targets:
                for concurrency in concurrencies:
                    make = server_call(urls[protocol], protocol, mode, args.k, args.timeout, candidates)
                    run(f"{mode}/{protocol}", make, concurrency, urls["grpc"])
    if not args.no_reference:
        from recserve.reference import Reference

        reference = Reference(args.artifacts, candidates=candidates)
        for concurrency in concurrencies:
            run("reference", reference_call(reference, args.k), concurrency, None)

    import torch

    load_after = os.getloadavg()[0]
    env = {"loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(load_after, 2),
           "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "machine": platform.machine(), "repository": str(args.repository), "flavor": manifest.get("flavor"),
           "precision": manifest.get("precision"), "candidates": candidates, "k": args.k,
           "duration_s": args.duration, "warmup_s": args.warmup, "users": int(len(user_ids))}
    print(f"\n{env['cpus']} CPUs shared by server and load generator (1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after); K={candidates}, k={args.k}, {args.duration:g} s per cell after "
          f"{args.warmup:g} s warm-up, {len(user_ids)} users\n")
    print(markdown(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = _finite({"env": env, "cells": [asdict(c) for c in cells]})
        args.json.write_text(json.dumps(doc, indent=2, allow_nan=False), encoding="utf-8")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 1 if any(c.requests == 0 for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
