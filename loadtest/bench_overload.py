"""Overload benchmark: `recserve serve` (front door on) driven past capacity by wrk, at growing connection counts.

    python loadtest/bench_overload.py --repository work/repo_fp32 --connections 64,256,1024 --duration 10

wrk (C, one thread) keeps C connections in a closed loop with `loadtest/wrk_recommend.lua` (real users, k = 10),
sending again as soon as an answer arrives, shed or not: the worst case, clients that do not back off. wrk
reports one latency histogram for every response, so the split by status comes from the front door's own
access log (nginx's $request_time, millisecond resolution): answered (200) and shed (503) separately. Also
printed: the server's resident memory (tritonserver, its stubs, nginx) before and after each cell. Load
generator and server share the machine's cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import parse_wrk, wrk_command  # noqa: E402

from recserve.server import TritonServer, free_port  # noqa: E402
from recserve.serving.frontdoor import access_log_times  # noqa: E402
from recserve.supervisor import stub_instances  # noqa: E402


def rss_mb(server: TritonServer) -> float:
    pids = [server.process.pid, *stub_instances(server.process.pid).values(), server.front_door.proc.pid]
    nginx = str(server.front_door.proc.pid)
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == nginx:
                    pids.append(int(p.name))
            except OSError:
                pass
    kb = 0
    for pid in pids:
        try:
            kb += next(int(x.split()[1]) for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return kb / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--connections", default="64,256,1024")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=900, help="users 1..N in rotation")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    wrk = shutil.which("wrk")
    if not wrk:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    folder = Path(tempfile.mkdtemp(prefix="recserve-overload-"))
    users_file = folder / "users.txt"
    users_file.write_text("".join(f"{u}\n" for u in range(1, args.users + 1)))
    log = folder / "frontdoor.log"
    out: dict = {"repository": str(args.repository), "duration_s": args.duration, "generator": "wrk -t1", "cells": []}
    with TritonServer(args.repository, free_port(), free_port(), free_port(), log_file=folder / "triton.log",
                      access_log=log) as server:
        url = server.url("http")
        subprocess.run(wrk_command(wrk, url, 8, 3, users_file, 10), capture_output=True, text=True)   # warm up
        print("| connections | answered req/s | answered p50 / p99 / max ms (server) | shed 503/s | shed p99 / max "
              "ms (server) | other statuses | wrk p99 ms (all responses) | RSS MB before -> after |")
        print("|---:|---:|---|---:|---|---|---:|---|")
        for c in [int(x) for x in args.connections.split(",")]:
            time.sleep(1.5)
            offset, before = log.stat().st_size, rss_mb(server)
            proc = subprocess.run(wrk_command(wrk, url, c, args.duration, users_file, 10, 1, 10.0),
                                  capture_output=True, text=True, timeout=args.duration + 120)
            stats = parse_wrk(proc.stdout + proc.stderr)
            after = rss_mb(server)
            time.sleep(1.5)              # the access log is flushed each second
            split = {str(k): v for k, v in access_log_times(log, offset, infer_only=True).items()}
            ok, shed = split.get("200", {}), split.get("503", {})
            other = {s: v["count"] for s, v in split.items() if s not in ("200", "503")}
            cell = {"connections": c, "server": split, "wrk": stats, "rss_before_mb": before, "rss_after_mb": after}
            out["cells"].append(cell)
            print(f"| {c} | {ok.get('count', 0) / stats['duration_s']:.0f} | {ok.get('p50_ms', float('nan')):.0f} / "
                  f"{ok.get('p99_ms', float('nan')):.0f} / {ok.get('max_ms', float('nan')):.0f} | "
                  f"{shed.get('count', 0) / stats['duration_s']:.0f} | {shed.get('p99_ms', float('nan')):.0f} / "
                  f"{shed.get('max_ms', float('nan')):.0f} | {other or '-'} | {stats['p99_ms']:.0f} | "
                  f"{before:.0f} -> {after:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
