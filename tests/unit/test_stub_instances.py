"""The supervisor's view of Triton's python-backend stubs (`recserve.supervisor.stub_instances`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from recserve.supervisor import STUB, stub_instances

pytestmark = pytest.mark.unit


def _fake_stub(tmp_path, name: str) -> subprocess.Popen:
    """A child of this process whose argv ends as a stub's does: .../triton_python_backend_stub ... NAME DEFAULT."""
    return subprocess.Popen([str(tmp_path / STUB), "-c", "import time; time.sleep(60)", name, "DEFAULT"],
                            executable=sys.executable)


@pytest.mark.parametrize("pid_order", ["ascending", "wrapped"])
def test_while_an_old_versions_stub_exits_beside_the_new_one_the_newest_is_the_instance(tmp_path, monkeypatch,
                                                                                       pid_order):
    from recserve import supervisor

    if pid_order == "wrapped":     # pid_max is 32768 here: after a wrap the new stub has the lower pid
        scandir = os.scandir
        monkeypatch.setattr(supervisor.os, "scandir", lambda path: sorted(
            scandir(path), key=lambda e: -int(e.name) if e.name.isdigit() else 0))
    tmp = tmp_path
    old = _fake_stub(tmp, "recommend_0_0")
    other = _fake_stub(tmp, "ranker_0_0")
    try:
        time.sleep(0.05)
        deadline = time.monotonic() + 5
        while len(stub_instances(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stub_instances(os.getpid()) == {"recommend_0_0": old.pid, "ranker_0_0": other.pid}
        time.sleep(0.05)                  # the start times are in clock ticks (10 ms): keep them apart
        new = _fake_stub(tmp, "recommend_0_0")
        try:
            deadline = time.monotonic() + 5
            while stub_instances(os.getpid()).get("recommend_0_0") != new.pid and time.monotonic() < deadline:
                time.sleep(0.01)
            # both run, as for a moment after a swap: the new version's stub is the one the supervisor watches
            assert stub_instances(os.getpid()) == {"recommend_0_0": new.pid, "ranker_0_0": other.pid}
            old.kill()
            old.wait()
            assert stub_instances(os.getpid()) == {"recommend_0_0": new.pid, "ranker_0_0": other.pid}
        finally:
            new.kill()
            new.wait()
    finally:
        for p in (old, other):
            p.kill()
            p.wait()
