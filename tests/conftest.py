"""Markers follow folders (tests/unit -> unit, tests/integration -> integration), as in LitServe."""

from __future__ import annotations

from pathlib import Path

import pytest

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
