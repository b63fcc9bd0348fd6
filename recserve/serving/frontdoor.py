"""The front door: nginx in front of Triton's HTTP port, so that no request reaches Triton unchecked.

Measured on Triton 2.51 with nothing in front (README "Reliability"): a 400 KB body of nested brackets kills
the server, a 169-byte request declaring shape [1e9, 1] costs 7.6 GB and 16 s, malformed JSON gets 500, and
the admin APIs (shared memory, logging, statistics, model control) answer anyone. nginx is what the field puts
in front of such a server; with lua-nginx-module it checks each inference body against the serving spec
(`frontdoor.lua`) in microseconds, in C and LuaJIT, before the body is forwarded:

- only the public models' inference, metadata and config, health and server metadata are routed; every other
  path gets 403 (Triton's admin APIs also need a key: `recserve.server`);
- a body larger than its model's largest valid request is refused before it is read (413);
- names, datatypes, shapes against data, batch sizes and integer ranges are checked (400 naming the field);
- at most `max_inflight` requests are in flight; the rest get 503 at once (Triton's queues shed the rest);
- `/v2/health/ready` answers 503, and gRPC ServerReady UNAVAILABLE, while the supervisor restores a model or
  the server drains (shared state set through a unix socket only the server's owner can reach).

gRPC goes through nginx too (HTTP/2, `grpc_pass`): only the inference, health and metadata methods are routed
(PERMISSION_DENIED otherwise), bodies are bounded by the largest valid request, requests in flight are bounded
like HTTP's (UNAVAILABLE beyond), and Triton's protobuf frontend checks sizes against shapes. gRPC carries the
model name inside the message, so every model's inference is reachable there; each model checks its inputs.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from recserve.errors import ServerError
from recserve.serving import spec

__all__ = ["contract", "find_nginx", "nginx_conf", "FrontDoor", "PUBLIC_MODELS", "INSTALL_FIX"]

INSTALL_FIX = "apt-get install nginx-light libnginx-mod-http-lua lua-cjson"
MODULES = Path("/usr/lib/nginx/modules")
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
# The request path and what the client's pipeline mode and titles need; item_tower stays internal.
PUBLIC_MODELS = (spec.ENSEMBLE, "retrieval", "ranker", "catalogue")
# A JSON number in a data list takes at most this many bytes (a float32 printed in full, and a comma).
JSON_BYTES_PER_VALUE = 26
# Requests in flight past the front door, per protocol: two `recommend` instances x a formed batch of 16 keep the
# batcher full, and the benchmarks' closed loops run up to 32; more only queue (latency = in flight / throughput:
# 64 at ~1,300 req/s is ~50 ms; measured at 1,024 connections: loadtest/bench_overload.py).
MAX_INFLIGHT = 64
CJSON_DIRS = ("/usr/lib/x86_64-linux-gnu/lua/5.1", "/usr/lib/aarch64-linux-gnu/lua/5.1", "/usr/local/lib/lua/5.1")


RELOAD_S = 0.3   # what a reload is given before the next step relies on it


def contract(repository: Path, pin: int | None = None, split: bool = True) -> dict:
    """What the front door accepts: the public models' inputs, outputs and batch sizes, read back from the
    repository's own config.pbtxt files (what Triton enforces), so the two cannot disagree.

    With the manifest's A/B split (`recserve ab`), requests to `recommend` naming no version are routed to the
    arms' versions; `pin`: every such request goes to that version instead (while a split starts or ends);
    `split=False`: no routing at all (Triton then serves the newest loaded version)."""
    from recserve.serving.repository import parse

    models = {}
    for name in PUBLIC_MODELS:
        path = Path(repository) / name / "config.pbtxt"
        if not path.is_file():
            raise ServerError(f"{path} is missing: the repository does not serve {name}; rebuild it with "
                              "`recserve export repository`")
        cfg = parse(path.read_text())
        inputs, width = {}, 0
        for t in cfg.input:
            dims = [int(d) for d in t.dims]
            inputs[t.name] = {"dtype": model_dtype(t.data_type), "dims": dims, "optional": bool(t.optional),
                              "max_width": spec.MAX_WIDTH}
            n = 1
            for d in dims:
                n *= d if d > 0 else spec.MAX_WIDTH
            width += n
        batch = int(cfg.max_batch_size)
        models[name] = {"max_batch": batch, "inputs": inputs, "output_names": [o.name for o in cfg.output],
                        # the largest valid request in JSON, plus the request's own structure
                        "max_body": batch * width * JSON_BYTES_PER_VALUE + 4096}
    out: dict = {"models": models}
    manifest = Path(repository) / "manifest.json"
    ab = json.loads(manifest.read_text()).get("ab") if manifest.is_file() else None
    if pin is not None:
        out["ab"] = {"model": "recommend", "a": pin, "b": pin, "share": 0.0, "salt": ""}
    elif ab and split:         # `recserve ab start`: the split the front door applies (recserve/ab.py)
        out["ab"] = {k: ab[k] for k in ("model", "a", "b", "share", "salt")}
    return out


def model_dtype(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")


def find_nginx() -> Path:
    """The nginx binary, with the Lua module and cjson the front door needs; ServerError says how to install."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    missing = [] if binary else ["nginx"]
    missing += [m for m in LUA_MODULES if not (MODULES / m).is_file()]
    if not any(Path(p, "cjson.so").is_file() for p in CJSON_DIRS):
        missing.append("lua-cjson")
    if missing:
        raise ServerError(f"the front door needs {', '.join(missing)}: run `{INSTALL_FIX}` "
                          "(or `recserve serve --no-front-door` to expose Triton's own HTTP port, unprotected)")
    return Path(binary)  # type: ignore[arg-type]


