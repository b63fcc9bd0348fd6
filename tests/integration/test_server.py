"""Start the real tritonserver from the nvidia-pytriton wheel on a tiny python-backend repository."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from recserve.errors import ServerError
from recserve.server import TritonServer, find_tritonserver, free_port

pytestmark = pytest.mark.integration

try:
    TRITONSERVER = find_tritonserver()
except ServerError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"no tritonserver binary: {exc}", allow_module_level=True)

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

# A throwaway fixture model, not a served one: a literal config is the shortest way to say it.
CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

IDENTITY_PY = textwrap.dedent(
    """\
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                output = pb_utils.Tensor("OUTPUT0", data.copy())
                responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
            return responses
    """
)

BROKEN_PY = textwrap.dedent(
    """\
    class TritonPythonModel:
        def initialize(self, args):
            raise ValueError("boom: weights missing")

        def execute(self, requests):
            return []
    """
)


def write_model(repository: Path, name: str, model_py: str) -> Path:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    (repository / name / "1" / "model.py").write_text(model_py)
    return repository


def ports() -> dict[str, int]:
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def identity_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("repo"), "identity", IDENTITY_PY)


@pytest.fixture(scope="module")
def server(identity_repo: Path):
    with TritonServer(identity_repo, verify=False, ready_timeout=60, **ports()) as srv:
        yield srv


def test_server_is_ready_and_serves_metrics(server: TritonServer) -> None:
    import requests

    assert server.is_alive
    assert requests.get(f"{server.url('http')}/v2/health/ready", timeout=5).status_code == 200
    metrics = requests.get(server.url("metrics"), timeout=5)
    assert metrics.status_code == 200
    assert 'nv_inference_request_success{model="identity"' in metrics.text


def test_identity_over_http(server: TritonServer) -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    client = httpclient.InferenceServerClient(server.url("http").removeprefix("http://"))
    request = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    request.set_data_from_numpy(data)
    result = client.infer("identity", [request], outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_identity_over_grpc(server: TritonServer) -> None:
    data = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    client = grpcclient.InferenceServerClient(server.url("grpc"))
    request = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    request.set_data_from_numpy(data)
    result = client.infer("identity", [request], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_taken_port_is_named_before_start(identity_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(identity_repo, verify=False, **{**ports(), "grpc_port": port})
        with pytest.raises(ServerError, match=rf"port {port} is already in use.*--grpc-port"):
            server.start()
        assert server.process is None


def test_taken_port_is_named_from_the_server_log(identity_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Skip our own bind test so the real server meets the clash and exits: this is the fail-fast path.
    monkeypatch.setattr(TritonServer, "_check_ports", lambda self: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(identity_repo, verify=False, ready_timeout=60, **{**ports(), "http_port": port})
        with pytest.raises(ServerError, match=rf"port {port} is already in use; pass --http-port"):
            with server:
                pass
    assert server.process is not None and server.process.poll() is not None
    shutil.rmtree(server.log_path.parent)


def test_model_that_fails_to_initialize_is_named(tmp_path: Path) -> None:
    repository = write_model(tmp_path / "repo", "broken", BROKEN_PY)
    server = TritonServer(repository, ready_timeout=60, verify=False, **ports())
    with pytest.raises(ServerError, match=r"model 'broken' failed to load: .*boom: weights missing") as info:
        with server:
            pass
    assert "last" in str(info.value) and "tritonserver.log" in str(info.value)
    assert server.process is not None and server.process.poll() is not None
    assert server.log_path is not None and server.log_path.is_file()
    shutil.rmtree(server.log_path.parent)  # kept by stop() for the message; litter for a test


def test_stop_leaves_no_process(identity_repo: Path) -> None:
    server = TritonServer(identity_repo, verify=False, ready_timeout=60, **ports())
    with server:
        pid = server.process.pid
        assert server.is_alive
    assert server.process.poll() is not None
    assert server.process.returncode == 0
    assert not server.is_alive
    assert group_is_gone(pid), "a python-backend stub outlived the server"


def test_serve_prints_one_ready_line_and_stops_on_sigterm(identity_repo: Path) -> None:
    p = ports()
    code = (
        "from recserve.server import serve; import sys; "
        f"sys.exit(serve({str(identity_repo)!r}, http_port={p['http_port']}, grpc_port={p['grpc_port']}, "
        f"metrics_port={p['metrics_port']}, stream_log=False, verify=False))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == (
            f"Triton ready: HTTP http://127.0.0.1:{p['http_port']}, gRPC 127.0.0.1:{p['grpc_port']}, "
            f"metrics http://127.0.0.1:{p['metrics_port']}/metrics"
        ), proc.stderr.read() if not line else line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
