"""The load-test and container files: they import, parse and name the right tensors, without a server.

Importing locust monkey-patches the whole process with gevent, so everything that imports the
locustfile runs in a child interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LOADTEST = ROOT / "loadtest"
DOCKER = ROOT / "docker"
LOCUSTFILE = LOADTEST / "locustfile.py"
# NGC release -> Triton version (https://docs.nvidia.com/deeplearning/triton-inference-server/release-notes/).
TRITON_OF_NGC = {"24.10": "2.51.0"}


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _child(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (locust patches the process); it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def users_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("users") / "user_features.npz"
    rng = np.random.default_rng(0)
    np.savez(path, user_ids=np.array([3, 5, 8, 13, 21], np.int64), user_cats=rng.integers(0, 4, (5, 3)),
             history=rng.integers(0, 50, (5, 20)))
    return path


# -- locustfile ------------------------------------------------------------------------------------

PRELUDE = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("recserve_locustfile", {str(LOCUSTFILE)!r})
lf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lf)
from locust import User
from locust.argument_parser import parse_options
"""


def test_locustfile_defines_triton_user_and_registers_options(users_npz):
    out = _child(PRELUDE + textwrap.dedent(f"""
        opts = parse_options(args=["-f", {str(LOCUSTFILE)!r}, "--protocol", "http", "--k", "5",
                                   "--users-from", {str(users_npz)!r}])
        print(json.dumps({{
            "is_user": issubclass(lf.TritonUser, User), "abstract": lf.TritonUser.abstract,
            "protocol": opts.protocol, "mode": opts.mode, "k": opts.k, "users_from": opts.users_from,
            "timeout": opts.request_timeout, "think": opts.think_time, "ids": list(lf.load_user_ids(opts.users_from)),
        }}))
    """), RECSERVE_MODE="pipeline")
    assert out["is_user"] and not out["abstract"]
    assert (out["protocol"], out["mode"], out["k"]) == ("http", "pipeline", 5)  # mode from RECSERVE_MODE
    assert out["users_from"] == str(users_npz)
    assert (out["timeout"], out["think"]) == (10.0, 0.0)
    assert out["ids"] == [3, 5, 8, 13, 21]