GRPC_METHODS = ("ModelInfer", "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelConfig")


GRPC_ERRORS = (("g403", 7, "this method is not public on the front door"),
               ("g413", 8, "request too large for any served model"),
               ("g502", 14, "unavailable: the inference server is not answering (restarting, say); retry shortly"),
               ("g504", 4, "the inference server did not answer in time"),
               ("g503", 14, "overloaded: too many requests in flight; retry with backoff"))


def _grpc_error(name: str, code: int, message: str) -> str:
    return (f"    location @{name} {{ default_type application/grpc; add_header grpc-status {code} always; "
            f'add_header grpc-message "{message}" always; add_header content-length 0 always; return 204; }}\n')


def _grpc_server(listen: str, upstream_port: int, max_body: int, max_inflight: int, statistics: bool) -> str:
    methods = "|".join(GRPC_METHODS + (("ModelStatistics",) if statistics else ()))
    return rf"""
  upstream triton_grpc {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen {listen} http2 reuseport backlog=4096;
    limit_conn inflight_grpc {max_inflight};
    limit_conn_status 503;
    client_max_body_size {max_body // 1024 + 1}k;
    client_body_buffer_size {max_body // 1024 + 1}k;
    grpc_read_timeout 30s;
    location = /inference.GRPCInferenceService/ServerReady {{
      access_by_lua_block {{ frontdoor.grpc_ready() }}
      grpc_pass grpc://triton_grpc;
    }}
    location ~ ^/inference\.GRPCInferenceService/({methods})$ {{ grpc_pass grpc://triton_grpc; }}
    location / {{ return 403; }}
    # gRPC statuses in a trailers-only answer (nginx's documented pattern for gRPC error pages)
    error_page 403 = @g403;
    error_page 413 = @g413;
    error_page 502 = @g502;
    error_page 504 = @g504;
    error_page 503 = @g503;
{"".join(_grpc_error(name, code, message) for name, code, message in GRPC_ERRORS)}
  }}"""


