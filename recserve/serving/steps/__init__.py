"""The python-backend models of the served path; each generated model.py names its class here through `gentle`.

`gentle(module, cls)` is the class Triton's python backend instantiates. It runs the step's `initialize`
(files, ONNX Runtime sessions, the index, the warm-up) in a thread of its own at nice `LOAD_NICE`, then
answers every request with the step's own `execute` on the backend's thread, which was never lowered. A deploy
(`recserve deploy`) loads the new version while the old one serves on the same cores: loaded at full priority,
the new instances took the cores from the requests (README "Versions and hot swap"). Linux keeps a nice value
per thread, and lowering one needs no privilege while raising it again does, hence the thread.

The threads a load starts inherit its priority and keep it. So the step's module, and the libraries that start
threads when imported (POOL_LIBRARIES: numpy's and faiss's BLAS pools, ONNX Runtime's own thread), are imported
where model.py is, on the backend's thread. Imported in the load thread, a BLAS pool at nice 19 slowed every
request (c=1 p50 2.6x FastAPI's). A step whose ONNX Runtime or OpenMP pools have more than one thread (they
start during the load) loads at full priority.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading

# The nice value models load at; 0 loads at full priority. Read by the stub (it inherits tritonserver's env).
LOAD_NICE = int(os.environ.get("RECSERVE_LOAD_NICE", "19"))
THREAD_PARAMS = ("threads", "intra_op_threads", "omp_threads")   # config parameters that size thread pools
# Libraries that start threads when imported (BLAS pools; ONNX Runtime's own): imported on the backend's thread
POOL_LIBRARIES = ("numpy", "scipy.sparse", "faiss", "onnxruntime")

log = logging.getLogger("recserve.triton")


def load_gently(work, nice: int = LOAD_NICE) -> None:
    """Run `work()` in a thread at `nice` and wait for it; its exception is raised here."""
    if nice <= 0:
        work()
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)    # this thread only (Linux)
        except OSError as exc:
            log.warning("loading at full priority: nice %s refused (%s)", nice, exc)
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
            failed.append(exc)

    loader = threading.Thread(target=run, name="recserve-load", daemon=True)
    loader.start()
    loader.join()
    if failed:
        raise failed[0]


def gentle(module: str, cls: str = "TritonPythonModel") -> type:
    """The python backend's model class for `recserve.serving.steps.<module>.<cls>`, loaded at low priority.
    The module and POOL_LIBRARIES are imported here, in the caller's thread (their pools start at import)."""
    for library in POOL_LIBRARIES:
        importlib.import_module(library)
    step = getattr(importlib.import_module(f"recserve.serving.steps.{module}"), cls)

    class TritonPythonModel:
        def initialize(self, args: dict) -> None:
            params = json.loads(args["model_config"]).get("parameters", {})
            pools = any(int(params.get(p, {}).get("string_value", "1") or 1) > 1 for p in THREAD_PARAMS)

            def work() -> None:
                model = step()
                model.initialize(args)
                self.model = model

            load_gently(work, 0 if pools else LOAD_NICE)
            self.model.serving_thread()

        def execute(self, requests):
            return self.model.execute(requests)

        def finalize(self) -> None:
            if hasattr(self, "model"):
                self.model.finalize()

    TritonPythonModel.__qualname__ = f"gentle({module!r})"
    return TritonPythonModel