def test_triton_user_fires_one_request_event_per_call(users_npz, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("7\n9\n")
    out = _child(PRELUDE + textwrap.dedent(f"""
        from locust.env import Environment
        from recserve.client import Recommendation, RecommendedItem
        from recserve.errors import UnknownUserError

        class FakeClient:
            def __init__(self, url, protocol, timeout):
                self.args = (url, protocol, timeout)
            def k_max(self):
                return 500
            def recommend(self, user, k, hour, weekday, mode):
                if user == 9:
                    raise UnknownUserError("unknown user_id 9")
                return Recommendation(user, mode, [RecommendedItem(i, 1.0, "t") for i in range(k)])
            def close(self):
                pass

        opts = parse_options(args=["-f", {str(LOCUSTFILE)!r}, "--mode", "pipeline", "--k", "3",
                                   "--user-ids-file", {str(ids_file)!r}])
        env = Environment(user_classes=[lf.TritonUser], parsed_options=opts)
        events = []
        env.events.request.add_listener(lambda **kw: events.append(kw))
        lf.TritonUser.host = "http://127.0.0.1:8001/"
        lf.TritonUser.client_factory = FakeClient
        user = lf.TritonUser(env)
        user.on_start()
        for _ in range(40):
            user.recommend()
        errors = {{}}
        for bad in (dict(users_from="/nonexistent.npz"), dict(user_ids_file="/nonexistent.txt"), dict()):
            try:
                lf.load_user_ids(**bad)
            except ValueError as exc:
                errors[str(sorted(bad))] = str(exc)
        print(json.dumps({{
            "client_args": user.client.args,
            "events": [{{k: (repr(v) if k == "exception" and v is not None else v)
                        for k, v in e.items() if k in ("request_type", "name", "response_length", "exception")}}
                       for e in events],
            "times": [e["response_time"] for e in events],
            "errors": errors,
        }}))
    """))
    assert out["client_args"] == ["127.0.0.1:8001", "grpc", 10.0]  # scheme and slash stripped
    events = out["events"]
    assert len(events) == 40
    assert {(e["request_type"], e["name"]) for e in events} == {("grpc", "recommend[pipeline]")}
    good = [e for e in events if e["exception"] is None]
    bad = [e for e in events if e["exception"] is not None]
    assert good and bad, "both ids are drawn in 40 requests"
    assert {e["response_length"] for e in good} == {3}
    assert all("UnknownUserError" in e["exception"] and e["response_length"] == 0 for e in bad)
    assert all(t >= 0 for t in out["times"])
    assert len(out["errors"]) == 3 and "--users-from" in out["errors"]["[]"]


def test_locust_command_line_knows_the_recserve_options():
    """Through locust's own CLI: the locustfile is loaded and --protocol validated before anything starts."""
    locust = Path(sys.executable).parent / "locust"
    if not locust.is_file():
        pytest.skip("the locust command is not installed next to this interpreter (pip install -e '.[loadtest]')")
    proc = subprocess.run([str(locust), "-f", str(LOCUSTFILE), "--protocol", "bogus"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "argument --protocol: invalid choice: 'bogus'" in proc.stderr, proc.stderr[-2000:]


# -- perf_analyzer input -----------------------------------------------------------------------------

def test_make_perf_input_writes_recommend_requests_from_real_users(users_npz, tmp_path):
    mpi = _import(LOADTEST / "make_perf_input.py", "recserve_make_perf_input")
    out = tmp_path / "perf.json"
    assert mpi.main(["--users-from", str(users_npz), "--out", str(out), "--n", "64", "--k", "7"]) == 0
    data = json.loads(out.read_text())["data"]
    assert len(data) == 64
    from recserve.serving import spec

    expected = {t.name: list(t.dims) for t in spec.REQUEST}     # the served request, as the spec defines it
    assert set(expected) == {"user_id", "k", "hour", "weekday"}
    for request in data:
        assert set(request) == set(expected)
        for name, dims in expected.items():
            assert request[name]["shape"] == dims == [1]
            assert len(request[name]["content"]) == 1 and isinstance(request[name]["content"][0], int)
        assert request["user_id"]["content"][0] in {3, 5, 8, 13, 21}
        assert request["k"]["content"] == [7]
        assert 0 <= request["hour"]["content"][0] <= 23 and 0 <= request["weekday"]["content"][0] <= 6
    assert len({r["user_id"]["content"][0] for r in data}) > 1


def test_make_perf_input_refuses_models_it_cannot_feed(tmp_path):
    mpi = _import(LOADTEST / "make_perf_input.py", "recserve_make_perf_input")
    assert mpi.build({"user_ids": np.array([4])}, model="retrieval", n=2)["data"][0]["user_id"]["content"] == [4]
    with pytest.raises(ValueError, match="ranker"):
        mpi.build({"user_ids": np.array([1])}, model="ranker")
    with pytest.raises(SystemExit):
        mpi.main(["--user-ids-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.json")])


# -- perf_analyzer.sh --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bash() -> str:
    found = shutil.which("bash")
    if found is None:
        pytest.skip("bash is not installed")
    return found


def test_perf_analyzer_script_parses_and_refuses_remote_hosts(bash):
    script = LOADTEST / "perf_analyzer.sh"
    assert os.access(script, os.X_OK), "perf_analyzer.sh must be executable"
    assert subprocess.run([bash, "-n", str(script)], capture_output=True).returncode == 0
    help_ = subprocess.run([bash, str(script), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "libb64-0d" in help_.stdout and "nvidia-cuda-runtime-cu12" in help_.stdout
    remote = subprocess.run([bash, str(script), "--url", "10.1.2.3:8001", "--csv", "/tmp/x.csv"],
                            capture_output=True, text=True)
    assert remote.returncode == 2 and "only a local server" in remote.stderr
    text = script.read_text()
    for flag in ("-i grpc", "--input-data", "--concurrency-range", "--measurement-interval", '-f "$CSV"'):
        assert flag in text


# -- bench_serving -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    return _import(LOADTEST / "bench_serving.py", "recserve_bench_serving")


def test_server_memory_sums_the_process_and_its_children(bench):
    code = "import subprocess, time; c = [subprocess.Popen(['sleep', '30']) for _ in range(2)]; time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 20
        while (m := bench.tree_memory(parent.pid))["processes"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        alone = bench.tree_memory(os.getpid())
        assert m["processes"] == 3 and alone["processes"] >= 1
        assert 0 < m["pss_mb"] <= m["rss_mb"]
    finally:
        import signal

        os.killpg(parent.pid, signal.SIGKILL)       # the sleeps too
        parent.wait()


def test_closed_loop_counts_latencies_and_errors(bench):
    import time

    def make():
        def call(user: int, hour: int, weekday: int) -> int:
            time.sleep(0.002)
            if user == 2:
                raise RuntimeError("boom")
            return 10
        return call

    cell = bench.closed_loop(make, [(1, 0, 0), (2, 5, 1)], concurrency=2, duration=0.4, warmup=0.1)
    assert cell.requests > 10 and cell.errors > 10
    assert cell.first_error == "RuntimeError: boom"
    assert 2.0 <= cell.p50_ms <= cell.p90_ms <= cell.p99_ms
    assert 0 < cell.rps < 2 / 0.002
    cell.path, cell.precision = "pipeline/grpc", "fp32"
    table = bench.markdown([cell])
    assert "| path | precision | load generator | concurrency | req/s |" in table and "boom" in table


def test_stats_delta_gives_the_average_formed_batch_and_the_split_of_the_time(bench):
    zero = {"inference_count": 0, "execution_count": 0, "success": 0,
            **{f"{key}_ns": 0 for key in bench.STAT_KEYS}}
    before = {"ranker": dict(zero, inference_count=10, execution_count=10, success=10), "item_tower": dict(zero)}
    after = {"ranker": dict(zero, inference_count=110, execution_count=35, success=110, success_ns=500_000_000,
                            queue_ns=100_000_000, compute_input_ns=10_000_000, compute_infer_ns=200_000_000,
                            compute_output_ns=30_000_000),
             "item_tower": dict(zero)}
    delta = bench.stats_delta(before, after)
    assert list(delta) == ["ranker"]  # models without traffic are left out
    d = delta["ranker"]
    assert d["avg_batch"] == pytest.approx(4.0) and d["inferences"] == 100
    assert (d["request_us"], d["queue_us"]) == (pytest.approx(5000.0), pytest.approx(1000.0))
    assert (d["compute_input_us"], d["compute_infer_us"], d["compute_output_us"]) == (
        pytest.approx(100.0), pytest.approx(2000.0), pytest.approx(300.0))


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8000
  1 threads and 8 connections
Requests/sec:   1234.50
WRK_JSON {"requests":12400,"duration_s":10.004,"bytes":999,"non2xx":3,"connect_errors":0,"read_errors":1,\
"write_errors":0,"timeouts":2,"p50_ms":5.25,"p90_ms":8.5,"p99_ms":20.125,"mean_ms":6.0,"max_ms":40.0}
"""


def test_parse_wrk_line_and_cell(bench):
    stats = bench.parse_wrk(WRK_OUTPUT)
    assert stats["requests"] == 12400 and stats["p99_ms"] == 20.125
    cell = bench.wrk_cell(stats)
    assert cell.requests == 12397 and cell.errors == 6  # non-2xx, read errors and timeouts
    assert cell.rps == pytest.approx(12397 / 10.004)
    assert (cell.p50_ms, cell.p90_ms, cell.p99_ms, cell.mean_ms) == (5.25, 8.5, 20.125, 6.0)
    assert "non2xx=3" in cell.first_error and "timeouts=2" in cell.first_error
    nothing = bench.wrk_cell(dict(stats, requests=0, non2xx=0, timeouts=0, read_errors=0))
    assert nothing.requests == 0 and nothing.rps == 0 and nothing.p50_ms != nothing.p50_ms  # NaN, not 0 ms
    with pytest.raises(ValueError, match="no WRK_JSON line.*unable to connect"):
        bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_command_stays_local_and_uses_the_script(bench, tmp_path):
    command = bench.wrk_command("/usr/bin/wrk", "http://127.0.0.1:8000", 8, 9.6, tmp_path / "u.txt", 10, threads=4)
    assert command[:4] == ["/usr/bin/wrk", "-t4", "-c8", "-d10s"]
    assert command[command.index("-s") + 1] == str(LOADTEST / "wrk_recommend.lua")
    assert command[-4:] == ["http://127.0.0.1:8000", "--", str(tmp_path / "u.txt"), "10"]
    assert bench.wrk_command("wrk", "http://127.0.0.1:1", 1, 0.2, tmp_path, 5, threads=2)[1:4] == ["-t1", "-c1", "-d1s"]


PERF_CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
4,397.229,6,3248,2,137,5826,794,3,9254,14564,16782,20310
"""
PERF_STDOUT = """Request concurrency: 4
  Client:
    Request count: 1434
    Throughput: 397.229 infer/sec
    Avg latency: 10019 usec (standard deviation 3318 usec)
"""


def test_parse_perf_analyzer_csv_and_console(bench, tmp_path):
    rows = bench.parse_perf_csv(PERF_CSV)
    row = rows[4]
    assert row["rps"] == pytest.approx(397.229)
    assert (row["p50_ms"], row["p99_ms"]) == (pytest.approx(9.254), pytest.approx(20.31))
    assert row["mean_ms"] == pytest.approx(10.016)  # the sum of the components (no "Avg latency" column in 2.50)
    assert row["server_compute_infer_us"] == 5826
    assert bench.parse_perf_stdout(PERF_STDOUT) == {"requests": 1434, "rps": pytest.approx(397.229)}
    cell = bench.perf_cell(PERF_STDOUT, PERF_CSV, 4, 3.0)
    assert (cell.requests, cell.errors, cell.generator) == (1434, 0, "perf_analyzer")
    assert cell.seconds == pytest.approx(1434 / 397.229)
    with pytest.raises(ValueError, match="concurrency 8"):
        bench.perf_cell(PERF_STDOUT, PERF_CSV, 8, 3.0)
    command = bench.perf_analyzer_command("pa", "127.0.0.1:8001", tmp_path / "in.json", 8, 9.0, tmp_path / "o.csv")
    joined = " ".join(command)
    for flag in ("-m recommend", "-u 127.0.0.1:8001", "-i grpc", "--concurrency-range 8:8",
                 "--measurement-interval 3000", "--max-trials 3", f"-f {tmp_path / 'o.csv'}"):
        assert flag in joined


def _cell(bench, path, precision, c, rps, p50, p99, errors=0):
    return bench.Cell(path=path, precision=precision, concurrency=c, requests=100, errors=errors, rps=rps,
                      p50_ms=p50, p99_ms=p99)


def test_ratios_are_computed_from_the_cells(bench):
    rows = [("fastapi/http", "fp32", 1, 400, 2.0, 4.0), ("fastapi/http", "fp32", 8, 500, 15, 30),
            ("ensemble/grpc", "fp32", 1, 300, 2.2, 4.0), ("ensemble/grpc", "fp32", 8, 700, 11, 40),
            ("ensemble/http", "fp32", 1, 300, 3.0, 5.0), ("ensemble/http", "fp32", 8, 600, 12, 60)]
    cells = [_cell(bench, *row) for row in rows] + [_cell(bench, "ensemble/grpc", "int8", 8, 1000, 8, 20, errors=2)]
    checks = {r["check"]: r for r in bench.ratios(cells)}
    grpc8 = checks["fp32 c=8 req/s ensemble/grpc / fastapi/http"]
    assert grpc8["value"] == pytest.approx(1.4) and grpc8["passed"] is True
    assert (grpc8["numerator"], grpc8["denominator"]) == (700, 500)
    assert checks["fp32 c=8 req/s ensemble/http / fastapi/http"]["passed"] is False  # 1.2 < 1.25
    assert checks["fp32 c=8 p99 ms ensemble/http"]["passed"] is False  # 60 ms > 50
    assert checks["fp32 c=1 p50 ensemble/grpc / fastapi/http"]["value"] == pytest.approx(1.1)
    assert checks["fp32 c=1 p50 ensemble/http / fastapi/http"]["passed"] is False  # 1.5 > 1.2
    int8 = checks["c=8 req/s ensemble/grpc int8 / fp32"]
    assert int8["value"] == pytest.approx(1000 / 700) and int8["passed"] is False and "errors" in int8["note"]
    assert checks["int8 c=8 req/s ensemble/grpc / fastapi/http"]["passed"] is None  # no int8 FastAPI cell
    assert checks["c=8 req/s ensemble/http int8 / fp32"]["value"] is None


def test_markdown_and_json_report_every_part_and_json_has_no_nan(bench):
    cells = [_cell(bench, "ensemble/grpc", "fp32", 8, 700, 11, 40),
             bench.Cell(path="fastapi/http", precision="fp32", concurrency=8, errors=1, first_error="wrk: refused")]
    cells[0].generator = "perf_analyzer"
    cells[0].models = {"ranker": {"inferences": 10, "executions": 5, "avg_batch": 2.0, "request_us": 900.0,
                                  "queue_us": 100.0, "compute_input_us": 10.0, "compute_infer_us": 700.0,
                                  "compute_output_us": float("nan")}}
    checks = bench.ratios(cells)
    table = bench.markdown(cells, checks)
    assert "| ensemble/grpc | fp32 | perf_analyzer | 8 | 700.0 | 11.00 |" in table
    assert "other CPU % |" in table and "Warning: other processes" not in table
    assert "| ensemble/grpc | fp32 | 8 | ranker | 2.00 | 900 | 100 | 10 | 700 | - | 10 |" in table
    assert "| fp32 c=8 req/s ensemble/grpc / fastapi/http | - | >= 1.25 | n/a" in table
    assert "first error: wrk: refused" in table
    text = bench.report_json({"cpus": 2, "loadavg_before": [float("inf")]}, cells, checks)

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON")

    doc = json.loads(text, parse_constant=no_constants)
    assert set(doc) == {"env", "targets", "cells", "ratios"}
    assert doc["cells"][1]["p50_ms"] is None and doc["env"]["loadavg_before"] == [None]
    assert doc["cells"][0]["models"]["ranker"]["compute_output_us"] is None
    assert doc["targets"] == bench.TARGETS


def test_other_cpu_is_the_machine_minus_this_process_tree(bench):
    assert bench.parse_proc_stat("42 (my (odd) name) S 7 42 42 0 -1 4194560 1 0 0 0 30 12 5 3 20 0 1 0") == (42, 7, 50)
    assert bench.system_busy_ticks("cpu  100 5 50 9000 40 3 2 7 0 0\ncpu0 1 2 3\n") == 160
    procs = [(1, 0, 1000), (10, 1, 5), (11, 10, 7), (12, 11, 9), (20, 1, 400)]
    assert bench.tree_ticks(procs, 10) == 21  # 10, its child 11 and grandchild 12; not 20, not init
    meter = bench.OtherCpu()
    meter.start()
    share = meter.stop()
    assert share >= 0.0 or share != share  # a percentage, or NaN without /proc
    cell = _cell(bench, "fastapi/http", "fp32", 8, 500, 15, 30)
    cell.other_cpu_pct = 55.0
    warning = "Warning: other processes used more than 10 % of a core during fastapi/http fp32 c=8"
    assert warning in bench.markdown([cell])


def test_plot_writes_a_png(bench, tmp_path):
    pytest.importorskip("matplotlib")
    cells = [_cell(bench, "ensemble/grpc", "fp32", c, 100 * c, 2.0 * c, 4.0 * c) for c in (1, 8, 32)]
    cells.append(bench.Cell(path="fastapi/http", precision="int8", concurrency=1))  # nothing measured: left out
    bench.plot(cells, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_requests_files_give_wrk_and_perf_analyzer_the_same_requests(bench, tmp_path):
    input_json, users_file, rows = bench.write_requests(np.array([3, 5, 8], np.int64), tmp_path, k=7, seed=1)
    data = json.loads(input_json.read_text())["data"]
    lines = [tuple(map(int, line.split())) for line in users_file.read_text().splitlines()]
    assert len(data) == len(lines) == len(rows) == 256
    assert lines == [(r["user_id"]["content"][0], r["hour"]["content"][0], r["weekday"]["content"][0]) for r in data]
    assert {u for u, _, _ in lines} <= {3, 5, 8} and all(r["k"]["content"] == [7] for r in data)


def test_missing_load_generator_is_refused_in_one_line(bench, tmp_path, monkeypatch, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.main(["--repository", str(tmp_path), "--paths", "fastapi/http"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrk not found" in err[0] and "apt-get install -y wrk" in err[0]
    monkeypatch.setenv("PERF_ANALYZER", "")
    monkeypatch.setattr(bench.sys, "executable", str(tmp_path / "python"))  # no perf_analyzer beside it
    assert bench.main(["--repository", str(tmp_path), "--paths", "ensemble/grpc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "perf_analyzer not found" in err[0] and "tritonclient" in err[0]
    with pytest.raises(SystemExit):
        bench.main(["--repository", str(tmp_path / "missing")])


# -- wrk_recommend.lua -------------------------------------------------------------------------------

LUA_HARNESS = """
local script, users = arg[1], arg[2]
wrk = {format = function(method, path, headers, body)
  return method .. " " .. path .. " " .. headers["Content-Type"] .. "\\n" .. body end}
dofile(script)
setup({set = function(self, key, value) _G[key] = value end})
init({users, "7"})
for i = 1, 4 do io.write(request(), "\\n") end
local latency = {mean = 2500, max = 9000, percentile = function(self, q) return q * 100 end}
done({requests = 40, duration = 2000000, bytes = 1234,
      errors = {status = 1, connect = 0, read = 0, write = 0, timeout = 0}}, latency, nil)
"""


@pytest.fixture(scope="module")
def lua() -> str:
    for name in ("luajit", "lua5.1", "lua"):  # wrk 4.1 embeds LuaJIT (Lua 5.1 syntax)
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Lua 5.1 interpreter to check the wrk script (apt-get install lua5.1)")


def test_wrk_script_builds_kserve_bodies_and_prints_one_json_line(bench, lua, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("3 0 6\n\n5 23 0\n8\n")
    harness = tmp_path / "harness.lua"
    harness.write_text(LUA_HARNESS)
    proc = subprocess.run([lua, str(harness), str(LOADTEST / "wrk_recommend.lua"), str(users)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    requests = [(lines[i], json.loads(lines[i + 1])) for i in range(0, 8, 2)]
    assert {head for head, _ in requests} == {"POST /v2/models/recommend/infer application/json"}
    bodies = [body for _, body in requests]
    for body in bodies:
        inputs = {t["name"]: t for t in body["inputs"]}
        assert inputs["k"] == {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [7]}
        assert inputs["user_id"]["datatype"] == "INT64" and inputs["user_id"]["shape"] == [1, 1]
    users_seen = [b["inputs"][0]["data"][0] for b in bodies]
    assert sorted(set(users_seen)) == [3, 5, 8]  # the thread walks the whole list
    by_user = {b["inputs"][0]["data"][0]: {t["name"]: t["data"][0] for t in b["inputs"]} for b in bodies}
    assert by_user[5]["hour"] == 23 and by_user[5]["weekday"] == 0 and "hour" not in by_user[8]
    stats = bench.parse_wrk(proc.stdout)
    assert stats == {"requests": 40, "duration_s": 2.0, "bytes": 1234, "non2xx": 1, "connect_errors": 0,
                     "read_errors": 0, "write_errors": 0, "timeouts": 0, "p50_ms": 5.0, "p90_ms": 9.0,
                     "p99_ms": 9.9, "mean_ms": 2.5, "max_ms": 9.0}
    users.write_text("3 x 1\n")
    bad = subprocess.run([lua, str(harness), str(LOADTEST / "wrk_recommend.lua"), str(users)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "not an integer" in bad.stderr


# -- baseline_service.py -----------------------------------------------------------------------------

USERS = np.array([3, 5, 8, 13, 21], np.int64)
N_ITEMS, DIM, K, KMAX = 12, 4, 6, 4


def _fake_repository(root: Path) -> dict[str, np.ndarray]:
    """The files the baseline reads, with the served graphs' names and shapes: a dot-product 'ranker'."""
    faiss = pytest.importorskip("faiss")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    user_table = rng.normal(size=(len(USERS), DIM)).astype(np.float32)
    item_table = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    raw_items = np.arange(N_ITEMS, dtype=np.int64) * 10 + 100
    seen = [[0, 1], [2], [], [3, 4, 5], [6]]
    indptr = np.cumsum([0] + [len(s) for s in seen]).astype(np.int64)
    items = np.array([i for s in seen for i in s], np.int64)

    def save(graph, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, path)

    const = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    save(helper.make_graph(
        [helper.make_node("Gather", ["users", "user_idx"], ["rows"]),
         helper.make_node("Flatten", ["rows"], ["user_vec"], axis=1)], "user_tower",
        [helper.make_tensor_value_info("user_idx", TensorProto.INT64, ["B", 1])],
        [helper.make_tensor_value_info("user_vec", TensorProto.FLOAT, ["B", DIM])],
        [const("users", user_table)]), root / "retrieval" / "1" / "user_tower.onnx")
    i64 = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.INT64, dims)  # noqa: E731
    save(helper.make_graph(
        [helper.make_node("Max", ["cand_idx", "zero"], ["safe"]),
         helper.make_node("Gather", ["items", "safe"], ["emb"]),
         helper.make_node("Unsqueeze", ["user_vec", "axis2"], ["uv"]),
         helper.make_node("MatMul", ["emb", "uv"], ["s3"]),
         helper.make_node("Squeeze", ["s3", "axis2"], ["s"]),
         helper.make_node("Less", ["cand_idx", "zero"], ["pad"]),
         helper.make_node("Where", ["pad", "low", "s"], ["masked"]),
         helper.make_node("TopK", ["masked", "kmax"], ["top", "pos"]),
         helper.make_node("GatherElements", ["cand_idx", "pos"], ["picked"], axis=1),
         helper.make_node("Max", ["picked", "zero"], ["picked_safe"]),
         helper.make_node("Gather", ["raw", "picked_safe"], ["raw_picked"]),
         helper.make_node("Cast", ["k"], ["k64"], to=TensorProto.INT64),
         helper.make_node("Less", ["ranks", "k64"], ["within_k"]),
         helper.make_node("Less", ["picked", "zero"], ["picked_pad"]),
         helper.make_node("Not", ["picked_pad"], ["real"]),
         helper.make_node("And", ["within_k", "real"], ["keep"]),
         helper.make_node("Where", ["keep", "raw_picked", "minus_one"], ["item_ids"]),
         helper.make_node("Where", ["keep", "top", "low"], ["scores"])], "ranker",
        [i64("user_idx", ["B", 1]), helper.make_tensor_value_info("user_vec", TensorProto.FLOAT, ["B", DIM]),
         i64("context_hour", ["B", 1]), i64("context_weekday", ["B", 1]), i64("cand_idx", ["B", K]),
         helper.make_tensor_value_info("cand_src", TensorProto.FLOAT, ["B", K, 3]),
         helper.make_tensor_value_info("k", TensorProto.INT32, ["B", 1])],
        [i64("item_ids", ["B", KMAX]), helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", KMAX])],
        [const("items", item_table), const("raw", raw_items), const("zero", np.int64(0)),
         const("axis2", np.array([2], np.int64)), const("low", np.float32(-3e38)),
         const("kmax", np.array([KMAX], np.int64)), const("ranks", np.arange(KMAX, dtype=np.int64)[None]),
         const("minus_one", np.int64(-1))]), root / "ranker" / "1" / "model.onnx")
    retrieval = root / "retrieval" / "1"  # the served step that holds the user tower, users and the index
    # candidate sources that leave the towers' order alone: ALS and popularity weighted 0, no neighbours
    import scipy.sparse as sp

    from recserve.sources import Blend, ViewSources, save_sources

    view = ViewSources(als_user=np.zeros((len(USERS), 1), np.float32), als_item=np.zeros((N_ITEMS, 1), np.float32),
                       nbr=sp.csr_matrix((N_ITEMS, N_ITEMS), dtype=np.float32), pop=np.zeros(N_ITEMS, np.float32),
                       recent=np.full((len(USERS), 2), N_ITEMS, np.int64))
    save_sources(retrieval / "sources.npz", {"view": view})
    coef = {"two_tower": 1.0, "als": 0.0, "popularity": 0.0, "neighbours": 0.0}
    (retrieval / "blend.json").write_text(json.dumps({"coef": coef}))
    blend_items = Blend.item_matrix(item_table, view)
    np.save(retrieval / "blend_items.npy", blend_items)
    index = faiss.IndexFlatIP(blend_items.shape[1])
    index.add(blend_items)
    faiss.write_index(index, str(retrieval / "index.faiss"))
    (retrieval / "index.json").write_text(json.dumps({"spec": {"kind": "flat"}, "candidates": K}))
    np.savez(retrieval / "seen.npz", indptr=indptr, items=items)
    np.savez(retrieval / "users.npz", user_ids=USERS)
    (root / "manifest.json").write_text(json.dumps({"candidates": K, "k_max": KMAX, "precision": "fp32"}))
    return {"user_table": user_table, "item_table": item_table, "raw_items": raw_items, "indptr": indptr,
            "items": items}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import warnings

    with warnings.catch_warnings():  # starlette >= 1.10 would rather have httpx2; httpx still works
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("repo")
    tables = _fake_repository(root)
    service = _import(LOADTEST / "baseline_service.py", "recserve_baseline_service")
    with TestClient(service.create_app(root, threads=1)) as client:
        yield service, client, tables


def _body(**values) -> dict:
    types = {"user_id": "INT64", "k": "INT32", "hour": "INT64", "weekday": "INT64"}
    return {"inputs": [{"name": n, "shape": [len(v), 1], "datatype": types[n], "data": v} for n, v in values.items()]}


def test_baseline_answers_kserve_json_with_the_candidate_rule(baseline):
    service, client, t = baseline
    response = client.post(service.INFER_PATH, json=_body(user_id=[3, 13], k=[3, 2], hour=[5, 6], weekday=[0, 6]))
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["model_name"] == "recommend"
    out = {o["name"]: o for o in doc["outputs"]}
    assert (out["item_ids"]["datatype"], out["scores"]["datatype"]) == ("INT64", "FP32")
    assert out["item_ids"]["shape"] == out["scores"]["shape"] == [2, 3]
    ids = np.array(out["item_ids"]["data"]).reshape(2, 3)
    for row, (u, k) in enumerate(((0, 3), (3, 2))):
        scores = t["item_table"] @ t["user_table"][u]
        seen = set(t["items"][t["indptr"][u]:t["indptr"][u + 1]].tolist())
        unseen = [i for i in np.argsort(-scores, kind="stable") if i not in seen][:k]
        assert ids[row, :k].tolist() == t["raw_items"][unseen].tolist()
        assert (ids[row, k:] == -1).all()
    no_context = client.post(service.INFER_PATH, json=_body(user_id=[21], k=[4]))  # hour, weekday: now
    assert no_context.status_code == 200 and no_context.json()["outputs"][0]["shape"] == [1, 4]


@pytest.mark.parametrize(("body", "message"), [
    (_body(user_id=[4], k=[3]), "unknown user_id 4"),
    (_body(user_id=[3], k=[0]), "k=0 is out of range"),
    (_body(user_id=[3], k=[KMAX + 1]), f"k={KMAX + 1} is out of range"),
    (_body(user_id=[3], k=[2], hour=[24], weekday=[0]), "hour=24 is out of range"),
    (_body(user_id=[3]), "missing input 'k'"),
    (_body(user_id=[3, 5], k=[2]), "different numbers of rows"),
    ({"inputs": [{"name": "user_id", "data": ["3"]}, {"name": "k", "data": [2]}]}, "must be a non-empty list of int"),
    ({"inputs": [{"name": "titles", "data": [1]}]}, "unknown input 'titles'"),
    ({"user_id": 3}, "expected a KServe v2 request"),
])
def test_baseline_rejects_bad_requests_with_400_and_a_message(baseline, body, message):
    service, client, _ = baseline
    response = client.post(service.INFER_PATH, json=body)
    assert response.status_code == 400 and message in response.json()["error"]


def test_baseline_parses_and_renders_without_a_server(baseline):
    service, client, _ = baseline
    assert client.post(service.INFER_PATH, content=b"{not json").status_code == 400
    assert client.get("/v2/health/ready").status_code == 200
    inputs, request_id = service.parse_request(json.dumps({"id": "r1", **_body(user_id=[[5]], k=[[2]])}))
    assert request_id == "r1" and inputs["user_id"].tolist() == [[5]] and inputs["k"].dtype == np.int64
    doc = json.loads(service.render_response(np.array([[7, -1]]), np.array([[0.5, -1.0]], np.float32), "r1"))
    assert doc["id"] == "r1" and doc["outputs"][0] == {"name": "item_ids", "datatype": "INT64", "shape": [1, 2],
                                                       "data": [7, -1]}


# -- docker ------------------------------------------------------------------------------------------

def test_dockerfile_uses_triton_2_51_and_copies_no_data():
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) == 1
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3", froms[0])
    assert match and TRITON_OF_NGC.get(match.group(1), "").startswith("2.51"), froms[0]
    copied = {part for line in lines if line.upper().startswith("COPY ") for part in line.split()[1:-1]}
    assert copied <= {"pyproject.toml", "recserve"}, copied
    text = "\n".join(lines)
    assert "numpy>=1.24,<2" in text and "faiss-cpu" in text and "faiss-gpu" in text
    assert 'CMD ["tritonserver", "--model-repository=/models"]' in text


def _simple_yaml_check(text: str) -> None:
    """Without PyYAML: block style only, two-space indents, every line a key or a list item."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert "\t" not in line, f"line {number}: tab"
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"line {number}: odd indent"
        assert re.match(r"^ *(- .+|[\w.-]+:( .*)?)$", line), f"line {number}: not YAML block style: {line!r}"


def test_compose_file_is_valid_yaml_with_ports_and_repository():
    text = (DOCKER / "docker-compose.yml").read_text()
    try:
        import yaml
    except ImportError:
        _simple_yaml_check(text)
        ports = re.findall(r'^\s*- "([\d.:]+)"\s*$', text, flags=re.M)
        volumes = re.findall(r"^\s*- (\S+:/models\S*)\s*$", text, flags=re.M)
        command = re.findall(r"^\s*- (--model-repository=\S+)\s*$", text, flags=re.M)
    else:
        service = yaml.safe_load(text)["services"]["triton"]
        ports, volumes, command = service["ports"], service["volumes"], service["command"]
    published = {p if p.count(":") == 1 else p.split(":", 1)[1] for p in map(str, ports)}  # drop a host address
    assert published >= {"8000:8000", "8001:8001", "8002:8002"}
    assert any(re.search(r":/models(:ro)?$", v) for v in volumes), volumes  # the source may hold ${VAR:-default}
    assert "--model-repository=/models" in command
    assert "--flavor native" in text  # the header says which repository flavor it serves


def test_docker_readme_says_it_cannot_run_here():
    text = (DOCKER / "README.md").read_text()
    assert "no Docker engine" in text
    assert "recserve export repository --flavor native" in text
    assert "docker compose -f docker/docker-compose.yml up" in text


def test_bench_swap_refuses_an_unknown_mode_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(LOADTEST / "bench_swap.py"), "--artifacts", str(tmp_path),
                          "--modes", "explicit,push"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == "bench_swap: --modes takes explicit and poll, got push"


def test_every_benchmark_in_loadtest_is_listed_in_its_readme():
    listed = (LOADTEST / "README.md").read_text()
    missing = [p.name for p in sorted(LOADTEST.glob("*.py")) if f"`{p.name}`" not in listed]
    assert not missing, f"loadtest/README.md does not list {missing}"
