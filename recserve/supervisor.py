"""Supervision of a running Triton: a dead or stuck model is found and reloaded, and readiness says so meanwhile.

Triton 2.51 does not restart a python-backend stub that died: after `kill -9` of one, every request routed to
that instance fails for good, and `/v2/health/ready` stays 200. The supervisor, a thread of `recserve serve`:

- watches the stub processes (children of `tritonserver`, one per model instance) every `interval` seconds;
- sends each model a canary inference (a known user; the ranker gets the retrieval canary's output) every
  `canary_every` seconds, with a timeout, to catch a stub that is alive but does not answer;
- when either fails, sets the front door's readiness to "restoring MODEL: why" and reloads that model through
  Triton's EXPLICIT model control, with its own config plus a changed `recserve_restart` parameter (a load of
  an unchanged model is a no-op in Triton). The new instances start while the old ones still serve, so a live
  instance keeps answering during the reload (measured 0.4 s for `recommend`); then readiness is restored;
- when tritonserver itself stopped (2.51's python backend aborts the whole server, `boost::interprocess::
  lock_exception`, when a stub is killed while it holds a shared-memory lock: seen under load), sets readiness
  to "restarting tritonserver: cause" and starts it again behind the same front door, at most `max_restarts`
  times in `RESTART_WINDOW_S`; past that it gives up (`gave_up` says why) and `recserve serve` exits with the
  cause, for a process manager to restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

log = logging.getLogger("recserve.supervisor")

STUB = "triton_python_backend_stub"
RESTART_WINDOW_S = 600.0
LOAD_TIMEOUT_S = 600.0     # one model's load; new instances load at low priority (recserve.serving.steps.gentle)


def stub_instances(server_pid: int) -> dict[str, int]:
    """{instance name (`ranker_0_0`): pid} of the live python-backend stubs of one tritonserver.

    Two versions of a model name their instances alike, and for a moment after a swap the old version's stub
    is still exiting beside the new one's: the newest-started stub of a name is the one that serves."""
    found: dict[str, tuple[int, int]] = {}     # name -> (start time in clock ticks, pid)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
            if int(stat[1]) != server_pid or stat[0] == b"Z":
                continue
            started = int(stat[19])                # field 22 of /proc/PID/stat: starttime
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if argv and argv[0].endswith(STUB.encode()) and len(argv) >= 3:
            name = argv[-3].decode()               # ... <instance name> DEFAULT ''
            found[name] = max(found.get(name, (-1, -1)), (started, int(entry.name)))
    return {name: pid for name, (_, pid) in found.items()}


def model_of(instance: str) -> str:
    """`recommend_0_1` -> `recommend` (Triton names an instance <model>_<group>_<index>)."""
    return instance.rsplit("_", 2)[0]


def _tensor(name: str, dtype: str, value: np.ndarray) -> dict:
    return {"name": name, "datatype": dtype, "shape": list(value.shape), "data": value.reshape(-1).tolist()}


class Canaries:
    """One known-good request per model, from the repository's own files."""

    def __init__(self, repository: Path):
        from recserve.deploy import live_dir

        repository = Path(repository)
        with np.load(live_dir(repository, "retrieval") / "users.npz") as z:
            self.user = int(z["user_ids"][0])
        with np.load(live_dir(repository, "catalogue") / "items.npz") as z:
            self.item = int(z["item_ids"][0])
        self.genres = _config_inputs(repository / "item_tower" / "config.pbtxt")["item_genres"][0]
        self.models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
        self._nonce = 1

    def request(self, model: str, retrieved: dict | None) -> dict | None:
        one = np.array([[1]], np.int32)
        user = np.array([[self.user]], np.int64)
        if model == "retrieval":
            return {"inputs": [_tensor("user_id", "INT64", user), _tensor("k", "INT32", one)]}
        if model == "recommend":
            # an id no item has, new each time: the answer is unchanged, and no cache in front of the model (one
            # may be configured) can answer in its place
            self._nonce += 1
            return {"inputs": [_tensor("user_id", "INT64", user), _tensor("k", "INT32", one),
                               _tensor("exclude", "INT64", np.array([[-self._nonce]], np.int64))]}
        if model == "ranker":
            if retrieved is None:
                return None
            return {"inputs": [*retrieved, _tensor("k", "INT32", one)]}
        if model == "item_tower":
            return {"inputs": [_tensor("item_idx", "INT64", np.zeros((1, 1), np.int64)),
                               _tensor("item_genres", "FP32", np.zeros((1, self.genres), np.float32)),
                               _tensor("item_year", "INT64", np.zeros((1, 1), np.int64))]}
        if model == "catalogue":
            return {"inputs": [_tensor("item_ids", "INT64", np.array([[self.item]], np.int64))]}
        return None


