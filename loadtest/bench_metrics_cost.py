"""What recserve's custom metrics cost the served path: `recommend` with and without them, same load generator.

    python loadtest/bench_metrics_cost.py --repository work/repo_fp32 [--duration 8] [--rounds 2]

The custom metrics are the counters of answers by source and of fallbacks, the score and candidates histograms,
and the drift gauges
(recserve/drift.py). A copy of the repository gets `custom_metrics: "0"` in `recommend`'s config (served with
verification off, since the copy differs from its manifest on purpose); each is served by `recserve serve`'s
TritonServer behind the front door in turn, and wrk drives HTTP at each concurrency, the two alternating for
`--rounds` rounds. The issue's target: p50 with the metrics at most 3% above p50 without.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))


def without_metrics(repository: Path, dest: Path) -> Path:
    from recserve.deploy import live_version
    from recserve.serving.repository import parse, render_proto

    shutil.copytree(repository, dest)
    path = dest / "recommend" / "config.pbtxt"
    cfg = parse(path.read_text())
    cfg.parameters["custom_metrics"].string_value = "0"
    path.write_text(render_proto(cfg))
    (dest / "recommend" / str(live_version(dest)) / "config.pbtxt").write_text(render_proto(cfg))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from bench_serving import find_tools, parse_wrk, write_requests, wrk_command

    from recserve.deploy import live_dir
    from recserve.server import TritonServer, free_port

    tools, missing = find_tools(need_wrk=True, need_perf_analyzer=False)
    if "wrk" not in tools:
        raise SystemExit(f"bench_metrics_cost: {'; '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    users = np.load(live_dir(args.repository, "retrieval") / "users.npz")["user_ids"]
    _, users_file, _ = write_requests(users, work, k=10)
    variants = {"with": args.repository, "without": without_metrics(args.repository, work / "repo_without")}
    levels = [int(c) for c in args.concurrency.split(",")]
    cells: dict[str, dict[int, list[dict]]] = {v: {c: [] for c in levels} for v in variants}
    for _ in range(args.rounds):
        for name, repo in variants.items():
            with TritonServer(repo, free_port(), free_port(), free_port(), verify=name == "with",
                              log_file=work / f"triton_{name}.log") as server:
                for c in levels:
                    cmd = wrk_command(tools["wrk"], server.url("http"), c, args.duration, users_file, 10)
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60).stdout
                    cells[name][c].append(parse_wrk(out))
    report = {}
    print("concurrency  p50 with (ms)  p50 without (ms)  ratio   req/s with  req/s without")
    for c in levels:
        p50 = {n: float(np.median([s["p50_ms"] for s in cells[n][c]])) for n in variants}
        rps = {n: float(np.median([s["requests"] / s["duration_s"] for s in cells[n][c]])) for n in variants}
        report[c] = {"p50_ms": p50, "rps": rps, "p50_ratio": p50["with"] / p50["without"],
                     "runs": {n: cells[n][c] for n in variants}}
        print(f"{c:>11}  {p50['with']:>13.3f}  {p50['without']:>16.3f}  {report[c]['p50_ratio']:.3f}  "
              f"{rps['with']:>10,.0f}  {rps['without']:>13,.0f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
