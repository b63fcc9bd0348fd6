"""Start, watch and stop the real ``tritonserver`` that the nvidia-pytriton wheel ships.

The wheel keeps the python backend and its per-Python-version stubs apart, so the server
is given a private backend directory assembled from symlinks (site-packages is never
written to). The child's PATH starts with this interpreter's ``bin`` so the stub runs the
same environment, and its output (stdout and stderr) is tailed by a thread into a log file,
an optional stream, and a short in-memory tail used in error messages.

A recserve repository (one with a manifest) is served safely by default (README "Reliability"):
- its manifest is verified first: every file's sha256, model code included; a changed file refuses to start;
- Triton's HTTP port is internal, behind the front door (`recserve.serving.frontdoor`, nginx); Triton's admin
  APIs (model control, shared memory, statistics, trace, logging) need a key only this process holds;
- a supervisor thread (`recserve.supervisor`) reloads a model whose stub died or stopped answering;
- stopping drains: readiness goes 503, the front door finishes what is in flight, Triton gets
  `--exit-timeout-secs`, and the python backend's shared-memory regions (a per-server prefix) are removed;
- the server and nginx get a parent-death signal, so a `kill -9` of this process leaves no orphan serving.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TextIO

import requests

from recserve.errors import ServerError
from recserve.integrity import verify_repository

__all__ = ["TritonServer", "find_tritonserver", "prepare_backend_dir", "free_port", "serve"]

INSTALL_FIX = "pip install nvidia-pytriton==0.7.0"
STUB_NAME = "triton_python_backend_stub"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
LOG_TAIL_LINES = 200
ERROR_TAIL_LINES = 40
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
ADMIN_HEADER = "recserve-admin-key"
# Triton APIs that need the admin key on both protocols; inference, health and metadata stay open.
RESTRICTED = "model-repository,shared-memory,statistics,trace,logging"
SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int):
    """preexec_fn: the child gets `sig` when this process dies, even by SIGKILL (Linux prctl)."""
    def setup() -> None:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return setup if sys.platform.startswith("linux") else None


def describe_exit(code: int | None) -> str:
    """`exit code 1`, `killed by signal 9 (SIGKILL)`."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _pytriton_tritonserver_dir() -> Path:
    # find_spec locates the package without importing it (pytriton's import pulls in a lot).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"nvidia-pytriton is not installed, so there is no tritonserver binary; run `{INSTALL_FIX}`.")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def find_tritonserver() -> Path:
    """Return the path of the ``tritonserver`` binary shipped in the nvidia-pytriton wheel.

    Raises:
        ServerError: the wheel, or the binary inside it, is missing.
    """
    binary = _pytriton_tritonserver_dir() / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ServerError(f"tritonserver binary not found (or not executable) at {binary}; run `{INSTALL_FIX}`.")
    return binary


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def prepare_backend_dir(dest: Path) -> Path:
    """Assemble a backend directory whose ``python/`` holds the backend and this Python's stub.

    Args:
        dest: directory to create (or refresh); only symlinks are written into it.

    Returns:
        ``dest``, ready for ``tritonserver --backend-directory``.

    Raises:
        ServerError: the wheel lacks the python backend or a stub for the running Python version.
    """
    root = _pytriton_tritonserver_dir()
    backend = root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB_NAME
    missing = [backend / name for name in PYTHON_BACKEND_FILES if not (backend / name).is_file()]
    if missing:
        raise ServerError(f"python backend files missing: {', '.join(map(str, missing))}; run `{INSTALL_FIX}`.")
    if not stub.is_file():
        stubs_dir = root / "python_backend_stubs"
        available = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise ServerError(
            f"nvidia-pytriton has no {STUB_NAME} for Python {version} (expected {stub}); "
            f"available: {', '.join(available) or 'none'}. Use one of those Python versions."
        )
    python_dir = Path(dest) / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        _link(backend / name, python_dir / name)
    _link(stub, python_dir / STUB_NAME)
    return Path(dest)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (for tests; racy by nature)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports free on ``host`` right now: all are held open while the next is picked (two
    `free_port()` calls in a row can return the same port once the first socket is closed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Match the server: a port in TIME_WAIT is usable, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# Triton's own line names the port; gRPC core's line (printed first) only says "resolved for".
_IN_USE = (
    re.compile(r"Socket '[^']*:(\d+)' already in use"),
    re.compile(r"resolved for '[^']*:(\d+)'.*Address already in use"),
)
_FAILED_LOAD = re.compile(r"failed to load '([^']+)'(?: version \d+)?\s*:\s*(.*)")
_REPO_ERROR = re.compile(r"^E\d{4} .*model_repository_manager\.cc:\d+\] \"(.*)")
# Logged as errors on every CPU-only machine; never the reason a server stopped.
_NOISE = ("cudadriverhelper", "nvml", "dcgm", "cuda", "gpu")


def _failure_reason(lines: Sequence[str], port_flags: dict[int, str], backend_dir: Path | None = None) -> str:
    """Pick the one line that says why tritonserver stopped, in the order a user would fix them."""
    for pattern in _IN_USE:
        for line in lines:
            match = pattern.search(line)
            if match:
                port = int(match.group(1))
                flag = port_flags.get(port)
                return f"port {port} is already in use" + (f"; pass {flag} with a free port" if flag else "")
    for line in lines:
        if STUB_NAME in line and "not found" in line:
            where = f" in {backend_dir / 'python'}" if backend_dir else ""
            return f"{STUB_NAME} is not found{where}; the backend directory must hold the stub for this Python"
    for line in lines:
        match = _FAILED_LOAD.search(line)
        if match:
            # Triton escapes the traceback's newlines: keep the first line, the exception itself.
            detail = match.group(2).split("\\n")[0].strip().rstrip('"').strip()
            return f"model '{match.group(1)}' failed to load: {detail}"
    for line in lines:
        # configuration errors (bad ensemble, bad config.pbtxt) are logged by the repository manager
        match = _REPO_ERROR.search(line)
        if match:
            return f"model repository rejected: {match.group(1).strip().rstrip(chr(34))}"
    for line in reversed(lines):
        # an abort in C++: `terminate called after throwing an instance of 'boost::interprocess::lock_exception'`
        if line.startswith("terminate called"):
            return line.strip()
    errors = [line.strip() for line in lines if not any(noise in line.lower() for noise in _NOISE)]
    for line in reversed(errors):
        if line.startswith("error:") or "failed to start" in line:
            return line
    for line in reversed(errors):
        if re.match(r"E\d{4} ", line):
            return line
    return "no error line found in the log"


class TritonServer:
    """One ``tritonserver`` process: start it, wait for readiness, stop it, and say why it failed.

    Use as a context manager (``with TritonServer(repo) as server: ...``): entering starts the
    server and waits until it is ready; leaving stops it.

    Args:
        repository: model repository directory.
        http_port: HTTP/REST port (``--http-port``).
        grpc_port: gRPC port (``--grpc-port``).
        metrics_port: Prometheus metrics port (``--metrics-port``).
        host: address the three endpoints bind to.
        log_verbose: ``--log-verbose`` level.
        log_file: where the server log goes. ``None`` writes it into a temporary directory,
            a path writes it there, and a text stream (``sys.stderr``) receives every line as
            it comes (the log is then also kept in the temporary directory).
        extra_args: more ``tritonserver`` arguments, appended last.
        model_control_mode: ``none``, ``poll`` or ``explicit`` (the default: every model is loaded at start,
            and the supervisor may reload one).
        ready_timeout: default seconds :meth:`wait_ready` waits when entered as a context manager.
        verify: check the manifest's sha256 of every file before starting (refuses on any change).
        front_door: serve HTTP through nginx (`recserve.serving.frontdoor`); ``None``: when the repository is
            a recserve repository (it has a manifest).
        supervise: reload models whose stub died or stopped answering; ``None``: with the front door.
        drain_timeout: seconds a stop waits for the requests in flight.
        access_log: the front door's access log (status, seconds, upstream seconds, path per request); off when None.
        restricted: Triton APIs that need the admin key (`RESTRICTED`); a benchmark may open `statistics`, which
            perf_analyzer reads over gRPC and cannot send a key for.
        max_restarts: times the supervisor starts tritonserver again after it stopped by itself, within
            `recserve.supervisor.RESTART_WINDOW_S`; beyond that the server stays down and `serve` exits with the
            cause (a process manager, Kubernetes say, restarts the whole thing). 0: never.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        log_verbose: int = 0,
        log_file: str | os.PathLike[str] | TextIO | None = None,
        extra_args: Iterable[str] = (),
        model_control_mode: str = "explicit",
        ready_timeout: float = 120.0,
        verify: bool = True,
        front_door: bool | None = None,
        supervise: bool | None = None,
        drain_timeout: float = 5.0,
        access_log: str | os.PathLike[str] | None = None,
        restricted: str = RESTRICTED,
        max_restarts: int = 3,
    ) -> None:
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ServerError(f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {model_control_mode!r}.")
        ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
        if len(set(ports.values())) != len(ports):
            raise ServerError(f"HTTP, gRPC and metrics ports must differ, got {ports}.")
        self.repository = Path(repository)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.model_control_mode = model_control_mode
        self.ready_timeout = ready_timeout
        self._stream: TextIO | None = None
        self._log_path: Path | None = None
        if log_file is not None and hasattr(log_file, "write"):
            self._stream = log_file  # type: ignore[assignment]
        elif log_file is not None:
            self._log_path = Path(log_file)  # type: ignore[arg-type]
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._log_handle: IO[str] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._backend_dir: Path | None = None
        self.verify = verify
        recserve_repo = (self.repository / "manifest.json").is_file()
        self.front_door_enabled = recserve_repo if front_door is None else front_door
        self.supervise = (self.front_door_enabled and model_control_mode == "explicit") if supervise is None \
            else supervise
        self.drain_timeout = drain_timeout
        self.access_log = Path(access_log).resolve() if access_log else None
        self.restricted = restricted
        self.admin_key = secrets.token_hex(16)
        self.shm_prefix = f"recserve_{os.getpid()}_{secrets.token_hex(4)}_"
        self.triton_http_port = http_port
        self.triton_grpc_port = grpc_port
        self.front_door = None
        self.supervisor = None
        self.leaked_shm: list[str] = []
        self._stopped = False
        self._life_lock = threading.RLock()      # a stop and a restart by the supervisor never interleave
        self.max_restarts = max_restarts

    # -- addresses -----------------------------------------------------------------------------

    @property
    def _client_host(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return f"[{host}]" if ":" in host else host

    def url(self, protocol: str = "http") -> str:
        """Client address for ``"http"`` (``http://h:p``), ``"grpc"`` (``h:p``) or ``"metrics"`` (full URL)."""
        if protocol == "http":
            return f"http://{self._client_host}:{self.http_port}"
        if protocol == "grpc":
            return f"{self._client_host}:{self.grpc_port}"
        if protocol == "metrics":
            return f"http://{self._client_host}:{self.metrics_port}/metrics"
        raise ValueError(f"protocol must be 'http', 'grpc' or 'metrics', got {protocol!r}")

    @property
    def admin_url(self) -> str:
        """Triton's own HTTP address (internal when the front door is on); admin calls need `admin_headers`."""
        return f"http://127.0.0.1:{self.triton_http_port}" if self.front_door_enabled else self.url("http")

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers of an admin call (model control, statistics, logging, shared memory, trace)."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def admin_grpc_url(self) -> str:
        """Triton's own gRPC address (internal when the front door is on); admin calls need `admin_grpc_headers`."""
        return f"127.0.0.1:{self.triton_grpc_port}" if self.front_door_enabled else self.url("grpc")

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """The same over gRPC (Triton prefixes the restricted key's metadata name)."""
        return {f"triton-grpc-protocol-{ADMIN_HEADER}": self.admin_key}

    @property
    def log_path(self) -> Path | None:
        """The server log file (``None`` before :meth:`start`)."""
        return self._log_path

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The ``tritonserver`` process, once started."""
        return self._proc

    @property
    def is_alive(self) -> bool:
        """True while the server process runs."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = ERROR_TAIL_LINES) -> list[str]:
        """The last ``lines`` lines the server printed."""
        with self._tail_lock:
            return list(self._tail)[-lines:]

    # -- lifecycle -------------------------------------------------------------------------------

    def command(self, backend_dir: Path) -> list[str]:
        """The full ``tritonserver`` command line for a given backend directory."""
        return [
            str(find_tritonserver()),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={_pytriton_tritonserver_dir() / 'caches'}",
            f"--model-control-mode={self.model_control_mode}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            *(("--http-address=127.0.0.1", f"--http-port={self.triton_http_port}") if self.front_door_enabled
              else (f"--http-address={self.host}", f"--http-port={self.http_port}")),
            *((f"--http-restricted-api={self.restricted}:{ADMIN_HEADER}={self.admin_key}",
               f"--grpc-restricted-protocol={self.restricted}:{ADMIN_HEADER}={self.admin_key}") if self.restricted
              else ()),
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={max(1, int(self.drain_timeout))}",
            *(("--load-model=*",) if self.model_control_mode == "explicit"
              and not any(a.startswith("--load-model") for a in self.extra_args) else ()),
            *(("--grpc-address=127.0.0.1", f"--grpc-port={self.triton_grpc_port}") if self.front_door_enabled
              else (f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}")),
            "--allow-metrics=true",
            # latency quantiles (p50 .. p99.9) per model: what deploy/prometheus's p99 alert reads
            "--metrics-config=summary_latencies=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def _port_flags(self) -> dict[int, str]:
        return {self.http_port: "--http-port", self.grpc_port: "--grpc-port", self.metrics_port: "--metrics-port"}

    def _check_ports(self) -> None:
        for port, flag in self._port_flags().items():
            if not _port_is_free(self.host, port):
                raise ServerError(f"port {port} is already in use on {self.host}; pass {flag} with a free port.")

    def start(self) -> TritonServer:
        """Launch ``tritonserver`` in the background; call :meth:`wait_ready` next.

        Raises:
            ServerError: already started, repository missing, a port taken, or the binary missing.
        """
        if self._proc is not None:
            raise ServerError("this TritonServer was already started; create a new one to start again.")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} is not a directory; run the repository step first.")
        if self.verify:
            verify_repository(self.repository)
        self._check_ports()
        if self.front_door_enabled:
            from recserve.serving.frontdoor import find_nginx

            find_nginx()                      # says how to install it before anything starts
            self.triton_http_port, self.triton_grpc_port = free_ports(2)
        self._workdir = Path(tempfile.mkdtemp(prefix="recserve-triton-"))
        self._backend_dir = prepare_backend_dir(self._workdir / "backends")
        if self._log_path is None:
            self._log_path = self._workdir / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._launch("w")
        return self

    def _launch(self, log_mode: str) -> None:
        """Run the tritonserver process and the thread that tails its output into the log."""
        assert self._backend_dir is not None and self._log_path is not None and self._workdir is not None
        env = dict(os.environ)
        # The stub runs the first python on PATH: make it this environment's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["PYTHONDONTWRITEBYTECODE"] = "1"   # nothing is written into the (verified) repository
        # Closed by the reader thread when the server's output ends.
        self._log_handle = open(self._log_path, log_mode, encoding="utf-8")
        try:
            self._proc = subprocess.Popen(
                self.command(self._backend_dir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                # Own process group: Ctrl-C in a terminal reaches us, not the server, so we stop it
                # in order; the group also lets us kill stubs left behind by a crash.
                start_new_session=True,
                # SIGTERM when this process dies, even by SIGKILL: Triton stops itself and its stubs
                preexec_fn=_die_with_parent(signal.SIGTERM),
            )
        except OSError as exc:
            self._log_handle.close()
            if log_mode == "w":
                shutil.rmtree(self._workdir, ignore_errors=True)
            raise ServerError(f"could not run tritonserver: {exc}; reinstall with `{INSTALL_FIX}`.") from exc
        self._reader = threading.Thread(target=self._pump, args=(self._proc, self._log_handle),
                                        name="tritonserver-log", daemon=True)
        self._reader.start()

    def restart(self, should_stop: Callable[[], bool] = lambda: False, timeout: float | None = None) -> bool:
        """Start tritonserver again after it stopped by itself; the front door and its ports stay up.

        The supervisor's last resort (Triton 2.51's python backend can abort the whole server when a stub dies
        holding a shared-memory lock). The dead server's stubs and shared memory are removed first; the new one
        binds the same internal ports and loads the same (verified) repository. Returns True once it is ready,
        False when `should_stop` turned true (a stop began) or it was not ready within `timeout` seconds.
        """
        with self._life_lock:
            old = self._proc
            if self._stopped or old is None or old.poll() is None:
                return False
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(old.pid, signal.SIGKILL)   # stubs that outlived it
            old.wait()
            self._join_reader(2.0)
            if old.stdout is not None:
                old.stdout.close()
            self._remove_shm()
            if self.verify:
                verify_repository(self.repository)
            self._launch("a")
            proc = self._proc
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while not should_stop() and time.monotonic() < deadline and proc.poll() is None:
            if self._get_ok(f"{self.admin_url}/v2/health/ready") and self._get_ok(self.url("metrics")):
                return True
            time.sleep(0.1)
        return False

    def exit_cause(self) -> str:
        """Why the server process stopped: `killed by signal 6 (SIGABRT): terminate called after ...`."""
        code = self._proc.poll() if self._proc is not None else None
        self._join_reader(1.0)
        reason = _failure_reason(self.log_tail(LOG_TAIL_LINES), self._port_flags(), self._backend_dir)
        return describe_exit(code) + ("" if reason == "no error line found in the log" else f": {reason}")

    def _pump(self, proc: subprocess.Popen[bytes], handle: IO[str]) -> None:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                with self._tail_lock:
                    self._tail.append(line)
                handle.write(line + "\n")
                handle.flush()
                if self._stream is not None:
                    with contextlib.suppress(ValueError, OSError):  # the stream may be closed under us
                        self._stream.write(line + "\n")
                        self._stream.flush()
        finally:
            handle.close()

    def _failure_message(self, headline: str) -> str:
        self._join_reader(2.0)
        lines = self.log_tail(LOG_TAIL_LINES)
        if self._log_path is not None and self._log_path.is_file():
            # The reason can sit far above the tail (a model table and option dump follow it).
            with contextlib.suppress(OSError):
                lines = self._log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20000:]
        reason = _failure_reason(lines, self._port_flags(), self._backend_dir)
        tail = self.log_tail()
        shown = "\n".join(tail) if tail else "(no output)"
        return f"{headline}: {reason}\n--- last {len(tail)} lines of {self._log_path} ---\n{shown}"

    def wait_ready(self, timeout: float | None = None, interval: float = 0.2) -> None:
        """Poll ``/v2/health/ready`` until the server (and, strictly, every model) is ready.

        Raises:
            ServerError: the process exited first (the message carries the reason and the log
                tail), or it was not ready within ``timeout`` seconds.
        """
        if self._proc is None:
            raise ServerError("the server was not started; call start() first.")
        timeout = self.ready_timeout if timeout is None else timeout
        url = f"{self.admin_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(self._failure_message(
                    f"tritonserver stopped ({describe_exit(code)}) before it was ready"))
            # Triton binds the metrics port after HTTP is up and exits if that fails: wait for both.
            if self._get_ok(url) and self._get_ok(self.url("metrics")) and self._proc.poll() is None:
                break
            if time.monotonic() > deadline:
                raise ServerError(self._failure_message(f"tritonserver was not ready at {url} after {timeout:g} s"))
            time.sleep(interval)
        if self.front_door_enabled and self.front_door is None:
            self._start_front_door(deadline)
        if self.supervise and self.supervisor is None:
            from recserve.supervisor import Supervisor

            self.supervisor = Supervisor(self.repository, self.admin_url, self._server_pid,
                                         self.front_door.set_state if self.front_door else (lambda state: None),
                                         self.admin_headers, restart_server=self.restart,
                                         exit_cause=self.exit_cause, max_restarts=self.max_restarts,
                                         on_swap=self._reload_contract,
                                         before_swap=lambda pin: self._reload_contract(pin=pin, split=False),
                                         grpc_url=self.admin_grpc_url, grpc_headers=self.admin_grpc_headers)
            self.supervisor.start()
        elif self.front_door is not None:
            self.front_door.set_state("ready")

    def _reload_contract(self, pin: int | None = None, split: bool = True) -> None:
        """After a version switch the front door checks requests against the new configs and applies the
        manifest's A/B split; while a split starts or ends (`split=False`), every request to `recommend` goes to
        version `pin` (or, `None`, the newest loaded one), never to an arm not loaded yet or any more."""
        if self.front_door is not None:
            from recserve.serving.frontdoor import contract

            self.front_door.reload(contract(self.repository, pin=pin, split=split))

    def _server_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start_front_door(self, deadline: float) -> None:
        from recserve.serving.frontdoor import FrontDoor, contract

        assert self._workdir is not None
        self.front_door = FrontDoor(self._workdir / "frontdoor", self.host, self.http_port, self.triton_http_port,
                                    contract(self.repository), access_log=self.access_log,
                                    grpc=(self.grpc_port, self.triton_grpc_port),
                                    grpc_statistics="statistics" not in self.restricted.split(","))
        nginx_log = open(self._workdir / "nginx.log", "w")  # noqa: SIM115 - nginx holds it until it exits
        try:
            proc = self.front_door.start(nginx_log, preexec_fn=_die_with_parent(signal.SIGTERM))
        finally:
            nginx_log.close()
        while not os.path.exists(self.front_door.control) or not self.front_door.set_state("starting"):
            if proc.poll() is not None:
                text = (self._workdir / "nginx.log").read_text(errors="replace").strip().splitlines()
                raise ServerError(f"the front door (nginx) stopped ({describe_exit(proc.returncode)}): "
                                  f"{text[-1] if text else 'no output'}")
            if time.monotonic() > deadline:
                raise ServerError("the front door (nginx) did not start in time; see " f"{self._workdir / 'nginx.log'}")
            time.sleep(0.05)

    @staticmethod
    def _get_ok(url: str) -> bool:
        try:
            return requests.get(url, timeout=1.0).status_code == 200
        except requests.RequestException:
            return False

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    def _signal(self, sig: signal.Signals, wait: float) -> bool:
        assert self._proc is not None
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(wait)
        return self._proc.poll() is not None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server: SIGINT (graceful), then SIGTERM, then SIGKILL; always reaps it.

        Args:
            timeout: seconds to wait after SIGINT; SIGTERM then gets 5 s before SIGKILL.

        Returns:
            The exit code, or ``None`` if the server was never started.
        """
        if self._proc is None:
            return None
        if self._stopped:
            return self._proc.returncode
        self._stopped = True          # from here on the supervisor restarts nothing
        if self.supervisor is not None:
            self.supervisor.stop()
        with self._life_lock:
            proc = self._proc
        try:
            if self.front_door is not None:
                # readiness 503 first, then close the listener and finish the requests in flight
                self.front_door.set_state("draining: the server is stopping")
                self.front_door.quit(self.drain_timeout)
            if not self._signal(signal.SIGINT, timeout):
                self._signal(signal.SIGTERM, 5.0)
        finally:
            # Also reached on a second Ctrl-C while waiting. Python-backend stubs share the
            # server's process group; after a crash one can outlive the server.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if self.front_door is not None and self.front_door.proc is not None and self.front_door.proc.poll() is None:
                self.front_door.proc.kill()
                self.front_door.proc.wait()
            self.leaked_shm = self._remove_shm()
        self._join_reader(5.0)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._workdir is not None:
            # After a failure the temporary log outlives stop(): the error message points at it.
            log_inside = self._log_path is not None and self._log_path.is_relative_to(self._workdir)
            failed = proc.returncode not in (0, -signal.SIGINT)
            if log_inside and failed:
                for sub in ("backends", "frontdoor"):
                    shutil.rmtree(self._workdir / sub, ignore_errors=True)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
        return proc.returncode

    def _remove_shm(self) -> list[str]:
        """Remove this server's python-backend shared-memory regions; returns the names it had left behind."""
        left = sorted(p.name for p in SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []
        for name in left:
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink()
        return left

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    repository: str | os.PathLike[str],
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    log_verbose: int = 0,
    extra_args: Iterable[str] = (),
    model_control_mode: str = "explicit",
    ready_timeout: float = 120.0,
    stream_log: bool = True,
    verify: bool = True,
    front_door: bool | None = None,
    drain_timeout: float = 5.0,
    access_log: str | os.PathLike[str] | None = None,
    max_restarts: int = 3,
) -> int:
    """Run Triton in the foreground until Ctrl-C or SIGTERM (the ``recserve serve`` command).

    The server log streams to stderr when ``stream_log`` is true; one line on stdout says
    where the endpoints are once every model is ready.

    Returns:
        The server's exit code after a clean stop.

    Raises:
        ServerError: the server failed to start, or died while serving.
    """
    server = TritonServer(
        repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        host=host,
        log_verbose=log_verbose,
        log_file=sys.stderr if stream_log else None,
        extra_args=extra_args,
        model_control_mode=model_control_mode,
        ready_timeout=ready_timeout,
        verify=verify,
        front_door=front_door,
        drain_timeout=drain_timeout,
        access_log=access_log,
        max_restarts=max_restarts,
    )

    def _on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        with server:
            door = " (front door)" if server.front_door is not None else ""
            print(
                f"Triton ready: HTTP {server.url('http')}{door}, gRPC {server.url('grpc')}, "
                f"metrics {server.url('metrics')}",
                flush=True,
            )
            nginx = server.front_door.proc if server.front_door is not None else None
            sup = server.supervisor
            # a tritonserver that stopped by itself is started again by the supervisor, up to max_restarts
            while (server.is_alive or (sup is not None and sup.will_restart())) and \
                    (nginx is None or nginx.poll() is None):
                time.sleep(0.5)
            if not server.is_alive:
                code = server.process.returncode  # type: ignore[union-attr]
                if sup is not None:
                    sup.join(5.0)        # it decides, and says, that it will not restart the server
                gave_up = f" and was {sup.gave_up}" if sup is not None and sup.gave_up else ""
                raise ServerError(server._failure_message(
                    f"tritonserver stopped ({describe_exit(code)}) while serving{gave_up}"))
            raise ServerError(f"the front door (nginx) stopped ({describe_exit(nginx.returncode)}) while serving; "
                              "stopping Triton")
    except KeyboardInterrupt:
        print("Triton stopped.", file=sys.stderr, flush=True)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    code = server.stop()  # already stopped by the context manager; this only reads the exit code
    return 0 if code in (None, 0, -signal.SIGINT) else code
