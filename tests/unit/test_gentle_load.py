"""Models load at low priority in a thread of their own and answer at the priority they started with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types

import pytest

from recserve.serving import steps
from recserve.serving.repository import _write_config

pytestmark = pytest.mark.unit

FAKE = "recserve.serving.steps._fake_step_for_tests"


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture
def fake_step(monkeypatch):
    """A step module whose model records the thread and nice value of each call."""
    seen: dict = {}

    class Model:
        def initialize(self, args):
            seen["initialize"] = (threading.get_ident(), _nice(), args["model_name"])
            if args.get("fail"):
                raise RuntimeError("the load failed")

        def serving_thread(self):
            seen["serving_thread"] = (threading.get_ident(), _nice())

        def execute(self, requests):
            seen["execute"] = (threading.get_ident(), _nice())
            return [f"answer to {r}" for r in requests]

        def finalize(self):
            seen["finalize"] = True

    module = types.ModuleType(FAKE)
    module.TritonPythonModel = Model
    monkeypatch.setitem(sys.modules, FAKE, module)
    return seen


def _args(parameters: dict | None = None, **extra) -> dict:
    config = {"name": "fake", "parameters": {k: {"string_value": v} for k, v in (parameters or {}).items()}}
    return {"model_config": json.dumps(config), "model_name": "fake", **extra}


def test_the_load_runs_in_another_thread_at_load_nice_and_requests_are_answered_at_the_callers_priority(fake_step):
    before = _nice()
    model = steps.gentle("_fake_step_for_tests")()
    model.initialize(_args())
    me = threading.get_ident()
    loader, load_nice, name = fake_step["initialize"]
    assert loader != me and name == "fake"
    assert load_nice == min(19, max(before, steps.LOAD_NICE))
    assert fake_step["serving_thread"] == (me, before)       # per-thread settings where requests are answered
    assert model.execute(["r1", "r2"]) == ["answer to r1", "answer to r2"]
    assert fake_step["execute"] == (me, before) and _nice() == before
    model.finalize()
    assert fake_step["finalize"] is True


def test_a_model_with_thread_pools_loads_at_full_priority_since_its_pool_threads_would_inherit_the_low_one(fake_step):
    before = _nice()
    steps.gentle("_fake_step_for_tests")().initialize(_args({"intra_op_threads": "4"}))
    assert fake_step["initialize"][:2] == (threading.get_ident(), before)


def test_a_failed_load_raises_its_own_error_in_the_calling_thread(fake_step):
    with pytest.raises(RuntimeError, match="the load failed"):
        steps.gentle("_fake_step_for_tests")().initialize(_args(fail=True))
    assert fake_step["initialize"][0] != threading.get_ident()


def test_load_nice_zero_loads_in_the_calling_thread(fake_step, monkeypatch):
    monkeypatch.setattr(steps, "LOAD_NICE", 0)
    steps.gentle("_fake_step_for_tests")().initialize(_args())
    assert fake_step["initialize"][0] == threading.get_ident()


def test_the_generated_model_py_loads_its_step_gently(tmp_path):
    (tmp_path / "recommend" / "1").mkdir(parents=True)
    _write_config(tmp_path, "recommend", {"name": "recommend"}, "fused:TritonPythonModel")
    namespace: dict = {}
    exec((tmp_path / "recommend" / "1" / "model.py").read_text(), namespace)    # noqa: S102 - our own file
    cls = namespace["TritonPythonModel"]
    assert cls.__qualname__ == "gentle('fused')"
    assert {"initialize", "execute", "finalize"} <= set(vars(cls))


def test_the_steps_module_is_imported_on_the_callers_thread_so_its_libraries_pools_keep_full_priority():
    """numpy's, scipy's and faiss's BLAS pools start at import and keep the priority of the importing thread."""
    code = """
import os
from recserve.serving import steps
steps.gentle("fused")
steps.load_gently(lambda: [__import__(m) for m in ("numpy", "faiss", "onnxruntime")], 19)   # each starts threads
print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[0]"


def test_the_ranker_watchdog_restarted_from_the_serving_thread_replaces_the_one_the_load_started():
    """The watchdog takes the GIL every 10 ms; left at the load's nice 19 it stalled requests."""
    code = """
import os, threading, time
from recserve.serving import steps
from recserve.serving.local import LocalPipeline
p = LocalPipeline.__new__(LocalPipeline)          # the watchdog's state only; no repository needed
p.ranker_timeout, p._watch, p._watchdogs = 0.25, None, 0
steps.load_gently(p.serving_thread, 19)            # as the load starts it
p.serving_thread()                                  # as the served model calls it, from its own thread
time.sleep(0.1)
dogs = [t for t in threading.enumerate() if t.name == "ranker-watchdog"]
print(len(dogs), os.getpriority(os.PRIO_PROCESS, dogs[0].native_id))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "1 0"
