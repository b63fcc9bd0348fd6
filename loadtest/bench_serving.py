"""Serving benchmark: every served path side by side, one run, one C load generator per protocol.

For each repository given (``--repository``, FP32, and ``--int8-repository``), with nothing else measured
at the same time:

1. ``tritonserver`` starts on free 127.0.0.1 ports (:class:`recserve.server.TritonServer`) and serves
   - ``ensemble/grpc``: the ``recommend`` ensemble over gRPC, driven by **perf_analyzer** (Triton's own C++
     load generator, ``--concurrency-range C:C``, three windows of ``--duration / 3``);
   - ``ensemble/http``: the same ensemble over HTTP (KServe v2 JSON), driven by **wrk** with
     ``loadtest/wrk_recommend.lua``;
   - ``pipeline/grpc``: the client orchestrating the steps itself (``RecClient`` in pipeline mode), driven by
     Python threads: it measures a client-side orchestration, client included, not the server's capacity;
   then stops.
2. ``loadtest/baseline_service.py`` starts (FastAPI, uvicorn with httptools + uvloop, 2 worker processes,
   ONNX Runtime + FAISS in-process over the same repository's files) and ``fastapi/http`` is driven by wrk
   with the same script, bodies and path; then stops.

Every cell runs ``--warmup`` seconds unmeasured, then ``--duration`` seconds measured, at each concurrency
(closed loop: C requests in flight). For each Triton cell the server's per-model statistics are read before
and after the measured run: average batch formed, queue and compute (input / infer / output) µs per request.

Prints a markdown table (req/s, p50, p90, p99, errors per path x precision x concurrency, and the share of a
core that processes outside this benchmark used meanwhile, to flag a busy machine), the per-model
breakdown and the target ratios (computed from the cells); ``--json`` writes everything plus the
environment, ``--plot`` a PNG of throughput against p99.

    python loadtest/bench_serving.py --repository work/repo_fp32 --int8-repository work/repo_int8 \\
        --duration 10 --concurrency 1,8,32 --json work/bench_serving.json --plot work/bench_serving.png

Needs ``wrk`` (``apt-get install -y wrk``) and tritonclient 2.50's ``perf_analyzer`` (with ``libb64-0d`` and
``nvidia-cuda-runtime-cu12``); ``make venv`` installs all three when run as root. Load generators and
servers share this machine's cores: the figures are those of the whole box.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # only servers this script starts are measured, and only from this machine
LOADTEST = Path(__file__).resolve().parent
WRK_SCRIPT = LOADTEST / "wrk_recommend.lua"
BASELINE = LOADTEST / "baseline_service.py"
MODEL = "recommend"
PATHS = ("ensemble/grpc", "ensemble/http", "pipeline/grpc", "fastapi/http")
GENERATOR = {"ensemble/grpc": "perf_analyzer", "ensemble/http": "wrk", "fastapi/http": "wrk",
             "pipeline/grpc": "python threads (client-side orchestration)"}
# The targets, checked against the measured cells (never typed-in numbers).
TARGETS = {"c8_rps_ratio": 1.25, "c8_p99_ms": 50.0, "c1_p50_ratio": 1.2, "int8_over_fp32": 1.3}
OTHER_CPU_WARN = 10.0  # % of one core used by other processes during a cell that makes it suspect
WRK_FIX = "apt-get install -y wrk (`make venv` does it when run as root)"
PA_FIX = "pip install 'tritonclient[all]==2.50.0' (its perf_analyzer runs on glibc 2.36)"
Call = Callable[[int, int, int], int]  # (user_id, hour, weekday) -> number of items


@dataclass
class Cell:
    """One measured cell: a path at one precision and concurrency."""

    path: str
    precision: str
    concurrency: int
    generator: str = ""
    seconds: float = 0.0
    requests: int = 0          # successful requests in the measured window
    errors: int = 0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    other_cpu_pct: float = float("nan")  # % of one core used by processes outside this benchmark meanwhile
    first_error: str | None = None
    models: dict[str, dict[str, float]] = field(default_factory=dict)


# -- Python-thread closed loop (the pipeline row only) -------------------------------------------------

def closed_loop(
    make_call: Callable[[], Call],
    requests: list[tuple[int, int, int]],
    concurrency: int,
    duration: float,
    warmup: float,
    seed: int = 0,
    on_measure_start: Callable[[], None] | None = None,
    join_timeout: float = 30.0,
) -> Cell:
    """``concurrency`` threads, each sending its next request when the last is answered, ``warmup + duration`` s.

    ``make_call`` runs once per thread (each thread gets its own client). Requests started in
    [end of warmup, end of duration] are measured, even if they end after.
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
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
        position = rng.randrange(len(requests))
        while not stop.is_set():
            start = time.perf_counter()
            if start >= until:
                break
            position = (position + 1) % len(requests)
            try:
                call(*requests[position])
                ok = True
            except Exception as exc:  # RecserveError by contract; counted, never fatal to the run
                ok = False
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
            end = time.perf_counter()
            if start >= measure_from:
                if ok:
                    latencies[i].append(end - start)
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
    cell = Cell(path="", precision="", concurrency=concurrency, seconds=seconds, requests=int(lat.size),
                errors=sum(errors), first_error=first_error[0] if first_error else None)
    if lat.size:
        cell.rps = lat.size / seconds
        cell.p50_ms, cell.p90_ms, cell.p99_ms = (float(np.percentile(lat, q)) for q in (50, 90, 99))
        cell.mean_ms = float(lat.mean())
    return cell


