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
            def candidates(self):
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

def _readme_inputs(model: str) -> dict[str, tuple[str, list[int]]]:
    """The inputs of ``model`` in model_repository/README.md's table: name -> (type, per-row dims)."""
    text = (ROOT / "model_repository" / "README.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith(f"| `{model}` |"))
    inputs = row.split("|")[3]
    return {name: (dtype, [int(d) if d.lstrip("-").isdigit() else d for d in dims.split(",")])
            for name, dtype, dims in re.findall(r"`(\w+)` (\w+) \[([^\]]+)\]", inputs)}


def test_make_perf_input_writes_recommend_requests_from_real_users(users_npz, tmp_path):
    mpi = _import(LOADTEST / "make_perf_input.py", "recserve_make_perf_input")
    out = tmp_path / "perf.json"
    assert mpi.main(["--users-from", str(users_npz), "--out", str(out), "--n", "64", "--k", "7"]) == 0
    data = json.loads(out.read_text())["data"]
    assert len(data) == 64
    expected = _readme_inputs("recommend")
    assert set(expected) == {"user_id", "k", "hour", "weekday"}
    for request in data:
        assert set(request) == set(expected)
        for name, (_dtype, dims) in expected.items():
            assert request[name]["shape"] == dims == [1]
            assert len(request[name]["content"]) == 1 and isinstance(request[name]["content"][0], int)
        assert request["user_id"]["content"][0] in {3, 5, 8, 13, 21}
        assert request["k"]["content"] == [7]
        assert 0 <= request["hour"]["content"][0] <= 23 and 0 <= request["weekday"]["content"][0] <= 6
    assert len({r["user_id"]["content"][0] for r in data}) > 1


def test_make_perf_input_user_tower_shapes_and_errors(users_npz, tmp_path):
    mpi = _import(LOADTEST / "make_perf_input.py", "recserve_make_perf_input")
    with np.load(users_npz) as z:
        doc = mpi.build({name: z[name] for name in z.files}, model="user_tower", n=4)
    assert [(k, v["shape"]) for k, v in doc["data"][0].items()] == [("user_idx", [1]), ("user_cats", [3]),
                                                                     ("history", [20])]
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

def test_closed_loop_counts_latencies_and_errors():
    bench = _import(LOADTEST / "bench_serving.py", "recserve_bench_serving")
    import time

    def make():
        def call(user: int, hour: int, weekday: int) -> int:
            time.sleep(0.002)
            if user == 2:
                raise RuntimeError("boom")
            return 10
        return call

    cell = bench.closed_loop(make, np.array([1, 2]), concurrency=2, duration=0.4, warmup=0.1)
    assert cell.requests > 10 and cell.errors > 10
    assert cell.first_error == "RuntimeError: boom"
    assert 2.0 <= cell.p50_ms <= cell.p90_ms <= cell.p99_ms
    assert cell.mean_items == 10
    assert 0 < cell.rps < 2 / 0.002
    table = bench.markdown([cell])
    assert "| target | concurrency | req/s |" in table and "boom" in table


def test_stats_delta_gives_the_average_formed_batch():
    bench = _import(LOADTEST / "bench_serving.py", "recserve_bench_serving")
    zero = {"inference_count": 0, "execution_count": 0, "success": 0, "queue_ns": 0, "compute_infer_ns": 0}
    before = {"ranker": dict(zero, inference_count=10, execution_count=10, success=10), "item_tower": dict(zero)}
    after = {"ranker": {"inference_count": 110, "execution_count": 35, "success": 110, "queue_ns": 100_000_000,
                        "compute_infer_ns": 200_000_000}, "item_tower": dict(zero)}
    delta = bench.stats_delta(before, after)
    assert list(delta) == ["ranker"]  # models without traffic are left out
    assert delta["ranker"]["avg_batch"] == pytest.approx(4.0)
    assert delta["ranker"]["queue_us"] == pytest.approx(1000.0)
    assert delta["ranker"]["compute_us"] == pytest.approx(2000.0)


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
