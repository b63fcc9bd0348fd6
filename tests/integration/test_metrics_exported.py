"""The metrics contract of deploy/: every family in deploy/prometheus/exported-metrics.txt (the names the alert
rules and the Grafana dashboard may use; tests/unit/test_deploy.py checks they use no other) is exported by the
session's real server after some traffic.

Two kinds of exception, stated in that file:
- `until-sampled`: Triton prints nothing for a counter family, not even its # HELP and # TYPE lines, until one
  of its series exists, and recserve creates a series at its first increment. recserve_fallbacks_total therefore
  appears only after a fallback, which healthy traffic never causes; it must appear once any answer's source
  was `fallback` (every such answer counts one).
- `flag=ARG`: exported only when tritonserver runs with ARG (the latency summaries); required when the server's
  command line has it.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from recserve.client import RecClient

pytestmark = pytest.mark.integration

EXPORTED_FILE = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "exported-metrics.txt"
UNKNOWN_USER = 987654321          # never seen: answered with source="popular"
SUMMARY_SUFFIXES = ("_count", "_sum")


def read_exported(path: Path = EXPORTED_FILE) -> dict[str, list[str]]:
    """{family name: its qualifiers} (the same parser as tests/unit/test_deploy.py)."""
    out = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out[words[0]] = words[1:]
    return out


def families(text: str) -> set[str]:
    """Families with a # TYPE line or a sample (a summary's NAME_count / NAME_sum count as NAME)."""
    names = set(re.findall(r"^# TYPE ([A-Za-z_:][\w:]*) ", text, re.M))
    for sample in re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", text, re.M):
        names.add(sample)
        names.update(sample[: -len(s)] for s in SUMMARY_SUFFIXES if sample.endswith(s))
    return names


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def metrics_text(served) -> str:
    users = np.load(served.repository / "retrieval" / "1" / "users.npz")["user_ids"]
    with RecClient(served.url("grpc")) as client:
        for user in users[:8]:
            client.recommend(int(user), k=5)
        assert client.recommend(UNKNOWN_USER, k=5).source == "popular"
    with RecClient(served.url("http"), "http") as client:
        client.recommend(int(users[0]), k=5)
    url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
    wanted = {n for n, words in read_exported().items() if not words}
    deadline = time.monotonic() + 15            # CPU metrics are polled (every 2 s by default)
    while True:
        text = requests.get(url, timeout=5).text
        if wanted <= families(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_every_listed_family_is_exported(served, metrics_text):
    exported = families(metrics_text)
    command = " ".join(served.server.command(Path("backends")))
    missing, skipped = [], []
    for name, words in read_exported().items():
        flags = [w.removeprefix("flag=") for w in words if w.startswith("flag=")]
        if flags and not all(flag in command for flag in flags):
            skipped.append(name)                  # not enabled on this server's command line
            continue
        if "until-sampled" in words and name not in exported:
            continue                              # checked below where it applies
        if name not in exported:
            missing.append(name)
    assert not missing, f"listed in {EXPORTED_FILE.name} but not exported: {missing}"
    assert 'recserve_responses_total{source="popular"}' in metrics_text
    assert 'recserve_responses_total{source="personalized"}' in metrics_text


def test_fallbacks_appear_once_a_fallback_was_answered(metrics_text):
    fallback_answers = _value(metrics_text, 'recserve_responses_total{source="fallback"}')
    if fallback_answers > 0:
        assert "# TYPE recserve_fallbacks_total counter" in metrics_text
    else:
        # Triton prints no line at all for the family before its first sample; the alert rule still parses.
        assert "recserve_fallbacks_total" not in metrics_text


def test_recserves_own_families_are_all_listed(metrics_text):
    listed = read_exported()
    own = sorted(n for n in families(metrics_text) if n.startswith("recserve_"))
    assert own and all(n in listed for n in own), own


def test_failures_carry_the_reason_label_the_dashboard_groups_by(metrics_text):
    assert re.search(r'^nv_inference_request_failure\{model="recommend",reason="\w+",version="1"\}', metrics_text,
                     re.M), "Triton's failure counter has no reason label"


def _drift(metrics_url: str) -> dict[tuple[str, str], float]:
    """{(signal, model_instance): PSI} of every recserve_drift_psi series."""
    text = requests.get(metrics_url, timeout=5).text
    out = {}
    for labels, value in re.findall(r"^recserve_drift_psi\{([^}]*)\} (\S+)$", text, re.M):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(d["signal"], d["model_instance"])] = float(value)
    return out