def nginx_conf(workdir: Path, host: str, port: int, upstream_port: int, contract_: dict,
               max_inflight: int = MAX_INFLIGHT, user: str | None = None, access_log: Path | None = None,
               grpc: tuple[int, int] | None = None, grpc_statistics: bool = False) -> str:
    """The nginx configuration: one worker, per-model body limits, the Lua checks, JSON errors.

    `access_log`: one line per request, `status request_time_s upstream_time_s path` (buffered, flushed each
    second), for measuring what the front door answered and how fast; off by default."""
    lua_dir = Path(__file__).parent
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    per_model = []
    for name, c in contract_["models"].items():
        size = f"{c['max_body'] // 1024 + 1}k"
        per_model.append(f"""
    location ~ ^/v2/models/{name}(/versions/[0-9]+)?/infer$ {{
      limit_except POST {{ deny all; }}
      client_max_body_size {size};
      client_body_buffer_size {size};
      set $recserve_arm "";
      access_by_lua_block {{ frontdoor.infer("{name}") }}
      add_header recserve-arm $recserve_arm always;
      proxy_pass http://triton;
    }}""")
    temp = "\n  ".join(f"{k}_temp_path {workdir / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# Generated by recserve/serving/frontdoor.py for one `recserve serve`; do not edit.
{"".join(f"load_module {MODULES / m};" + chr(10) for m in LUA_MODULES)}{f"user {user};" if user else ""}
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
pid {workdir / "nginx.pid"};
error_log stderr error;
events {{ worker_connections 8192; }}
http {{
  log_format timing '$status $request_time $upstream_response_time $uri $msec';
  {f"access_log {access_log} timing buffer=256k flush=1s;" if access_log else "access_log off;"}
  server_tokens off;
  {temp}
  lua_package_path "{lua_dir}/?.lua;;";
  lua_shared_dict recserve 64k;
  init_by_lua_block {{
    frontdoor = require "frontdoor"
    frontdoor.init(require("cjson").decode([==[{json.dumps(contract_)}]==]))
  }}
  upstream triton {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  limit_conn_zone $server_port zone=inflight:1m;
  limit_conn_zone $server_port zone=inflight_grpc:1m;
  client_header_timeout 5s;
  client_body_timeout 5s;
  send_timeout 10s;
  keepalive_timeout 75s;
  keepalive_requests 100000;
  large_client_header_buffers 4 8k;
  client_max_body_size 1k;
  default_type application/json;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_read_timeout 30s;
  proxy_buffering on;

  server {{
    listen {listen} reuseport backlog=4096;
    limit_conn inflight {max_inflight};
    limit_conn_status 503;
    # nginx's own errors as JSON, like Triton's
    error_page 400 = @e400;
    error_page 403 = @e403;
    error_page 404 = @e404;
    error_page 405 = @e405;
    error_page 408 = @e408;
    error_page 413 = @e413;
    error_page 414 431 494 = @e414;
    error_page 502 = @e502;
    error_page 504 = @e504;
    error_page 503 = @e503;

    location = /v2 {{ limit_except GET {{ deny all; }} proxy_pass http://triton; }}
    location = /v2/health/live {{ limit_except GET {{ deny all; }} proxy_pass http://triton; }}
    location = /v2/health/ready {{
      limit_except GET {{ deny all; }}
      access_by_lua_block {{ frontdoor.ready() }}
      proxy_pass http://triton;
      error_page 502 504 = @notready;     # Triton down (restarting, say): not ready, not a gateway error
    }}{"".join(per_model)}
    location ~ ^/v2/models/([A-Za-z0-9_.-]+)(/versions/[0-9]+)?(/ready|/config)?$ {{
      limit_except GET {{ deny all; }}
      access_by_lua_block {{ frontdoor.public(ngx.var[1]) }}
      proxy_pass http://triton;
    }}
    location ~ ^/v2/models/([A-Za-z0-9_.-]+)(/versions/[0-9]+)?/infer$ {{
      content_by_lua_block {{ frontdoor.public(ngx.var[1]) }}
    }}
    location / {{
      access_by_lua_block {{
        frontdoor.reject(403, "this path is not public: the front door serves inference, metadata and config of "
          .. CONTRACT.public .. ", and /v2/health")
      }}
    }}
    location @e400 {{ return 400 '{{"error":"bad request"}}'; }}
    location @e403 {{ return 403 '{{"error":"forbidden: this method or path is not public"}}'; }}
    location @e404 {{ return 404 '{{"error":"not found"}}'; }}
    location @e405 {{ return 405 '{{"error":"method not allowed"}}'; }}
    location @e408 {{ return 408 '{{"error":"the request was not sent in time"}}'; }}
    location @e413 {{ return 413 '{{"error":"request body too large for this model"}}'; }}
    location @e414 {{ return 414 '{{"error":"request line or headers too large"}}'; }}
    location @notready {{ return 503 '{{"error":"not ready: the inference server is not answering"}}'; }}
    # Triton down (between a crash and its restart): a 503 clients retry, not a gateway error
    location @e502 {{
      add_header Retry-After 1 always;
      return 503 '{{"error":"unavailable: the inference server is not answering (restarting, say); retry shortly"}}';
    }}
    location @e504 {{ return 504 '{{"error":"the inference server did not answer in time"}}'; }}
    location @e503 {{
      add_header Retry-After 1 always;
      return 503 '{{"error":"overloaded: too many requests in flight; retry with backoff"}}';
    }}
  }}

{_grpc_server(f"[{host}]:{grpc[0]}" if ":" in host else f"{host}:{grpc[0]}", grpc[1],
              max(c["max_body"] for c in contract_["models"].values()), max_inflight, grpc_statistics)
 if grpc else ""}
  server {{
    listen unix:{workdir / "control.sock"};
    location = /state {{ content_by_lua_block {{ frontdoor.set_state() }} }}
  }}
}}
"""


def access_log_times(log: Path, offset: int = 0, infer_only: bool = False, since: float = 0.0,
                     until: float = float("inf")) -> dict[int, dict[str, float]]:
    """{status: {count, p50_ms, p99_ms, max_ms}} of the front door's own request times (`nginx_conf`'s `timing`
    format: status, seconds, upstream seconds, path, time at the end in epoch seconds), from byte `offset` of the
    access log on; `since` / `until`: only requests that ended in that window (epoch seconds, `time.time()`)."""
    import numpy as np

    times: dict[int, list[float]] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].isdigit() and (not infer_only or parts[3].endswith("/infer")):
                if len(parts) >= 5 and not since <= float(parts[4]) <= until:
                    continue
                times.setdefault(int(parts[0]), []).append(float(parts[1]) * 1000)
    return {s: {"count": len(v), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                "max_ms": float(np.max(v))} for s, v in sorted(times.items())}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 2.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class FrontDoor:
    """One nginx master (and its worker) for one Triton server. The caller owns the process lifetime."""

    def __init__(self, workdir: Path, host: str, port: int, upstream_port: int, contract_: dict,
                 max_inflight: int = MAX_INFLIGHT, access_log: Path | None = None,
                 grpc: tuple[int, int] | None = None, grpc_statistics: bool = False):
        self.workdir = Path(workdir)
        self.grpc, self.grpc_statistics = grpc, grpc_statistics
        self.access_log = access_log
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.contract = contract_
        self.max_inflight = max_inflight
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def control(self) -> str:
        return str(self.workdir / "control.sock")

    def start(self, stdout, preexec_fn=None) -> subprocess.Popen[bytes]:
        binary = find_nginx()
        self.workdir.mkdir(parents=True, exist_ok=True)
        user = None
        if os.geteuid() == 0:      # workers drop root; they read the Lua files and their temp dirs
            user = "nobody nogroup"
            os.chmod(self.workdir, 0o711)
            os.chmod(self.workdir.parent, 0o711)
        conf = self.workdir / "nginx.conf"
        if self.access_log is not None and user:
            Path(self.access_log).touch()
            os.chmod(self.access_log, 0o666)   # the worker (nobody) writes it
        conf.write_text(nginx_conf(self.workdir, self.host, self.port, self.upstream_port, self.contract,
                                   self.max_inflight, user, self.access_log, self.grpc, self.grpc_statistics))
        test = subprocess.run([str(binary), "-t", "-q", "-p", str(self.workdir), "-c", str(conf)],
                              capture_output=True, text=True)
        if test.returncode != 0:
            raise ServerError(f"the front door's nginx configuration was refused: {test.stderr.strip()[-400:]}")
        self.proc = subprocess.Popen([str(binary), "-p", str(self.workdir), "-c", str(conf)],
                                     stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_fn)
        return self.proc

    def reload(self, contract_: dict) -> None:
        """A new contract (a new model version's configs): rewrite the configuration, nginx reloads it (SIGHUP;
        its workers finish what they serve; the readiness state lives in shared memory and stays)."""
        import signal

        if contract_ == self.contract or self.proc is None or self.proc.poll() is not None:
            return
        self.contract = contract_
        user = "nobody nogroup" if os.geteuid() == 0 else None
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_conf(self.workdir, self.host, self.port, self.upstream_port, self.contract,
                                   self.max_inflight, user, self.access_log, self.grpc, self.grpc_statistics))
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(RELOAD_S)       # the new worker starts; the old one finishes its requests and goes

    def set_state(self, state: str) -> bool:
        """`ready`, or why not (`restoring ranker: ...`, `draining`); False when nginx did not take it."""
        try:
            conn = _UnixConnection(self.control)
            conn.request("POST", "/state", body=state.encode())
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def quit(self, timeout: float) -> int | None:
        """Graceful stop: close the listener, finish the requests in flight, exit (SIGQUIT), then SIGKILL."""
        import signal

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
