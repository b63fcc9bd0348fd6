"""The private backend directory handed to tritonserver: symlinks only, right stub for this Python."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from recserve import server
from recserve.errors import ServerError
from recserve.server import STUB_NAME, prepare_backend_dir

pytestmark = pytest.mark.unit

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def fake_wheel(root: Path, stub_versions: tuple[str, ...]) -> Path:
    backend = root / "backends" / "python"
    backend.mkdir(parents=True)
    (backend / "libtriton_python.so").write_bytes(b"")
    (backend / "triton_python_backend_utils.py").write_text("")
    for version in stub_versions:
        (root / "python_backend_stubs" / version).mkdir(parents=True)
        (root / "python_backend_stubs" / version / STUB_NAME).write_bytes(b"")
    (root / "bin").mkdir()
    return root


@pytest.fixture
def wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = fake_wheel(tmp_path / "wheel", (VERSION, "3.8"))
    monkeypatch.setattr(server, "_pytriton_tritonserver_dir", lambda: root)
    return root


def test_links_backend_and_this_pythons_stub(wheel: Path, tmp_path: Path) -> None:
    dest = prepare_backend_dir(tmp_path / "backends")
    python_dir = dest / "python"
    names = sorted(p.name for p in python_dir.iterdir())
    assert names == sorted(["libtriton_python.so", "triton_python_backend_utils.py", STUB_NAME])
    assert all((python_dir / name).is_symlink() for name in names)
    assert (python_dir / STUB_NAME).resolve() == (wheel / "python_backend_stubs" / VERSION / STUB_NAME).resolve()
    assert (python_dir / "libtriton_python.so").resolve() == (wheel / "backends/python/libtriton_python.so").resolve()


def test_is_idempotent(wheel: Path, tmp_path: Path) -> None:
    first = prepare_backend_dir(tmp_path / "backends")
    second = prepare_backend_dir(tmp_path / "backends")
    assert first == second
    assert len(list((second / "python").iterdir())) == 3


def test_missing_stub_names_the_python_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_wheel(tmp_path / "wheel", ("2.7",))
    monkeypatch.setattr(server, "_pytriton_tritonserver_dir", lambda: root)
    with pytest.raises(ServerError, match=rf"no {STUB_NAME} for Python {VERSION}.*available: 2\.7"):
        prepare_backend_dir(tmp_path / "backends")


def test_missing_binary_says_how_to_install(wheel: Path) -> None:
    with pytest.raises(ServerError, match=r"pip install nvidia-pytriton==0\.7\.0"):
        server.find_tritonserver()


def test_real_wheel_has_a_stub_for_this_python(tmp_path: Path) -> None:
    try:
        server.find_tritonserver()
    except ServerError as exc:
        pytest.skip(f"nvidia-pytriton is not installed: {exc}")
    python_dir = prepare_backend_dir(tmp_path / "backends") / "python"
    assert (python_dir / STUB_NAME).resolve().is_file()
    assert VERSION in str((python_dir / STUB_NAME).resolve())
    assert not (python_dir / STUB_NAME).resolve().is_relative_to(tmp_path)  # a link, not a copy
