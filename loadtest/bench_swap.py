"""A model swap under load, the two ways Triton can make it: EXPLICIT model control (what `recserve serve` does)
against repository polling.

    python loadtest/bench_swap.py --artifacts work/ml100k [--modes explicit,poll] [--rounds 3] [--json F]

Each round serves a fresh repository (version 1 of the artifacts), drives `--connections` closed-loop HTTP
connections through the front door from a process of their own (the reliability suite's generator,
`tests/reliability/load.py`, which keeps every response's time and model version), and `recserve deploy`s
the same artifacts as version 2 after `--deploy-at` seconds:

- explicit: the supervisor notices the manifest, verifies every file and loads each model's new version over
  gRPC, one model at a time (recserve/supervisor.py);
- poll: `tritonserver --model-control-mode=poll --repository-poll-secs=S` finds the changed configs itself and
  loads what changed; nothing is verified first.

Per round: failed requests, answers from version 1 after the switch, the seconds from `deploy` returning to
every model serving version 2 only (Triton's repository index), and p99 during those seconds against p99
before the deploy (the issue's target: at most 2x). The same artifacts make both versions answer alike, so
any difference is the swap's. Rounds alternate the modes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reliability"))


def _models_on(server, version: int) -> bool:
    """Every model of the repository index serves `version` and no other (READY)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.admin_grpc_url)
    try:
        index = client.get_model_repository_index(headers=server.admin_grpc_headers, as_json=True)
    finally:
        client.close()
    ready: dict[str, set[str]] = {}
    for m in index.get("models", []):
        if m.get("state") == "READY":
            ready.setdefault(m["name"], set()).add(m.get("version", ""))
    return bool(ready) and all(v == {str(version)} for v in ready.values())


def one_round(mode: str, artifacts: Path, work: Path, args) -> dict:
    from load import recommend_body, run_load_apart

    from recserve.deploy import deploy
    from recserve.server import TritonServer, free_port
    from recserve.serving.repository import RepoOptions

    repository = work / f"repo_{mode}" / "model_repository"
    shutil.rmtree(repository.parent, ignore_errors=True)
    opts = RepoOptions(candidates=args.candidates) if args.candidates else RepoOptions()
    deploy(artifacts, repository, opts)
    extra = [f"--repository-poll-secs={args.poll_secs}"] if mode == "poll" else []
    server = TritonServer(repository, free_port(), free_port(), free_port(), model_control_mode=mode,
                          extra_args=extra, log_file=work / f"triton_{mode}.log")
    with server:
        users = np.load(repository / "retrieval" / "1" / "users.npz")["user_ids"][:64].tolist()
        load: dict = {}
        loader = threading.Thread(target=lambda: load.setdefault("r", run_load_apart(
            "127.0.0.1", server.http_port, args.connections, args.seconds,
            [recommend_body(u) for u in users])), daemon=True)
        loader.start()
        time.sleep(args.deploy_at)
        t_deploy = time.monotonic()
        deploy(artifacts, repository, opts)
        t_written = time.monotonic()
        deadline = t_written + 60
        while not _models_on(server, 2):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench_swap: {mode}: the server did not switch to version 2 within 60 s")
            time.sleep(0.02)
        t_switched = time.monotonic()
        loader.join(args.seconds + 120)
    r = load["r"]

    def p99(rows):
        return float(np.percentile([dt for _, dt, _, _ in rows], 99) * 1000) if rows else float("nan")

    steady = [row for row in r.timeline if t_deploy - 3.0 <= row[0] < t_deploy]
    during = [row for row in r.timeline if t_written <= row[0] <= t_switched]
    after = [row for row in r.timeline if row[0] > t_switched + 0.5]
    return {"mode": mode, "requests": r.total, "failed": r.total - r.count(200) + sum(r.errors.values()),
            "old_after_switch": sum(1 for *_, v in after if v != "2"), "switch_s": round(t_switched - t_written, 2),
            "steady_p99_ms": round(p99(steady), 2), "swap_p99_ms": round(p99(during), 2),
            "ratio": round(p99(during) / p99(steady), 2), "swap_requests": len(during)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True, help="trained artifacts (`recserve train --out`)")
    ap.add_argument("--modes", default="explicit,poll")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=16.0, help="load per round")
    ap.add_argument("--deploy-at", type=float, default=4.0, help="seconds of steady load before the deploy")
    ap.add_argument("--poll-secs", type=int, default=1, help="--repository-poll-secs in poll mode")
    ap.add_argument("--candidates", type=int, default=None, help="K of the repository (default: the exporter's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    bad = sorted(set(modes) - {"explicit", "poll"})
    if bad:
        raise SystemExit(f"bench_swap: --modes takes explicit and poll, got {', '.join(bad)}")
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    rows = []
    try:
        for _ in range(args.rounds):
            for mode in modes:
                rows.append(one_round(mode, args.artifacts, work, args))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'mode':<9} {'rounds':>6} {'failed':>6} {'old after':>9} {'switch s':>12} {'p99 ratio':>12} "
          f"{'swap p99 ms':>14}")
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        def rng(key: str, mine=mine) -> str:
            return f"{min(r[key] for r in mine):g}-{max(r[key] for r in mine):g}"
        print(f"{mode:<9} {len(mine):>6} {sum(r['failed'] for r in mine):>6} "
              f"{sum(r['old_after_switch'] for r in mine):>9} {rng('switch_s'):>12} {rng('ratio'):>12} "
              f"{rng('swap_p99_ms'):>14}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
