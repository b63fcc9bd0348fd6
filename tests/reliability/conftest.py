"""The reliability suite: the guarded server (front door, supervisor, queue limits) under hostile input and faults.

It uses the session's server (`served`, tests/conftest.py) for the bad-input matrix, and servers of its own
(`recserve serve` in a subprocess) for kills and stops. `-m long` runs the longer variants (more load, longer
windows); `RECSERVE_RELIABILITY_REPORT=FILE` writes the figures the tests measured, as JSON (README table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from guarded import FIGURES, recommend_json


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("RECSERVE_RELIABILITY_REPORT")
    if path and FIGURES:
        Path(path).write_text(json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="session")
def users(served) -> list[int]:
    return np.load(served.repository / "retrieval" / "1" / "users.npz")["user_ids"][:8].tolist()


@pytest.fixture(scope="session")
def expected(served, users) -> dict[int, list[int]]:
    """Each user's top 5 before any hostile input: afterwards the server must still give exactly these."""
    out = {}
    for u in users:
        r = requests.post(f"http://{served.url('http')}/v2/models/recommend/infer", json=recommend_json(u), timeout=10)
        r.raise_for_status()
        out[u] = next(o["data"] for o in r.json()["outputs"] if o["name"] == "item_ids")
    return out


