"""What one python-backend model load costs the requests of a busy server, with and without recserve's code.

    python loadtest/bench_stub_start.py --repository work/repo_fp32 [--rounds 4]

A copy of the repository is served (`recserve serve`'s TritonServer, EXPLICIT control); while 8 connections load
it through the front door (the reliability suite's generator, in a process of its own), two extra models are
loaded and unloaded in turn, `--rounds` times each: `probe_min`, a python model whose model.py imports nothing,
and `probe_cat`, a copy of the repository's `catalogue` (recserve's step: its libraries imported, its files
loaded at nice 19). Printed: p50 / p99 of the responses from each load's start to 0.5 s after it ends, against
the rest of the run. If the bare model costs the requests what recserve's does, the cost is the python
backend's stub start (a process forked from tritonserver, an interpreter, the backend's module), not the step.
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

PROBE_MIN = """class TritonPythonModel:
    def execute(self, requests):
        return []
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import tritonclient.grpc as grpcclient
    from load import recommend_body, run_load_apart

    from recserve.deploy import live_version
    from recserve.server import TritonServer, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-stub-"))
    repo = work / "repo"
    shutil.copytree(args.repository, repo)
    version = live_version(repo)
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=work / "triton.log")
    events: list[tuple[str, str, float, float]] = []
    seconds = 4 + args.rounds * 6 + 2
    with server:
        # added after the start: the server verified and loaded the repository as exported
        m = repo / "probe_min"
        (m / "1").mkdir(parents=True)
        (m / "config.pbtxt").write_text(
            'name: "probe_min"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [{ name: "x" data_type: TYPE_INT64 dims: [1] }]\n'
            'output [{ name: "y" data_type: TYPE_INT64 dims: [1] }]\n'
            'instance_group [{ count: 1 kind: KIND_CPU }]\n')
        (m / "1" / "model.py").write_text(PROBE_MIN)
        g = repo / "probe_cat"
        shutil.copytree(repo / "catalogue", g)
        (g / "config.pbtxt").write_text((g / "config.pbtxt").read_text().replace('name: "catalogue"',
                                                                                 'name: "probe_cat"'))
        users = np.load(repo / "retrieval" / str(version) / "users.npz")["user_ids"][:64].tolist()
        load: dict = {}
        loader = threading.Thread(target=lambda: load.setdefault("r", run_load_apart(
            "127.0.0.1", server.http_port, 8, seconds, [recommend_body(u) for u in users])), daemon=True)
        loader.start()
        time.sleep(4)
        client = grpcclient.InferenceServerClient(server.admin_grpc_url)
        headers = server.admin_grpc_headers
        for _ in range(args.rounds):
            for name in ("probe_min", "probe_cat"):
                for kind, call in (("load", client.load_model), ("unload", client.unload_model)):
                    t = time.monotonic()
                    call(name, headers=headers)
                    events.append((name, kind, t, time.monotonic()))
                    time.sleep(1.5)
        client.close()
        loader.join(seconds + 120)
    shutil.rmtree(work, ignore_errors=True)
    tl = np.array([(a, b) for a, b, *_ in load["r"].timeline])
    calm = np.ones(len(tl), bool)
    for _, _, a, b in events:
        calm &= ~((tl[:, 0] >= a - 0.05) & (tl[:, 0] <= b + 0.6))
    calm &= tl[:, 0] > tl[0, 0] + 2
    report = {"steady": {"p50_ms": float(np.percentile(tl[calm, 1], 50) * 1e3),
                         "p99_ms": float(np.percentile(tl[calm, 1], 99) * 1e3), "responses": int(calm.sum())}}
    print(f"steady (no load or unload under way): p50 {report['steady']['p50_ms']:.1f} ms, "
          f"p99 {report['steady']['p99_ms']:.1f} ms")
    for name in ("probe_min", "probe_cat"):
        for kind in ("load", "unload"):
            mine = [(a, b) for n, k, a, b in events if n == name and k == kind]
            x = np.concatenate([tl[(tl[:, 0] >= a) & (tl[:, 0] <= b + 0.5), 1] for a, b in mine])
            cell = {"seconds": float(np.mean([b - a for a, b in mine])), "p50_ms": float(np.percentile(x, 50) * 1e3),
                    "p99_ms": float(np.percentile(x, 99) * 1e3), "responses": int(len(x))}
            report[f"{name} {kind}"] = cell
            print(f"{name:<10} {kind:<7} {cell['seconds']:.2f} s; responses meanwhile and 0.5 s after: "
                  f"p50 {cell['p50_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} ms "
                  f"({cell['p99_ms'] / report['steady']['p99_ms']:.2f}x steady)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
