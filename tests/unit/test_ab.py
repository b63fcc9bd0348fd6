"""The A/B split's hash, the event log (rotation, torn lines) and the report's statistics."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from recserve.ab import arm, report
from recserve.errors import ClientError
from recserve.events import EventLog, log_files, read_events


def test_the_arm_is_a_salted_crc32_bucket_stable_per_user_and_near_the_share():
    users = range(1, 20001)
    arms = [arm(u, 0.2, "s1") for u in users]
    assert abs(arms.count("b") / len(arms) - 0.2) < 0.01
    assert arms == [arm(u, 0.2, "s1") for u in users], "a user always gets the same arm"
    assert arm(42, 0.2, "s1") == ("b" if zlib.crc32(b"s1:42") % 10000 < 2000 else "a")   # what the Lua computes
    moved = sum(a != arm(u, 0.2, "s2") for u, a in zip(users, arms))
    assert moved > 0.2 * len(arms), "a new salt reshuffles users"


def test_the_event_log_rotates_by_size_and_reads_oldest_first_skipping_torn_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=2048, keep=3)
    for i in range(200):
        log.write({"type": "impression", "request_id": f"r{i}", "user": i, "items": [1, 2, 3]})
    log.close()
    files = log_files(path)
    assert len(files) == 4 and files[-1] == path, files           # 3 rotated, oldest dropped
    assert all(f.stat().st_size <= 2048 for f in files)
    with open(path, "a") as f:
        f.write('{"type": "click", "request_id": "r199", "ite')       # a crash mid-write
    skipped: list[int] = []
    ids = [int(e["request_id"][1:]) for e in read_events(path, skipped)]
    assert ids == sorted(ids) and ids[-1] == 199 and skipped == [1]
    with pytest.raises(ClientError, match="no event log"):
        list(read_events(tmp_path / "absent.jsonl"))
    with pytest.raises(ClientError, match="max_bytes"):
        EventLog(tmp_path / "x", max_bytes=10)


def _simulate(path, ctr: dict[str, float], n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    log = EventLog(path)
    for i in range(n):
        version = "1" if i % 2 else "2"
        items = [10, 11, 12, 13, 14]
        log.write({"type": "impression", "request_id": f"q{i}", "user": i, "items": items, "version": version})
        if rng.random() < ctr[version]:
            log.write({"type": "click", "request_id": f"q{i}", "user": i, "item": 10, "version": version})
    log.write({"type": "click", "request_id": "unknown", "user": 0, "item": 10})     # no impression: ignored
    log.close()


def test_the_report_measures_each_versions_ctr_and_finds_a_real_difference(tmp_path):
    _simulate(tmp_path / "e.jsonl", {"1": 0.10, "2": 0.13}, 20000)
    r = report(tmp_path / "e.jsonl")
    v1, v2 = r["versions"]["1"], r["versions"]["2"]
    assert v1["impressions"] == v2["impressions"] == 10000
    for v, want in ((v1, 0.10), (v2, 0.13)):
        lo, hi = v["ctr_95"]
        assert lo < want < hi and hi - lo < 0.015
        assert v["reward_per_impression"] == pytest.approx(v["ctr"])     # every click at rank 1
    c = r["comparison"]
    assert (c["a"], c["b"]) == ("1", "2") and c["ctr_lift"] == pytest.approx(0.3, abs=0.08)
    assert c["p_value"] < 1e-6


def test_the_report_does_not_call_noise_a_difference(tmp_path):
    p_values = []
    for seed in range(20):
        _simulate(tmp_path / f"e{seed}.jsonl", {"1": 0.1, "2": 0.1}, 4000, seed)
        p_values.append(report(tmp_path / f"e{seed}.jsonl")["comparison"]["p_value"])
    assert sum(p < 0.05 for p in p_values) <= 3, p_values          # about 1 in 20 by chance
    assert all(0 <= p <= 1 and not math.isnan(p) for p in p_values)
    assert json.dumps(report(tmp_path / "e0.jsonl"))                  # the --json output is plain JSON
