"""Helpers of the reliability suite: requests, the "still serving" check, `recserve serve` in a subprocess, figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from recserve.server import free_port

FIGURES: dict[str, dict] = {}


def record(name: str, **figures) -> None:
    """Keep a measured figure for the report (and print it: `pytest -s` shows them)."""
    FIGURES.setdefault(name, {}).update(figures)
    print(f"[reliability] {name}: {json.dumps(figures)}")


def long_run(request) -> bool:
    return "long" in (request.config.getoption("-m") or "")


def recommend_json(user: int, k: int = 5) -> dict:
    return {"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user]},
                       {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [k]}]}


def still_serving(served, expected) -> None:
    """The server is ready and answers every user exactly as before."""
    base = f"http://{served.url('http')}"
    assert requests.get(f"{base}/v2/health/ready", timeout=5).status_code == 200
    assert served.server.is_alive
    for u, items in expected.items():
        r = requests.post(f"{base}/v2/models/recommend/infer", json=recommend_json(u), timeout=10)
        assert r.status_code == 200, r.text
        assert next(o["data"] for o in r.json()["outputs"] if o["name"] == "item_ids") == items


class ServeProcess:
    """`recserve serve` as its users run it, in a subprocess of its own (own ports, own process group)."""

    def __init__(self, repository: Path, log: Path, *extra: str):
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recserve", "serve", "--repository", str(repository), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *extra],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, start_new_session=True)  # noqa: SIM115

    def wait_ready(self, timeout: float = 120) -> None:
        line = self.proc.stdout.readline()
        assert line.startswith("Triton ready"), f"{line!r}\n{self.log.read_text()[-3000:]}"
        deadline = time.monotonic() + timeout
        while requests.get(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def triton_pid(self) -> int | None:
        """The tritonserver this wrapper started (its child)."""
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                    exe = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")[0]
                except OSError:
                    continue
                if int(stat[1]) == self.proc.pid and exe.endswith(b"/tritonserver"):
                    return int(entry.name)
        return None

    def tree(self, triton: int | None) -> list[int]:
        """Live processes of the wrapper's session (nginx) and of Triton's (the server, its stubs)."""
        sessions = {self.proc.pid, *([triton] if triton else [])}
        return [pid for pid, (sid, _) in _processes().items() if sid in sessions and pid != self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _processes() -> dict[int, tuple[int, bytes]]:
    """{pid: (session id, cmdline)} of live (not zombie) processes."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if stat[0] != "Z":
                out[int(entry.name)] = (int(stat[3]), cmd)
    return out