def pipeline_call(url: str, protocol: str, k: int, timeout: float) -> Callable[[], Call]:
    """One ``RecClient`` per thread, asking for the client-orchestrated pipeline."""
    from recserve.client import RecClient

    mode_in_init = "mode" in inspect.signature(RecClient).parameters

    def make() -> Call:
        kwargs = {"protocol": protocol, "timeout": timeout}
        per_call = {}
        (kwargs if mode_in_init else per_call)["mode"] = "pipeline"
        client = RecClient(url, **kwargs)

        def call(user: int, hour: int, weekday: int) -> int:
            answer = client.recommend(user, k=k, hour=hour, weekday=weekday, **per_call)
            return len(getattr(answer, "item_ids", None) or getattr(answer, "items", []))

        return call

    return make


# -- wrk ---------------------------------------------------------------------------------------------

def wrk_command(wrk: str, url: str, concurrency: int, seconds: float, users_file: Path, k: int,
                threads: int = 1, timeout: float = 10.0) -> list[str]:
    """wrk's duration is whole seconds; at most one thread per connection."""
    return [wrk, f"-t{max(1, min(threads, concurrency))}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
            "--timeout", f"{max(1, math.ceil(timeout))}s", "-s", str(WRK_SCRIPT), url, "--", str(users_file), str(k)]


def parse_wrk(output: str) -> dict[str, float]:
    """The ``WRK_JSON {...}`` line that ``wrk_recommend.lua``'s ``done`` prints.

    Raises:
        ValueError: no such line (wrk or the script failed; the message carries the output's tail).
    """
    for line in reversed(output.splitlines()):
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    tail = " | ".join(output.strip().splitlines()[-5:])
    raise ValueError(f"no WRK_JSON line in wrk's output: {tail or '(empty)'}")


def wrk_cell(stats: dict[str, float]) -> Cell:
    """A cell from wrk's summary: successes = responses - non-2xx; errors = non-2xx + socket errors + timeouts."""
    errors = int(sum(stats.get(key, 0) for key in ("non2xx", "connect_errors", "read_errors", "write_errors",
                                                   "timeouts")))
    ok = int(stats["requests"]) - int(stats.get("non2xx", 0))
    seconds = float(stats["duration_s"])
    cell = Cell(path="", precision="", concurrency=0, generator="wrk", seconds=seconds, requests=max(ok, 0),
                errors=errors)
    if ok > 0 and seconds > 0:
        cell.rps = ok / seconds
        cell.p50_ms, cell.p90_ms, cell.p99_ms = (float(stats[f"p{q}_ms"]) for q in (50, 90, 99))
        cell.mean_ms = float(stats["mean_ms"])
    if errors:
        parts = [f"{key}={int(stats[key])}" for key in ("non2xx", "connect_errors", "read_errors", "write_errors",
                                                        "timeouts") if stats.get(key)]
        cell.first_error = "wrk: " + ", ".join(parts)
    return cell


# -- perf_analyzer -----------------------------------------------------------------------------------

def perf_analyzer_command(pa: str, grpc_url: str, input_json: Path, concurrency: int, seconds: float,
                          csv_path: Path) -> list[str]:
    """Three windows of ``seconds / 3`` (perf_analyzer merges the last three); stability is not waited for."""
    window_ms = max(200, round(seconds * 1000 / 3))
    return [pa, "-m", MODEL, "-u", grpc_url, "-i", "grpc", "--input-data", str(input_json),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms),
            "--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv_path)]


def parse_perf_csv(text: str) -> dict[int, dict[str, float]]:
    """perf_analyzer's ``-f`` CSV -> {concurrency: rps, p50/p90/p95/p99/mean ms, server_* µs}."""
    rows: dict[int, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if not row.get("Concurrency"):
            continue
        def number(key: str, row: dict = row) -> float:
            return float(row[key]) if row.get(key) not in (None, "") else float("nan")

        out = {"rps": number("Inferences/Second")}
        for q in (50, 90, 95, 99):
            out[f"p{q}_ms"] = number(f"p{q} latency") / 1000.0
        if row.get("Avg latency"):
            out["mean_ms"] = number("Avg latency") / 1000.0
        else:  # the average's components, as perf_analyzer's console adds them up
            parts = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                     "Server Compute Infer", "Server Compute Output", "Client Recv")
            out["mean_ms"] = sum(number(p) for p in parts) / 1000.0 if all(row.get(p) for p in parts) else math.nan
        for key in ("Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output"):
            out["server_" + key.split(" ", 1)[1].lower().replace(" ", "_") + "_us"] = number(key)
        rows[int(float(row["Concurrency"]))] = out
    return rows


