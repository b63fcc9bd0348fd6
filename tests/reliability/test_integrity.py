"""Tampering: a one-byte change to any served file, a line added to model code, or a file slipped into the
repository, and the server refuses to start, naming the file; `--no-verify` is the explicit way round."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recserve.errors import ServerError
from recserve.integrity import verify_repository
from recserve.server import TritonServer, free_port


@pytest.fixture
def copy(served, tmp_path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(served.repository, dest)
    verify_repository(dest)          # the untouched copy passes
    return dest


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _served_files(manifest: dict) -> list[str]:
    return sorted(manifest["sha256"])


def test_every_served_file_is_in_the_manifest_model_code_included(served):
    files = _served_files(served.manifest)
    assert {"ranker/1/model.onnx", "ranker/1/model.py", "recommend/1/model.py", "retrieval/1/index.faiss",
            "retrieval/1/user_tower.onnx", "recommend/config.pbtxt"} <= set(files)
    assert "serving/steps/base.py" in served.manifest["code_sha256"]


@pytest.mark.parametrize("name", ["ranker/1/model.onnx", "retrieval/1/index.faiss", "retrieval/1/sources.npz",
                                  "retrieval/1/user_tower.onnx", "recommend/config.pbtxt", "catalogue/1/items.npz"])
def test_a_one_byte_change_refuses_to_start_naming_the_file(copy, name):
    _flip_one_byte(copy / name)
    server = TritonServer(copy, free_port(), free_port(), free_port())
    with pytest.raises(ServerError, match=rf"{name}.*changed after export"):
        server.start()
    assert server.process is None, "nothing may start from a tampered repository"


def test_every_file_of_the_repository_is_checked(copy, served):
    """Not only the graphs: flipping a byte of any one of the served files is caught."""
    for name in _served_files(served.manifest):
        path = copy / name
        original = path.read_bytes()
        if not original:
            continue
        _flip_one_byte(path)
        with pytest.raises(ServerError, match="changed after export"):
            verify_repository(copy)
        path.write_bytes(original)
    verify_repository(copy)


def test_a_line_appended_to_model_code_refuses_to_start(copy):
    with open(copy / "ranker" / "1" / "model.py", "a") as f:
        f.write("import os; os.system('echo owned')\n")
    with pytest.raises(ServerError, match=r"ranker/1/model.py.*changed after export"):
        verify_repository(copy)


def test_a_file_added_to_the_repository_refuses_to_start(copy):
    (copy / "ranker" / "2").mkdir()
    (copy / "ranker" / "2" / "model.py").write_text("print('a second version nobody exported')\n")
    with pytest.raises(ServerError, match=r"ranker/2/model.py is not in the manifest"):
        verify_repository(copy)


def test_a_manifest_without_code_hashes_or_missing_refuses(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["code_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServerError, match="not a recserve manifest"):
        verify_repository(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ServerError, match="no manifest.json"):
        verify_repository(copy)


def test_the_served_code_hashes_cover_everything_the_models_import():
    """The manifest's code hashes are the closure of what a python-backend model imports from recserve."""
    from recserve.integrity import PACKAGE, code_files

    probe = ("import sys; import recserve.serving.steps.fused, recserve.serving.steps.onnx_model, "
             "recserve.serving.steps.catalogue, recserve.serving.steps.retrieval; "
             "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('recserve')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    hashed = {str(p) for p in code_files()}
    missing = [f for f in loaded if str(Path(f).resolve()) not in hashed]
    assert not missing, f"served models import code the manifest does not hash: {missing}"
    assert all(Path(f).resolve().is_relative_to(PACKAGE) for f in loaded)


def test_recserve_serve_refuses_a_tampered_repository_in_one_line(copy):
    _flip_one_byte(copy / "ranker" / "1" / "model.onnx")
    r = subprocess.run([sys.executable, "-m", "recserve", "serve", "--repository", str(copy), "--http-port",
                        str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ranker/1/model.onnx" in lines[0] and "--no-verify" in lines[0], r.stderr
