"""`make demo`: every stage once, on synthetic data by default, ending with a real Triton answering."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from recserve.data import generate, load_movielens, write_ml1m
from recserve.evaluate import evaluate_artifacts, format_table
from recserve.export.onnx import export_onnx
from recserve.serving.repository import write_repository
from recserve.train import TrainConfig, train_all

DEMO_SYNTH = {"n_users": 3000, "n_items": 2000, "n_interactions": 150_000}


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(work: Path, data: Path | None, repository: Path, http_port: int, grpc_port: int, metrics_port: int,
             n_users: int = 3) -> None:
    from recserve.client import RecClient
    from recserve.server import TritonServer

    work = Path(work)
    artifacts = work / "artifacts"
    if data is None:
        data = work / "synth"
        if not (data / "ratings.dat").exists():
            _stage(f"synthesising data into {data}")
            write_ml1m(generate(**DEMO_SYNTH, seed=0), data)
    _stage(f"training on {data}")
    train_all(load_movielens(data), artifacts, TrainConfig(baselines_budget=20.0), progress=sys.stderr.isatty())
    _stage("evaluating (full ranking, temporal holdout)")
    result = evaluate_artifacts(artifacts)
    print(format_table(result["models"], result["protocol"]["test_time_data"], result["served"]))
    _stage("exporting ONNX")
    for name, m in export_onnx(artifacts)["models"].items():
        print(f"{name}: max relative error vs PyTorch {m['max_rel_error']:.1e}")
    _stage(f"writing the Triton model repository {repository}")
    manifest = write_repository(artifacts, repository)
    idx = manifest["index"]
    print(f"{len(manifest['models'])} models, K={manifest['candidates']} candidates, {idx['spec']['kind']} index "
          f"(recall@{idx['recall_k']} vs exact {idx['recall_vs_exact']:.3f})")
    _stage("starting tritonserver")
    log = work / "tritonserver.log"
    with TritonServer(repository, http_port, grpc_port, metrics_port, log_file=log) as server:
        print(f"ready: HTTP {server.url('http')}, gRPC {server.url('grpc')} (log: {log})")
        ds_users = np.load(artifacts / "onnx" / "user_features.npz")["user_ids"]
        with RecClient(f"127.0.0.1:{grpc_port}", "grpc") as client:
            for user in ds_users[:n_users]:
                rec = client.recommend(int(user), k=10, mode="ensemble", titles=True)
                _stage(f"top 10 for user {user} (ensemble, gRPC)")
                for rank, item in enumerate(rec.items, 1):
                    print(f"{rank:3d}. {item.item_id:>7d}  {item.score:8.3f}  {item.title}")
            user = int(ds_users[0])
            same = ([i.item_id for i in client.recommend(user, 10, mode="pipeline").items]
                    == [i.item_id for i in client.recommend(user, 10, mode="ensemble").items])
            print(f"\nclient-orchestrated pipeline gives the same list as the ensemble for user {user}: {same}")
    print("server stopped. Try it yourself: `recserve serve --repository "
          f"{repository}` then `recserve recommend --user {int(ds_users[0])} -k 10`")