def _config_inputs(path: Path) -> dict[str, list[int]]:
    from recserve.serving.repository import parse

    return {t.name: [int(d) for d in t.dims] for t in parse(path.read_text()).input}


class Supervisor:
    """The watch thread. `set_state` publishes readiness (the front door's); `admin` holds Triton's admin key."""

    def __init__(self, repository: Path, url: str, server_pid: Callable[[], int | None],
                 set_state: Callable[[str], object], admin_headers: dict[str, str],
                 interval: float = 0.5, canary_every: float = 2.0, canary_timeout: float = 3.0,
                 restart_server: Callable[[Callable[[], bool]], bool] | None = None,
                 exit_cause: Callable[[], str] = lambda: "it stopped", max_restarts: int = 3,
                 on_swap: Callable[[], object] = lambda: None,
                 before_swap: Callable[[int | None], object] = lambda pin: None,
                 grpc_url: str | None = None, grpc_headers: dict[str, str] | None = None):
        self.url = url.rstrip("/")
        self.grpc_url, self.grpc_headers = grpc_url, grpc_headers or {}
        self.server_pid = server_pid
        self.restart_server, self.exit_cause, self.max_restarts = restart_server, exit_cause, max_restarts
        self.server_restarts: list[dict] = []   # {"at", "cause", "seconds", "ok"} per start of a new tritonserver
        self.gave_up: str | None = None
        self._publish = set_state
        self.admin = admin_headers
        self.interval, self.canary_every, self.canary_timeout = interval, canary_every, canary_timeout
        self.repository = Path(repository)
        self.canaries = Canaries(repository)
        self.canaries_answered: dict[str, int] = {}   # per model: canaries answered (its inference counts hold them)
        self.on_swap, self.before_swap = on_swap, before_swap
        self._manifest_seen: tuple[tuple[int, int], tuple[int, str]] | None = None
        self.serving = self._live()                  # (version, A/B split) the server serves
        self.version = self.serving[0] if self.serving else 1
        self.swaps: list[dict] = []     # {"from", "to", "seconds", "ok", "error"} per switch of the live version
        self._refused: tuple[int, str] | None = None
        self.restarts: list[dict] = []          # {"model", "reason", "seconds", "ok"} per reload
        self.history: list[tuple[float, str]] = []   # (time.monotonic(), state) each time readiness changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._expected: dict[str, int] = {}
        self._generation = 0
        self._session = requests.Session()

    def set_state(self, state: str) -> None:
        self.history.append((time.monotonic(), state))
        self._publish(state)

    def start(self) -> None:
        pid = self.server_pid()
        self._expected = stub_instances(pid) if pid else {}
        self.set_state("ready")
        self._thread = threading.Thread(target=self._run, name="recserve-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._session.close()   # Triton's stop waits for open HTTP connections, keep-alive ones included

    # -- checks --------------------------------------------------------------------------------------------

    def dead_instances(self) -> dict[str, str]:
        """{model: why} for models one of whose stubs is gone."""
        pid = self.server_pid()
        if pid is None:
            return {}
        alive = stub_instances(pid)
        return {model_of(i): f"its process {p} ({i}) died" for i, p in self._expected.items() if alive.get(i) != p}

    def canary(self) -> dict[str, str]:
        """{model: why} for models that did not answer their canary correctly in time."""
        failed: dict[str, str] = {}
        retrieved = None
        for model in ("retrieval", *[m for m in self.canaries.models if m != "retrieval"]):
            if model not in self.canaries.models:
                continue
            body = self.canaries.request(model, retrieved)
            if body is None:
                continue
            try:
                r = self._session.post(f"{self.url}/v2/models/{model}/infer", json=body, timeout=self.canary_timeout)
            except requests.Timeout:
                failed[model] = f"no answer to its canary within {self.canary_timeout:g} s"
                continue
            except requests.RequestException as exc:
                failed[model] = f"canary failed: {type(exc).__name__}"
                continue
            self.canaries_answered[model] = self.canaries_answered.get(model, 0) + 1
            if r.status_code != 200:
                failed[model] = f"canary answered {r.status_code}: {r.text[:200]}"
            elif model == "retrieval":
                outs = r.json()["outputs"]
                retrieved = [{k: o[k] for k in ("name", "datatype", "shape", "data")} for o in outs]
        return failed

    # -- repair --------------------------------------------------------------------------------------------

    def reload(self, model: str, reason: str) -> bool:
        t0 = time.monotonic()
        self.set_state(f"restoring {model}: {reason}")
        log.warning("supervisor: %s %s; reloading it", model, reason)
        try:
            cfg = self._session.get(f"{self.url}/v2/models/{model}/config", timeout=5).json()
            self._generation += 1
            cfg.setdefault("parameters", {})["recserve_restart"] = {"string_value": str(self._generation)}
            error = self._load(model, json.dumps(cfg))
            ok = error is None
            if not ok:
                log.error("supervisor: reloading %s failed: %s", model, error)
        except requests.RequestException as exc:
            log.error("supervisor: reloading %s failed: %s", model, exc)
            ok = False
        seconds = time.monotonic() - t0
        self.restarts.append({"model": model, "reason": reason, "seconds": round(seconds, 3), "ok": ok})
        if ok:
            log.warning("supervisor: %s reloaded in %.2f s", model, seconds)
        return ok

    def join(self, timeout: float) -> None:
        """Wait for the watch thread to end (it ends on `stop`, or once it gave up on tritonserver)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def will_restart(self) -> bool:
        """True while a stopped tritonserver is (or will be) started again: `serve` keeps waiting meanwhile."""
        if self.restart_server is None or self.gave_up is not None or not self._thread or not self._thread.is_alive():
            return False
        return self._recent_restarts() < self.max_restarts \
            or (bool(self.server_restarts) and self.server_restarts[-1]["seconds"] is None)

    def _recent_restarts(self) -> int:
        now = time.monotonic()
        return sum(now - r["at"] < RESTART_WINDOW_S for r in self.server_restarts)

    def _restart(self) -> bool:
        """tritonserver stopped by itself: start it again, or give up. Returns True when it runs again."""
        cause, now, recent = self.exit_cause(), time.monotonic(), self._recent_restarts()
        if self.restart_server is None or recent >= self.max_restarts:
            self.gave_up = (f"not restarted: {recent} restart(s) in the last {RESTART_WINDOW_S:g} s, "
                            f"at most {self.max_restarts} (--max-restarts)")
            self.set_state(f"down: tritonserver stopped ({cause}); {self.gave_up}")
            log.error("supervisor: tritonserver stopped (%s); %s", cause, self.gave_up)
            return False
        record = {"at": now, "cause": cause, "seconds": None, "ok": False}
        self.server_restarts.append(record)
        self.set_state(f"restarting tritonserver: it stopped ({cause})")
        log.error("supervisor: tritonserver stopped (%s); starting it again", cause)
        ok = self.restart_server(self._stop.is_set)
        record["seconds"], record["ok"] = round(time.monotonic() - now, 3), ok
        if ok:
            log.warning("supervisor: tritonserver runs again after %.2f s", record["seconds"])
        return ok

    # -- versions: `recserve deploy` / `rollback` changed the live version (recserve/deploy.py) ---------------

    def _live(self) -> tuple[int, str] | None:
        """What the manifest says to serve: (live version, the A/B split as JSON, "" when none). Parsed again
        only when the file changed (it is looked at every `interval`)."""
        path = self.repository / "manifest.json"
        try:
            st = path.stat()
            if self._manifest_seen is None or self._manifest_seen[0] != (st.st_mtime_ns, st.st_size):
                manifest = json.loads(path.read_text())
                ab = manifest.get("ab")
                self._manifest_seen = ((st.st_mtime_ns, st.st_size),
                                       (int(manifest.get("model_version", 1)), json.dumps(ab, sort_keys=True) if ab
                                        else ""))
            return self._manifest_seen[1]
        except (OSError, ValueError):     # a manifest being replaced; the next look sees it whole
            return None

    def swap(self, version: int) -> bool:
        """Load every model's `version` (its config on disk names it, and an A/B split's second version) while
        the old version serves."""
        from recserve.deploy import SWAP_ORDER
        from recserve.errors import RecserveError
        from recserve.integrity import verify_repository

        t0, record = time.monotonic(), {"from": self.version, "to": version, "seconds": None, "ok": False}
        state = self._live()
        self.swaps.append(record)
        if version != self.version:
            log.warning("supervisor: the repository's live version is now %s (was %s); loading it", version,
                        self.version)
        else:
            log.warning("supervisor: the repository's A/B split changed (version %s stays live); loading it", version)
        try:
            verify_repository(self.repository)
        except RecserveError as exc:
            record["error"] = f"not loaded: {exc}"
            record["seconds"] = round(time.monotonic() - t0, 3)
            log.error("supervisor: version %s %s; version %s serves on", version, record["error"], self.version)
            self._refused = state             # not retried until the manifest says something else
            return False
        old_split, new_split = bool(self.serving and self.serving[1]), bool(state and state[1])
        if state is not None and state[0] == self.version and (old_split or new_split):
            self.before_swap(self.version)    # a split starts or ends: every user on the live version meanwhile
        elif old_split:
            self.before_swap(None)            # a deploy ends a split: the newest loaded version meanwhile
        models = [m for m in SWAP_ORDER if m in self.canaries.models] + \
            [m for m in self.canaries.models if m not in SWAP_ORDER]
        record["loads"] = loads = []      # (model, monotonic start, seconds) per model loaded, then "on_swap"
        for model in models:
            t_model = time.monotonic()
            error = self._load(model)
            loads.append((model, t_model, round(time.monotonic() - t_model, 3)))
            if error:
                record["error"] = f"loading {model}: {error}"
                break
        self.version, self.serving, self._refused = version, state, None
        self.canaries = Canaries(self.repository)
        t_contract = time.monotonic()
        self.on_swap()
        loads.append(("on_swap", t_contract, round(time.monotonic() - t_contract, 3)))
        pid = self.server_pid()
        self._expected = stub_instances(pid) if pid else {}
        record["seconds"], record["ok"] = round(time.monotonic() - t0, 3), "error" not in record
        if record["ok"]:
            log.warning("supervisor: version %s serves (%.2f s)", version, record["seconds"])
        else:
            log.error("supervisor: switching to version %s failed: %s", version, record["error"])
        return record["ok"]

    def _load(self, model: str, config: str | None = None) -> str | None:
        """Load (or reload, with `config`) one model through Triton's model control; the error, or None.

        Over gRPC when there is a gRPC address. Triton's HTTP server answers a load on one of its worker threads
        and holds that thread until the load ends (0.2-1.5 s per model); every keep-alive connection the thread
        serves waits meanwhile, the front door's connections to Triton among them. Measured during a deploy
        under load: single requests of 150-1150 ms at each model's load, gone over gRPC."""
        if self.grpc_url:
            import tritonclient.grpc as grpcclient
            from tritonclient.utils import InferenceServerException

            try:
                with grpcclient.InferenceServerClient(self.grpc_url) as client:
                    client.load_model(model, headers=self.grpc_headers, config=config, client_timeout=LOAD_TIMEOUT_S)
            except InferenceServerException as exc:
                return str(exc)[:300]
            return None
        try:
            body = {"parameters": {"config": config}} if config is not None else None
            r = self._session.post(f"{self.url}/v2/repository/models/{model}/load", headers=self.admin,
                                   json=body, timeout=LOAD_TIMEOUT_S)
        except requests.RequestException as exc:
            return str(exc)
        return None if r.status_code == 200 else r.text[:300]

    def _run(self) -> None:
        last_canary, ready = time.monotonic(), True
        while not self._stop.wait(self.interval):
            live = self._live()
            if live is not None and live not in (self.serving, self._refused) and self.server_pid() is not None:
                self.swap(live[0])
                last_canary = 0.0        # a canary right away
                continue
            if self.server_pid() is None:
                ready = False
                if not self._restart() and self.gave_up is not None:
                    return
                pid = self.server_pid()
                self._expected = stub_instances(pid) if pid else {}
                continue
            broken = self.dead_instances()
            if not broken and (not ready or time.monotonic() - last_canary >= self.canary_every):
                last_canary = time.monotonic()
                broken = self.canary()
                if not broken and not ready:
                    ready = True
                    self.set_state("ready")
                    log.warning("supervisor: every model answers again; ready")
            if not broken or self._stop.is_set():
                continue
            ready = False
            for model, why in sorted(broken.items()):
                self.reload(model, why)
            pid = self.server_pid()
            self._expected = stub_instances(pid) if pid else {}
