"""Markers follow folders (tests/unit -> unit, tests/integration -> integration), as in LitServe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from recserve.errors import ServerError
from recserve.server import TritonServer, find_tritonserver, free_port
from recserve.serving.repository import write_repository
from recserve.train import TrainConfig

TINY_DATA = {"n_users": 300, "n_items": 240, "n_interactions": 9000, "seed": 7}
TINY_TRAIN = TrainConfig(tower_epochs=4, mf_epochs=2, ranker_epochs=2, candidates=60, baselines_budget=3.0)

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in ("unit", "integration"):
            if folder in parts:
                item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Test models are tiny: one thread is as fast, and never spin-waits for a busy second core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_train_config() -> TrainConfig:
    """The TrainConfig `tiny_artifacts` was trained with."""
    return TINY_TRAIN


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """Trained, evaluated and ONNX-exported on a tiny synthetic set, once per session.

    Shared by the integration server, the INT8 and the distillation tests; a test that writes into the
    artifacts works on a copy.
    """
    import torch

    from recserve.data import generate
    from recserve.evaluate import evaluate_artifacts
    from recserve.export.onnx import export_onnx
    from recserve.train import train_all

    out = tmp_path_factory.mktemp("tiny_artifacts")
    before = torch.get_num_threads()
    torch.set_num_threads(1)     # a session fixture is set up before the module-scoped one_torch_thread
    try:
        train_all(generate(**TINY_DATA), out, TINY_TRAIN, progress=False)
        evaluate_artifacts(out)
        export_onnx(out)
    finally:
        torch.set_num_threads(before)
    return out


# -- one real tritonserver per session (integration and reliability tests), serving a tiny repository --

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
def artifacts(tiny_artifacts) -> Path:
    return tiny_artifacts


@pytest.fixture(scope="session")
def served(artifacts, tmp_path_factory):
    try:
        find_tritonserver()
    except ServerError as exc:
        pytest.skip(f"no tritonserver binary: {exc}")
    from recserve.serving.repository import RepoOptions

    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    manifest = write_repository(artifacts, repository, RepoOptions(candidates=CANDIDATES))
    http, grpc, metrics = free_port(), free_port(), free_port()
    logs = tmp_path_factory.mktemp("log")
    server = TritonServer(repository, http, grpc, metrics, log_file=logs / "triton.log",
                          access_log=logs / "frontdoor.log")
    server.start()
    try:
        server.wait_ready(timeout=120)
        yield Served(artifacts, repository, manifest, server, http, grpc)
    finally:
        server.stop()
