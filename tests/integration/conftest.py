"""One real tritonserver per session, serving a repository built from a tiny synthetic data set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from recserve.errors import ServerError
from recserve.server import TritonServer, find_tritonserver, free_port
from recserve.serving.repository import write_repository

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
    server = TritonServer(repository, http, grpc, metrics, log_file=tmp_path_factory.mktemp("log") / "triton.log")
    server.start()
    try:
        server.wait_ready(timeout=120)
        yield Served(artifacts, repository, manifest, server, http, grpc)
    finally:
        server.stop()
