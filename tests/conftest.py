"""Markers follow folders (tests/unit -> unit, tests/integration -> integration), as in LitServe."""

from __future__ import annotations

from pathlib import Path

import pytest

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in ("unit", "integration"):
            if folder in parts:
                item.add_marker(getattr(pytest.mark, folder))