def parse_perf_stdout(text: str) -> dict[str, float]:
    """From perf_analyzer's console: the client's request count and throughput (the merged windows)."""
    out: dict[str, float] = {}
    match = re.search(r"Request count:\s*(\d+)", text)
    if match:
        out["requests"] = int(match.group(1))
    match = re.search(r"Throughput:\s*([\d.]+)\s*infer/sec", text)
    if match:
        out["rps"] = float(match.group(1))
    return out


def perf_cell(stdout: str, csv_text: str, concurrency: int, seconds: float) -> Cell:
    rows = parse_perf_csv(csv_text)
    if concurrency not in rows:
        raise ValueError(f"perf_analyzer's CSV has no row for concurrency {concurrency}")
    row, console = rows[concurrency], parse_perf_stdout(stdout)
    rps = row["rps"] if row["rps"] == row["rps"] else console.get("rps", 0.0)
    requests = int(console.get("requests", round(rps * seconds)))
    cell = Cell(path="", precision="", concurrency=concurrency, generator="perf_analyzer",
                seconds=requests / rps if rps > 0 else seconds, requests=requests, rps=rps,
                p50_ms=row["p50_ms"], p90_ms=row["p90_ms"], p99_ms=row["p99_ms"], mean_ms=row["mean_ms"])
    return cell


# -- other processes' CPU ---------------------------------------------------------------------------

def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """``/proc/PID/stat`` -> (pid, ppid, utime + stime + cutime + cstime in clock ticks)."""
    head, _, rest = text.rpartition(")")  # the command name may hold spaces and parentheses
    fields = rest.split()
    return int(head.split(" (", 1)[0]), int(fields[1]), sum(int(x) for x in fields[11:15])


def system_busy_ticks(text: str) -> int:
    """The first line of ``/proc/stat``: user + nice + system + irq + softirq ticks (not idle, iowait, steal)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in text.split("\n", 1)[0].split()[1:8])
    return user + nice + system + irq + softirq


def tree_ticks(procs: list[tuple[int, int, int]], root: int) -> int:
    """CPU ticks of ``root`` and its live descendants, reaped children included (``cutime``/``cstime``)."""
    children: dict[int, list[int]] = {}
    ticks = {}
    for pid, ppid, t in procs:
        children.setdefault(ppid, []).append(pid)
        ticks[pid] = t
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class OtherCpu:
    """CPU used by processes outside this benchmark's process tree between :meth:`start` and :meth:`stop`.

    System busy ticks minus the ticks of this process, its live descendants and the children it reaped
    (wrk, perf_analyzer, servers). Linux only; elsewhere the figure is NaN.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, int, int] | None = None

    @staticmethod
    def _sample() -> tuple[int, int] | None:
        try:
            busy = system_busy_ticks(Path("/proc/stat").read_text())
        except OSError:
            return None
        procs = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    procs.append(parse_proc_stat((entry / "stat").read_text()))
        return busy, tree_ticks(procs, os.getpid())

    def start(self) -> None:
        sample = self._sample()
        self._start = None if sample is None else (time.monotonic(), *sample)

    def stop(self) -> float:
        """% of one core the other processes used since :meth:`start`."""
        sample = self._sample()
        if self._start is None or sample is None:
            return float("nan")
        t0, busy0, ours0 = self._start
        seconds = max(time.monotonic() - t0, 1e-9)
        other = (sample[0] - busy0) - (sample[1] - ours0)
        return max(0.0, 100.0 * other / self.hz / seconds)


# -- Triton statistics -------------------------------------------------------------------------------

STAT_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def _count_ns(stats: dict, key: str) -> tuple[int, int]:
    entry = stats.get("inference_stats", {}).get(key, {})
    return int(entry.get("count", 0)), int(entry.get("ns", 0))


