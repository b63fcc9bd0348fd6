"""A closed-loop HTTP/1.1 load generator on asyncio streams, for the reliability suite.

Each of `connections` keep-alive connections sends one request after another for `seconds`. It records every
response's status and latency, so answered and shed requests are told apart (wrk reports one latency histogram
for both). A connection the server closes is reopened. Python, so it measures the server's behaviour
(statuses, bounded latency) rather than its peak throughput; `make bench-serving` uses wrk for that.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def recommend_body(user_id: int, k: int = 10) -> bytes:
    return json.dumps({"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user_id]},
                                  {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [k]}]}).encode()


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    latency: dict[int, list[float]] = field(default_factory=dict)   # status -> seconds
    errors: Counter = field(default_factory=Counter)                # connection-level failures by kind
    bodies: dict[int, bytes] = field(default_factory=dict)          # one body per status
    seconds: float = 0.0
    # with track=True: (monotonic time at the answer, seconds, status, model_version) of every response
    timeline: list[tuple[float, float, int, str]] = field(default_factory=list)
    track: bool = False

    def count(self, status: int) -> int:
        return self.statuses[status]

    def p(self, status: int, q: float) -> float:
        """Latency quantile q (0..100) of responses with this status, in ms (nan when none)."""
        v = self.latency.get(status)
        return float(np.percentile(v, q) * 1000) if v else float("nan")

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 2), "statuses": dict(self.statuses), "errors": dict(self.errors),
                **{f"p99_ms_{s}": round(self.p(s, 99), 2) for s in self.statuses},
                **{f"p50_ms_{s}": round(self.p(s, 50), 2) for s in self.statuses}}


_VERSION = re.compile(rb'"model_version":"([^"]*)"')


async def _connection(host: str, port: int, path: str, bodies: list[bytes], until: float, result: LoadResult,
                      offset: int, backoff: bool) -> None:
    import random

    reader = writer = None
    i, shed_in_a_row = offset, 0
    while time.monotonic() < until:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                result.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)
                continue
        body = bodies[i % len(bodies)]
        i += 1
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        try:
            writer.write(head + body)
            status_line = await asyncio.wait_for(reader.readline(), 30)
            if not status_line:
                raise ConnectionResetError("closed")
            status = int(status_line.split()[1])
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and "close" in value.lower():
                    close = True
            payload = await reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            result.errors[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        dt = time.perf_counter() - t0
        result.statuses[status] += 1
        result.latency.setdefault(status, []).append(dt)
        result.bodies.setdefault(status, payload)
        if result.track:
            version = _VERSION.search(payload)
            result.timeline.append((time.monotonic(), dt, status, version.group(1).decode() if version else ""))
        shed_in_a_row = shed_in_a_row + 1 if status == 503 else 0
        if backoff and shed_in_a_row:   # as RecClient does: full-jitter exponential backoff, 10 ms .. 200 ms
            await asyncio.sleep(random.uniform(0, min(0.2, 0.01 * 2 ** (shed_in_a_row - 1))))
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _run(host, port, path, bodies, connections, seconds, result, backoff):
    until = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(*(_connection(host, port, path, bodies, until, result, c, backoff)
                           for c in range(connections)))
    result.seconds = time.monotonic() - t0


def run_load(host: str, port: int, connections: int, seconds: float, bodies: list[bytes],
             path: str = "/v2/models/recommend/infer", backoff: bool = False, track: bool = False) -> LoadResult:
    """Drive `connections` closed-loop connections for `seconds`; returns statuses and latencies.

    `backoff`: a connection that was shed (503) waits as RecClient does before its next request; without it,
    every connection sends again at once (a hostile or naive client, the worst case). `track`: keep every
    response's time, latency, status and model version (`LoadResult.timeline`)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 1024), hard))
    result = LoadResult(track=track)
    asyncio.run(_run(host, port, path, bodies, connections, seconds, result, backoff))
    return result


def run_load_apart(host: str, port: int, connections: int, seconds: float, bodies: list[bytes],
                   path: str = "/v2/models/recommend/infer") -> LoadResult:
    """`run_load(..., track=True)` in a process of its own, as a real client is: in the test's process it would
    share the GIL with the server's supervisor (which a deploy keeps busy), and the supervisor's work would read
    as the server's latency. Time stamps are CLOCK_MONOTONIC, the same in both processes (Linux)."""
    import base64
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"host": host, "port": port, "connections": connections, "seconds": seconds,
                                   "path": path, "bodies": [base64.b64encode(b).decode() for b in bodies]}))
        subprocess.run([sys.executable, __file__, str(job)], check=True, timeout=seconds + 120)
        doc = json.loads(job.with_suffix(".out.json").read_text())
    result = LoadResult(track=True, seconds=doc["seconds"])
    result.statuses.update({int(s): n for s, n in doc["statuses"].items()})
    result.errors.update(doc["errors"])
    result.latency = {int(s): v for s, v in doc["latency"].items()}
    result.timeline = [tuple(row) for row in doc["timeline"]]
    return result


if __name__ == "__main__":          # run_load_apart's child: python load.py JOB.json -> JOB.out.json
    import base64
    import sys
    from pathlib import Path

    job = Path(sys.argv[1])
    spec = json.loads(job.read_text())
    r = run_load(spec["host"], spec["port"], spec["connections"], spec["seconds"],
                 [base64.b64decode(b) for b in spec["bodies"]], path=spec["path"], track=True)
    job.with_suffix(".out.json").write_text(json.dumps({
        "seconds": r.seconds, "statuses": r.statuses, "errors": r.errors, "latency": r.latency,
        "timeline": r.timeline}))