@pytest.fixture(scope="module")
def fresh(served, tmp_path_factory):
    """A server of this test's own: the session's has served other tests' skewed traffic."""
    from recserve.server import TritonServer, free_port

    with TritonServer(served.repository, free_port(), free_port(), free_port(),
                      log_file=tmp_path_factory.mktemp("drift") / "triton.log") as server:
        yield server


def _send(server, users, then_wait: bool = True) -> None:
    with RecClient(server.url("grpc")) as client:
        for user in users:
            client.recommend(int(user), k=5)
        if then_wait:                      # the gauges are set at most once a second, on a request
            time.sleep(1.1)
            for user in users[:20]:
                client.recommend(int(user), k=5)


def _buckets(metrics_url: str, name: str) -> dict[float, float]:
    """{le: count} of one histogram's cumulative `NAME_bucket` series (version 1), in order of le."""
    text = requests.get(metrics_url, timeout=5).text
    out = {}
    for labels, value in re.findall(rf"^{name}_bucket\{{([^}}]*)\}} (\S+)$", text, re.M):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if d["version"] == "1":
            out[float(d["le"])] = float(value)
    return dict(sorted(out.items()))


def _wait_counted(metrics_url: str, name: str, rows: int) -> dict[float, float]:
    """The histogram once its +Inf bucket holds `rows` (counts reach Triton on the next request after 0.5 s;
    the supervisor's canary is one every 2 s)."""
    deadline = time.monotonic() + 10
    while (b := _buckets(metrics_url, name)) and b[math.inf] < rows and time.monotonic() < deadline:
        time.sleep(0.5)
    return b


def test_drift_gauges_stay_low_on_the_known_users_and_rise_when_one_user_floods_the_server(fresh, served):
    metrics = fresh.url("metrics")
    before = _drift(metrics)
    assert {s for s, _ in before} == {"score", "query_norm"}
    assert all(math.isnan(v) for v in before.values()), "no PSI before enough rows were served"
    # every bucket of both histograms is there before the first request, at 0 (histogram_quantile needs them all)
    empty = {name: _buckets(metrics, name) for name in ("recserve_score", "recserve_candidates")}
    assert len(empty["recserve_score"]) >= 5 and len(empty["recserve_candidates"]) >= 3, empty
    assert all(v == 0 for b in empty.values() for v in b.values()), empty
    users = np.load(served.repository / "retrieval" / "1" / "users.npz")["user_ids"]
    _send(fresh, np.tile(users, 4))
    calm = _drift(metrics)
    assert max(calm.values()) < 0.1, calm
    rows = 4 * len(users) + 20                          # _send's requests, one known user each; canaries left out
    score = _wait_counted(metrics, "recserve_score", rows)
    found = _wait_counted(metrics, "recserve_candidates", rows)
    assert score[math.inf] == found[math.inf] == rows, (score, found)
    for b in (score, found):
        assert list(b.values()) == sorted(b.values()), f"buckets are cumulative: {b}"
    # the bounds are the reference's deciles: the known users themselves fill each tenth, give or take
    shares = np.diff([0.0, *score.values()]) / rows
    assert shares.max() < 0.3, shares
    _send(fresh, np.full(2500, users[7]))
    flooded = _drift(metrics)
    assert max(v for (s, _), v in flooded.items() if s == "score") > 0.25, flooded
    assert max(v for (s, _), v in flooded.items() if s == "query_norm") > 0.25, flooded
    after = _wait_counted(metrics, "recserve_score", rows + 2520)
    grew = np.diff([0.0, *after.values()]) - np.diff([0.0, *score.values()])
    assert after[math.inf] == rows + 2520 and grew.max() >= 2500, "one user's rows all fall in one bucket"
    print(f"[drift] known users: {calm}; one user 2,500 times: {flooded}; score buckets {after}; candidates {found}")