def model_stats(grpc_url: str, headers: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Cumulative per-model counters (summed over versions); int64 fields arrive as JSON strings.

    `headers`: the server's admin key (statistics are a restricted API: `TritonServer.admin_grpc_headers`)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        raw = client.get_inference_statistics(as_json=True, client_timeout=10.0, headers=headers)
    finally:
        client.close()
    out: dict[str, dict[str, int]] = {}
    for stats in raw.get("model_stats", []):
        row = out.setdefault(stats["name"], {"inference_count": 0, "execution_count": 0, "success": 0,
                                             **{f"{key}_ns": 0 for key in STAT_KEYS}})
        row["inference_count"] += int(stats.get("inference_count", 0))
        row["execution_count"] += int(stats.get("execution_count", 0))
        row["success"] += _count_ns(stats, "success")[0]
        for key in STAT_KEYS:
            row[f"{key}_ns"] += _count_ns(stats, key)[1]
    return out


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per model with traffic in the window: inferences, executions, avg batch formed, and per successful request
    the average µs in the server (``request_us``), queued, and in compute input / infer / output."""
    delta: dict[str, dict[str, float]] = {}
    for name, now in sorted(after.items()):
        then = before.get(name, {})
        d = {key: now[key] - then.get(key, 0) for key in now}
        if d["inference_count"] <= 0 and d["success"] <= 0:
            continue
        def per(key: str, d: dict = d) -> float:
            return d.get(f"{key}_ns", 0) / d["success"] / 1e3 if d["success"] else float("nan")

        delta[name] = {
            "inferences": d["inference_count"],
            "executions": d["execution_count"],
            "avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else float("nan"),
            "request_us": per("success"),
            "queue_us": per("queue"),
            "compute_input_us": per("compute_input"),
            "compute_infer_us": per("compute_infer"),
            "compute_output_us": per("compute_output"),
        }
    return delta


# -- targets -----------------------------------------------------------------------------------------

def _check(name: str, value: float | None, op: str, target: float, cells: list[Cell | None],
           numerator: float | None = None, denominator: float | None = None) -> dict:
    missing = any(c is None or c.requests == 0 for c in cells)
    if missing or value is None or value != value:
        return {"check": name, "value": None, "op": op, "target": target, "passed": None,
                "note": "a cell is missing or answered nothing"}
    passed = value >= target if op == ">=" else value <= target
    errors = sum(c.errors for c in cells if c is not None)
    out = {"check": name, "value": value, "op": op, "target": target, "passed": bool(passed and not errors)}
    if numerator is not None:
        out.update(numerator=numerator, denominator=denominator)
    if errors:
        out["note"] = f"{errors} errors in the cells compared"
    return out


def ratios(cells: list[Cell], targets: dict[str, float] = TARGETS) -> list[dict]:
    """The issue's targets, from the measured cells: ensemble vs FastAPI per precision and protocol, INT8 vs FP32."""
    by = {(c.path, c.precision, c.concurrency): c for c in cells}
    precisions = [p for p in ("fp32", "int8") if any(c.precision == p for c in cells)]
    precisions += sorted({c.precision for c in cells} - set(precisions))
    out = []

    def ratio(name: str, num: Cell | None, den: Cell | None, key: str, op: str, target: float) -> None:
        a, b = (getattr(num, key) if num else None), (getattr(den, key) if den else None)
        value = a / b if a is not None and b and b == b and a == a else None
        out.append(_check(name, value, op, target, [num, den], a, b))

    for precision in precisions:
        base8, base1 = by.get(("fastapi/http", precision, 8)), by.get(("fastapi/http", precision, 1))
        for protocol in ("grpc", "http"):
            path = f"ensemble/{protocol}"
            ens8, ens1 = by.get((path, precision, 8)), by.get((path, precision, 1))
            if ens8 is None and ens1 is None:
                continue
            ratio(f"{precision} c=8 req/s {path} / fastapi/http", ens8, base8, "rps", ">=", targets["c8_rps_ratio"])
            out.append(_check(f"{precision} c=8 p99 ms {path}", ens8.p99_ms if ens8 else None, "<=",
                              targets["c8_p99_ms"], [ens8]))
            ratio(f"{precision} c=1 p50 {path} / fastapi/http", ens1, base1, "p50_ms", "<=", targets["c1_p50_ratio"])
    if {"fp32", "int8"} <= set(precisions):
        for path in ("ensemble/grpc", "ensemble/http"):
            int8, fp32 = by.get((path, "int8", 8)), by.get((path, "fp32", 8))
            if int8 or fp32:
                ratio(f"c=8 req/s {path} int8 / fp32", int8, fp32, "rps", ">=", targets["int8_over_fp32"])
    return out


# -- report ------------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"  # NaN -> "-"


def markdown(cells: list[Cell], checks: list[dict] | None = None) -> str:
    lines = ["| path | precision | load generator | concurrency | req/s | p50 ms | p90 ms | p99 ms | mean ms | "
             "requests | errors | other CPU % |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c.path} | {c.precision} | {c.generator} | {c.concurrency} | {_f(c.rps)} | "
                     f"{_f(c.p50_ms, 2)} | {_f(c.p90_ms, 2)} | {_f(c.p99_ms, 2)} | {_f(c.mean_ms, 2)} | "
                     f"{c.requests} | {c.errors} | {_f(c.other_cpu_pct, 0)} |")
    busy = [c for c in cells if c.other_cpu_pct == c.other_cpu_pct and c.other_cpu_pct > OTHER_CPU_WARN]
    if busy:
        lines += ["", f"Warning: other processes used more than {OTHER_CPU_WARN:g} % of a core during "
                  + ", ".join(f"{c.path} {c.precision} c={c.concurrency}" for c in busy)
                  + "; those cells understate what the machine can do."]
    served = [c for c in cells if c.models]
    if served:
        lines += ["", "Triton per-model statistics over each measured window (per successful request; "
                  "avg batch = inference_count / execution_count; server = queue + compute + the backend's own "
                  "time, for the ensemble the whole path inside the server)", "",
                  "| path | precision | c | model | avg batch | server µs | queue µs | compute input µs | "
                  "compute infer µs | compute output µs | inferences |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in served:
            for name, m in c.models.items():
                lines.append(f"| {c.path} | {c.precision} | {c.concurrency} | {name} | {_f(m['avg_batch'], 2)} | "
                             f"{_f(m['request_us'], 0)} | {_f(m['queue_us'], 0)} | {_f(m['compute_input_us'], 0)} | "
                             f"{_f(m['compute_infer_us'], 0)} | {_f(m['compute_output_us'], 0)} | "
                             f"{int(m['inferences'])} |")
    if checks:
        lines += ["", "Targets (computed from the cells above)", "", "| check | measured | target | verdict |",
                  "|---|---:|---:|---|"]
        for r in checks:
            verdict = {True: "pass", False: "FAIL", None: "n/a"}[r["passed"]]
            note = f" ({r['note']})" if r.get("note") else ""
            digits = 1 if "ms" in r["check"] and "/" not in r["check"] else 2
            lines.append(f"| {r['check']} | {_f(r['value'], digits)} | {r['op']} {r['target']:g} | {verdict}{note} |")
    errors = [c for c in cells if c.first_error]
    if errors:
        lines += [""] + [f"- {c.path} {c.precision} c={c.concurrency}: first error: {c.first_error}" for c in errors]
    return "\n".join(lines)


def finite(value: object) -> object:
    """NaN / inf (a cell without successes, a model without executions) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def report_json(env: dict, cells: list[Cell], checks: list[dict]) -> str:
    doc = finite({"env": env, "targets": TARGETS, "cells": [asdict(c) for c in cells], "ratios": checks})
    return json.dumps(doc, indent=2, allow_nan=False)


def plot(cells: list[Cell], path: Path, title: str = "") -> None:
    """Throughput against p99 latency (log), one line per path x precision, one point per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    series: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        if c.requests and c.p99_ms == c.p99_ms and c.p99_ms > 0:
            series.setdefault((c.path, c.precision), []).append(c)
    markers = {"fp32": "o", "int8": "s"}
    colours = {name: f"C{i}" for i, name in enumerate(PATHS)}  # one colour per path, marker and dash per precision
    for (name, precision), group in series.items():
        group.sort(key=lambda c: c.concurrency)
        ax.plot([c.p99_ms for c in group], [c.rps for c in group], marker=markers.get(precision, "^"),
                color=colours.get(name), linestyle="-" if precision == "fp32" else "--", label=f"{name} {precision}")
        for c in group:
            ax.annotate(f"c={c.concurrency}", (c.p99_ms, c.rps), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency (ms, log scale)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title(title or "recommend: throughput vs p99 per served path")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- tools -------------------------------------------------------------------------------------------

def _cudart_dir() -> str | None:
    try:
        import nvidia.cuda_runtime as m  # namespace package: no __file__
    except ImportError:
        return None
    lib = Path(next(iter(m.__path__))) / "lib"
    return str(lib) if (lib / "libcudart.so.12").exists() else None


def find_tools(need_wrk: bool, need_perf_analyzer: bool) -> tuple[dict[str, str], list[str]]:
    """({"wrk": path, "perf_analyzer": path, "LD_LIBRARY_PATH": ...}, [problem with its fix, ...])."""
    tools: dict[str, str] = {}
    problems: list[str] = []
    if need_wrk:
        wrk = shutil.which("wrk")
        if wrk:
            tools["wrk"] = wrk
        else:
            problems.append(f"wrk not found: {WRK_FIX}")
    if need_perf_analyzer:
        beside = Path(sys.executable).parent / "perf_analyzer"
        pa = os.environ.get("PERF_ANALYZER") or (str(beside) if beside.is_file() else shutil.which("perf_analyzer"))
        cudart = _cudart_dir()
        if not pa or not os.access(pa, os.X_OK) or not Path(pa).is_file():
            problems.append(f"perf_analyzer not found{f' at {pa}' if pa else ''}: {PA_FIX}, or set PERF_ANALYZER")
        elif cudart is None:
            problems.append("libcudart.so.12 (perf_analyzer needs it) not found: pip install nvidia-cuda-runtime-cu12")
        else:
            ld = cudart + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else "")
            ldd_bin = shutil.which("ldd") or "/usr/bin/ldd"
            ldd = subprocess.run([ldd_bin, pa], capture_output=True, text=True,
                                 env={**os.environ, "LD_LIBRARY_PATH": ld}) if Path(ldd_bin).is_file() else None
            missing = [line.split()[0] for line in (ldd.stdout if ldd else "").splitlines() if "not found" in line]
            if any("libb64" in m for m in missing):
                problems.append("libb64.so.0d (perf_analyzer needs it) not found: apt-get install -y libb64-0d")
            elif missing:
                problems.append(f"{pa} cannot load {', '.join(missing)}: {PA_FIX}")
            else:
                tools.update(perf_analyzer=pa, LD_LIBRARY_PATH=ld)
    return tools, problems


def _version(command: list[str]) -> str | None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else None


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("numpy", "onnxruntime", "faiss-cpu", "tritonclient", "nvidia-pytriton", "fastapi", "uvicorn",
                 "httptools", "uvloop"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# -- servers -----------------------------------------------------------------------------------------

def tree_memory(pid: int) -> dict[str, float]:
    """Memory of a process and all its descendants (Triton's python stubs, uvicorn's workers), from /proc: RSS
    counts a shared page once per process; PSS splits it among them, so it sums to what the tree really holds."""
    seen, todo, total = set(), [pid], {"rss_mb": 0.0, "pss_mb": 0.0}
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss"):
                    total[f"{name.lower()}_mb"] += int(rest.split()[0]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return {**{k: round(v, 1) for k, v in total.items()}, "processes": len(seen)}


@contextlib.contextmanager
def baseline_server(repository: Path, workers: int, log_path: Path, ready_timeout: float = 120.0) -> Iterator[str]:
    """``baseline_service.py`` on a free 127.0.0.1 port until the block ends; yields its base URL."""
    import requests

    from recserve.server import free_port

    port = free_port(HOST)
    command = [sys.executable, str(BASELINE), "--repository", str(repository), "--host", HOST, "--port", str(port),
               "--workers", str(workers)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    baseline_server.pid = proc.pid      # for the memory reading (tree_memory)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"baseline_service.py exited with {proc.returncode}: {' | '.join(tail)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline_service.py not ready after {ready_timeout:g} s (log {log_path})")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # uvicorn's supervisor stops its workers
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the process group this function started
                proc.wait(10)


def _server_version(http_url: str) -> str | None:
    import requests

    try:
        return requests.get(f"{http_url}/v2", timeout=5).json().get("version")
    except (requests.RequestException, ValueError):
        return None


# -- the run -----------------------------------------------------------------------------------------

def _csv_list(text: str, cast: type = str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _load_make_perf_input():
    spec = importlib.util.spec_from_file_location("recserve_make_perf_input", LOADTEST / "make_perf_input.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_requests(user_ids: np.ndarray, folder: Path, k: int, seed: int = 0) -> tuple[Path, Path, list]:
    """The same request list for every generator: perf_analyzer's ``--input-data`` JSON and wrk's users file."""
    n = int(min(max(len(user_ids), 256), 4096))
    doc = _load_make_perf_input().build({"user_ids": user_ids}, model=MODEL, n=n, k=k, seed=seed)
    rows = [(r["user_id"]["content"][0], r["hour"]["content"][0], r["weekday"]["content"][0]) for r in doc["data"]]
    input_json, users_file = folder / "perf_input.json", folder / "wrk_requests.txt"
    input_json.write_text(json.dumps(doc), encoding="utf-8")
    users_file.write_text("".join(f"{u} {h} {w}\n" for u, h, w in rows), encoding="utf-8")
    return input_json, users_file, rows


class Bench:
    """Runs the cells; holds the arguments, tools and request files they share."""

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], folder: Path,
                 input_json: Path, users_file: Path, rows: list) -> None:
        self.args, self.tools, self.folder = args, tools, folder
        self.input_json, self.users_file, self.rows = input_json, users_file, rows
        self.cells: list[Cell] = []
        self.memory: dict[str, dict[str, float]] = {}     # server -> tree_memory after its cells

    def _log(self, cell: Cell) -> None:
        print(f"  {cell.path:14s} {cell.precision:5s} c={cell.concurrency:<3d} {cell.rps:8.1f} req/s  "
              f"p50 {_f(cell.p50_ms, 2):>7s} ms  p99 {_f(cell.p99_ms, 2):>7s} ms  errors {cell.errors}  "
              f"other CPU {_f(cell.other_cpu_pct, 0)} %",
              file=sys.stderr, flush=True)

    def _wrk(self, url: str, concurrency: int, seconds: float) -> Cell:
        command = wrk_command(self.tools["wrk"], url, concurrency, seconds, self.users_file, self.args.k,
                              self.args.wrk_threads, self.args.timeout)
        meter = OtherCpu()
        meter.start()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + self.args.timeout + 60)
        other = meter.stop()
        try:
            cell = wrk_cell(parse_wrk(proc.stdout + proc.stderr))
        except ValueError as exc:
            cell = Cell(path="", precision="", concurrency=concurrency, generator="wrk", errors=1,
                        first_error=str(exc))
        cell.concurrency, cell.other_cpu_pct = concurrency, other
        return cell

    def _perf_analyzer(self, grpc_url: str, concurrency: int, seconds: float, name: str) -> Cell:
        csv_path = self.folder / f"{name}.csv"
        command = perf_analyzer_command(self.tools["perf_analyzer"], grpc_url, self.input_json, concurrency,
                                        seconds, csv_path)
        env = {**os.environ, "LD_LIBRARY_PATH": self.tools["LD_LIBRARY_PATH"]}
        meter = OtherCpu()
        meter.start()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds * 4 + 120)
        other = meter.stop()
        (self.folder / f"{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        try:
            if proc.returncode != 0:
                raise ValueError(f"perf_analyzer exited with {proc.returncode}")
            cell = perf_cell(proc.stdout, csv_path.read_text(encoding="utf-8"), concurrency, seconds)
        except (ValueError, OSError) as exc:
            lines = [x for x in (proc.stdout + proc.stderr).strip().splitlines() if x.strip()]
            detail = next((x.strip() for x in reversed(lines) if "rror" in x), lines[-1].strip() if lines else "")
            cell = Cell(path="", precision="", concurrency=concurrency, generator="perf_analyzer", errors=1,
                        first_error=f"{exc}: {detail}")
        cell.other_cpu_pct = other
        return cell

    def _add(self, cell: Cell, path: str, precision: str) -> None:
        cell.path, cell.precision, cell.generator = path, precision, GENERATOR[path]
        self.cells.append(cell)
        self._log(cell)

    def triton(self, repository: Path, precision: str, paths: list[str]) -> str | None:
        """The Triton rows of one repository; returns the server's version."""
        from recserve.server import RESTRICTED, TritonServer, free_port

        args = self.args
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port(HOST))
        http_port, grpc_port, metrics_port = sorted(ports)
        log = self.folder / f"tritonserver-{precision}.log"
        print(f"starting tritonserver on {repository} (log {log})", file=sys.stderr, flush=True)
        # statistics stay open here: perf_analyzer reads them over gRPC and cannot send the admin key
        restricted = ",".join(a for a in RESTRICTED.split(",") if a != "statistics")
        with TritonServer(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          host=HOST, log_file=log, ready_timeout=300.0, restricted=restricted) as server:
            grpc_url, http_url = server.url("grpc"), server.url("http")
            admin, stats_url = server.admin_grpc_headers, server.admin_grpc_url   # Triton's own port
            version = _server_version(http_url)
            for path in paths:
                for c in args.concurrency:
                    name = f"{path.replace('/', '-')}-{precision}-c{c}"
                    if path == "ensemble/grpc":
                        self._perf_analyzer(grpc_url, c, args.warmup, name + "-warmup")
                        before = model_stats(stats_url, admin)
                        cell = self._perf_analyzer(grpc_url, c, args.duration, name)
                    elif path == "ensemble/http":
                        self._wrk(http_url, c, args.warmup)
                        before = model_stats(stats_url, admin)
                        cell = self._wrk(http_url, c, args.duration)
                    else:  # pipeline/grpc
                        snapshot: dict = {}
                        meter = OtherCpu()

                        def take(snapshot: dict = snapshot, url: str = stats_url, meter: OtherCpu = meter) -> None:
                            snapshot["before"] = model_stats(url, admin)
                            meter.start()

                        make = pipeline_call(grpc_url, "grpc", args.k, args.timeout)
                        cell = closed_loop(make, self.rows, c, args.duration, args.warmup, args.seed, take,
                                           args.timeout + 5.0)
                        cell.other_cpu_pct = meter.stop()
                        before = snapshot.get("before", {})
                    cell.models = stats_delta(before, model_stats(stats_url, admin))
                    self._add(cell, path, precision)
            self.memory[f"triton/{precision}"] = tree_memory(server.process.pid)
        return version

    def fastapi(self, repository: Path, precision: str) -> None:
        log = self.folder / f"baseline-{precision}.log"
        print(f"starting baseline_service.py on {repository} ({self.args.workers} workers, log {log})",
              file=sys.stderr, flush=True)
        with baseline_server(repository, self.args.workers, log) as url:
            for c in self.args.concurrency:
                self._wrk(url, c, self.args.warmup)
                self._add(self._wrk(url, c, self.args.duration), "fastapi/http", precision)
            self.memory[f"fastapi/{precision}"] = tree_memory(baseline_server.pid)


def _manifest(repository: Path) -> dict:
    return json.loads((repository / "manifest.json").read_text(encoding="utf-8"))


def _user_ids(repository: Path) -> np.ndarray:
    """The served raw user ids: ``users.npz`` of the step that maps them, in the live version."""
    manifest = repository / "manifest.json"
    v = str(json.loads(manifest.read_text()).get("model_version", 1)) if manifest.is_file() else "1"
    found = [p for p in (repository / "user" / v / "users.npz", repository / "retrieval" / v / "users.npz",
                         *sorted(repository.glob(f"*/{v}/users.npz"))) if p.is_file()]
    if not found:
        raise SystemExit(f"bench_serving: no */{v}/users.npz in {repository}; write it with "
                         "`recserve export repository`")
    with np.load(found[0], allow_pickle=False) as z:
        return np.asarray(z["user_ids"], np.int64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="the FP32 repository")
    parser.add_argument("--int8-repository", type=Path, help="the INT8 repository (`--precision int8`)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell (wrk: whole s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell")
    parser.add_argument("--concurrency", default="1,8,32", help="comma list of closed-loop concurrencies")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    parser.add_argument("--k", type=int, default=10, help="items per recommendation")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of the FastAPI baseline")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (one uses a few %% of a core)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write cells, ratios and environment as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of throughput against p99 here")
    parser.add_argument("--logs", type=Path, help="folder for server and perf_analyzer logs (default: a temp dir)")
    args = parser.parse_args(argv)
    args.concurrency = _csv_list(args.concurrency, int)
    args.paths = _csv_list(args.paths)
    bad = [p for p in args.paths if p not in PATHS]
    if bad or not args.paths:
        parser.error(f"--paths: unknown {bad}; choose from {', '.join(PATHS)}")
    if not args.concurrency or min(args.concurrency) < 1 or args.duration <= 0 or args.warmup < 0 or args.k < 1:
        parser.error("--concurrency must list integers >= 1, --duration > 0, --warmup >= 0, --k >= 1")
    for repo in (args.repository, args.int8_repository):
        if repo is not None and not (repo / "manifest.json").is_file():
            parser.error(f"{repo} has no manifest.json; run `recserve export repository` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools, problems = find_tools(need_wrk=any(p.endswith("/http") for p in args.paths),
                                 need_perf_analyzer="ensemble/grpc" in args.paths)
    if problems:
        print(f"bench_serving: {'; '.join(problems)}", file=sys.stderr)
        return 2
    repositories = [(args.repository, _manifest(args.repository))]
    if args.int8_repository:
        repositories.append((args.int8_repository, _manifest(args.int8_repository)))
    labels = [m.get("precision", "fp32") for _, m in repositories]
    if len(set(labels)) != len(labels):
        print(f"bench_serving: both repositories are {labels[0]}; --int8-repository wants one written with "
              "`recserve export repository --precision int8`", file=sys.stderr)
        return 2
    folder = args.logs or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    folder.mkdir(parents=True, exist_ok=True)
    user_ids = _user_ids(args.repository)
    input_json, users_file, rows = write_requests(user_ids, folder, args.k, args.seed)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: 1-min load average {load_before[0]:.2f} before the run: something else is busy and the "
              "figures will be lower", file=sys.stderr)
    bench = Bench(args, tools, folder, input_json, users_file, rows)
    triton_paths = [p for p in PATHS if p in args.paths and p != "fastapi/http"]
    server_versions = {}
    for (repository, _manifest_doc), precision in zip(repositories, labels):
        if triton_paths:
            server_versions[precision] = bench.triton(repository, precision, triton_paths)
        if "fastapi/http" in args.paths:
            bench.fastapi(repository, precision)
    load_after = os.getloadavg()
    cells = bench.cells
    checks = ratios(cells)
    env = {
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "packages": _package_versions(), "tritonserver": next(iter(server_versions.values()), None),
        "wrk": _version([tools["wrk"], "-v"]) if "wrk" in tools else None,
        "perf_analyzer": tools.get("perf_analyzer"),
        "repositories": {p: {"path": str(r), "flavor": m.get("flavor"), "precision": m.get("precision"),
                             "candidates": m.get("candidates"), "k_max": m.get("k_max"),
                             "index": (m.get("index") or {}).get("spec")} for (r, m), p in zip(repositories, labels)},
        "k": args.k, "duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency,
        "users": int(len(user_ids)), "requests_in_rotation": len(rows), "baseline_workers": args.workers,
        "wrk_threads": args.wrk_threads, "logs": str(folder),
        "server_memory": bench.memory,
    }
    first = repositories[0][1]
    print(f"\n{env['cpus']} CPUs shared by servers and load generators (1-min load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after); K={first.get('candidates')}, k={args.k}, {args.duration:g} s per "
          f"cell after {args.warmup:g} s warm-up, {len(user_ids)} users; logs in {folder}\n")
    print(markdown(cells, checks))
    if bench.memory:
        print("\nserver memory after its cells (the process and its children: Triton's stubs, uvicorn's workers): "
              + "; ".join(f"{k} PSS {m['pss_mb']:,.0f} MB (RSS {m['rss_mb']:,.0f} MB, {m['processes']} processes)"
                          for k, m in bench.memory.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(report_json(env, cells, checks), encoding="utf-8")
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(cells, args.plot, f"recommend on {env['cpus']} CPUs: throughput vs p99 "
             f"(c = {', '.join(map(str, args.concurrency))})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(c.requests == 0 for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
