"""One real tritonserver per session, serving a repository built from a tiny synthetic data set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from recserve.data import generate
from recserve.errors import ServerError
from recserve.evaluate import evaluate_artifacts
from recserve.export.onnx import export_onnx
from recserve.export.repository import write_repository
from recserve.server import TritonServer, find_tritonserver, free_port
from recserve.train import TrainConfig, train_all

TINY = {"n_users": 300, "n_items": 240, "n_interactions": 9000}
TINY_TRAIN = TrainConfig(tower_epochs=4, mf_epochs=3, ranker_epochs=2, candidates=60)
CANDIDATES = 60


@dataclass
class Served:
    artifacts: Path
    repository: Path
    manifest: dict
    server: TritonServer
    http_port: int
    grpc_port: int

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    train_all(generate(**TINY, seed=7), out, TINY_TRAIN, progress=False)
    evaluate_artifacts(out)
    export_onnx(out)
    return out


@pytest.fixture(scope="session")
def served(artifacts, tmp_path_factory):
    try:
        find_tritonserver()
    except ServerError as exc:
        pytest.skip(f"no tritonserver binary: {exc}")
    from recserve.export.repository import RepoOptions

    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    manifest = write_repository(artifacts, repository, RepoOptions(candidates=CANDIDATES))
    http, grpc, metrics = free_port(), free_port(), free_port()
    server = TritonServer(repository, http, grpc, metrics, log_file=tmp_path_factory.mktemp("log") / "triton.log")
    server.start()
    try:
        server.wait_ready(timeout=120)
        yield Served(artifacts, repository, manifest, server, http, grpc)
    finally:
        server.stop()
