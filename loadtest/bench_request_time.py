"""Request-time behaviours, measured: what the rules and exploration cost on the served path, and what the
client's TTL cache saves under a Zipf-distributed user load.

    python loadtest/bench_request_time.py --repository work/repo_fp32 --duration 8

1. `recserve serve`'s server (front door on) driven by wrk (one thread, C connections, closed loop) over HTTP,
   users 1..N in rotation, k = 10, three bodies per user: plain; rules (two excluded ids, at most 2 per genre,
   MMR lambda 0.7, freshness 0.5); exploration (epsilon 0.1, a seed per request). Same server, one after the other.
2. `RecClient(cache_ttl=600)` over gRPC, one thread, users drawn from a Zipf law (exponent --zipf) over the same
   users: each call's latency, split into cache hits and misses, and the hit ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import parse_wrk  # noqa: E402

from recserve.client import RecClient  # noqa: E402
from recserve.server import TritonServer, free_port  # noqa: E402

LUA = r"""
local bodies, i = {}, 0
for line in io.lines(os.getenv("BODIES")) do bodies[#bodies + 1] = line end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/v2/models/recommend/infer", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local d = summary.duration / 1e6
  io.write(string.format('WRK_JSON {"requests":%d,"duration_s":%.3f,"non2xx":%d,"p50_ms":%.3f,"p99_ms":%.3f}\n',
    summary.requests, d, summary.errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def _tensor(name: str, dtype: str, values: list) -> dict:
    return {"name": name, "datatype": dtype, "shape": [1, len(values)], "data": values}


def bodies(users: list[int], variant: str) -> list[str]:
    out = []
    for n, u in enumerate(users):
        inputs = [_tensor("user_id", "INT64", [u]), _tensor("k", "INT32", [10]), _tensor("hour", "INT64", [n % 24]),
                  _tensor("weekday", "INT64", [n % 7])]
        if variant == "rules":
            inputs += [_tensor("exclude", "INT64", [50, 100]), _tensor("max_per_genre", "INT32", [2]),
                       _tensor("mmr_lambda", "FP32", [0.7]), _tensor("freshness", "FP32", [0.5])]
        elif variant == "explore":
            inputs += [_tensor("explore", "INT32", [1]), _tensor("explore_param", "FP32", [0.1]),
                       _tensor("seed", "INT64", [n])]
        out.append(json.dumps({"inputs": inputs}, separators=(",", ":")))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--users", type=int, default=900)
    ap.add_argument("--calls", type=int, default=5000, help="client cache: calls")
    ap.add_argument("--zipf", type=float, default=1.1, help="client cache: Zipf exponent over users")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="recserve-rt-"))
    (folder / "bodies.lua").write_text(LUA)
    users = list(range(1, args.users + 1))
    result: dict = {"repository": str(args.repository), "concurrency": args.concurrency, "paths": {}}
    with TritonServer(args.repository, free_port(), free_port(), free_port(), log_file=folder / "triton.log") as srv:
        url = srv.url("http")
        for variant in ("plain", "rules", "explore", "plain"):
            path = folder / f"{variant}.txt"
            path.write_text("\n".join(bodies(users, variant)) + "\n")
            proc = subprocess.run([shutil.which("wrk"), "-t1", f"-c{args.concurrency}", f"-d{args.duration}s",
                                   "-s", str(folder / "bodies.lua"), url], capture_output=True, text=True,
                                  env={"BODIES": str(path), "PATH": "/usr/bin:/bin"}, timeout=args.duration + 60)
            stats = parse_wrk(proc.stdout + proc.stderr)
            key = variant if variant not in result["paths"] else f"{variant} (again)"
            result["paths"][key] = stats
            print(f"{key:<14} {stats['requests'] / stats['duration_s']:8.1f} req/s  p50 {stats['p50_ms']:6.2f} ms  "
                  f"p99 {stats['p99_ms']:6.2f} ms  non-2xx {stats['non2xx']}", flush=True)
        rng = np.random.default_rng(0)
        ranks = np.minimum(rng.zipf(args.zipf, args.calls), args.users)
        with RecClient(srv.url("grpc"), "grpc", cache_ttl=600) as client:
            client.recommend(1, k=10, hour=12, weekday=2)          # connection and k_max, outside the figures
            client._cache.clear()
            client.cache_hits = client.cache_misses = 0
            hit, miss = [], []
            for u in ranks:
                before = client.cache_hits
                t0 = time.perf_counter()
                client.recommend(int(u), k=10, hour=12, weekday=2)
                (hit if client.cache_hits > before else miss).append(time.perf_counter() - t0)
        ms = lambda v, q: float(np.percentile(v, q) * 1000)  # noqa: E731
        cache = {"calls": args.calls, "zipf": args.zipf, "hit_ratio": len(hit) / args.calls,
                 "hit_p50_ms": ms(hit, 50), "miss_p50_ms": ms(miss, 50), "hit_p99_ms": ms(hit, 99),
                 "miss_p99_ms": ms(miss, 99)}
        result["client_cache"] = cache
        print(f"client cache   hit ratio {cache['hit_ratio']:.3f}; p50 hit {cache['hit_p50_ms']:.4f} ms, miss "
              f"{cache['miss_p50_ms']:.3f} ms ({cache['miss_p50_ms'] / cache['hit_p50_ms']:.0f}x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
