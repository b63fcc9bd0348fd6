"""The A/B split's hash, the event log (rotation, torn lines) and the report's statistics."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from recserve.ab import arm, format_report, report
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
        p_values.append(report(tmp_path / f"e{seed}.jsonl", resamples=200)["comparison"]["p_value"])
    assert sum(p < 0.05 for p in p_values) <= 3, p_values          # about 1 in 20 by chance
    assert all(0 <= p <= 1 and not math.isnan(p) for p in p_values)
    assert json.dumps(report(tmp_path / "e0.jsonl"))                  # the --json output is plain JSON


def _simulate_users(path, means: dict[str, float], users: int, per_user: int, seed: int) -> None:
    """`users` users per version, each with `per_user` impressions and a click-through of their own
    (Beta-distributed around the version's mean): clicks cluster by user, as on live traffic."""
    rng = np.random.default_rng(seed)
    log = EventLog(path)
    q = 0
    for u in range(2 * users):
        version = "1" if u % 2 else "2"
        m = means[version]
        p = rng.beta(m * 5, (1 - m) * 5)
        for _ in range(per_user):
            log.write({"type": "impression", "request_id": f"q{q}", "user": u, "items": [10, 11, 12],
                       "version": version})
            if rng.random() < p:
                log.write({"type": "click", "request_id": f"q{q}", "user": u, "item": 10, "version": version})
            q += 1
    log.close()


def test_with_clicks_clustered_by_user_the_user_bootstrap_keeps_its_error_rate_where_the_z_test_does_not(tmp_path):
    z_says, bootstrap_says = 0, 0
    for seed in range(20):
        _simulate_users(tmp_path / f"e{seed}.jsonl", {"1": 0.1, "2": 0.1}, 100, 40, seed)
        c = report(tmp_path / f"e{seed}.jsonl", resamples=500)["comparison"]
        z_says += c["p_value"] < 0.05
        lo, hi = c["ctr_difference_95"]
        bootstrap_says += not lo < 0 < hi
    assert bootstrap_says <= 3, "equal arms: a 95% interval excludes 0 about 1 time in 20"
    assert z_says >= bootstrap_says + 4, (z_says, bootstrap_says)     # 8 of 20 with these seeds


def test_the_bootstrap_interval_of_a_real_difference_excludes_zero_and_holds_the_truth(tmp_path):
    _simulate_users(tmp_path / "e.jsonl", {"1": 0.10, "2": 0.14}, 300, 40, 1)
    r = report(tmp_path / "e.jsonl")
    assert r["versions"]["1"]["users"] == r["versions"]["2"]["users"] == 300
    c = r["comparison"]
    for name in ("ctr_difference_95", "reward_difference_95"):
        lo, hi = c[name]
        assert 0 < lo < 0.04 < hi, (name, c[name])
    assert "resample users" in format_report(r)


def test_a_repeated_click_counts_once_and_a_second_item_adds_its_rank_reward(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")
    log.write({"type": "impression", "request_id": "a", "user": 1, "items": [7, 8, 9], "version": "1"})
    for item in (7, 7, 9):
        log.write({"type": "click", "request_id": "a", "user": 1, "item": item, "version": "1"})
    log.write({"type": "impression", "request_id": "b", "user": 1, "items": [7, 8, 9], "version": "1"})
    log.close()
    v = report(tmp_path / "e.jsonl", resamples=50)["versions"]["1"]
    assert (v["impressions"], v["users"], v["clicks"], v["clicked_impressions"]) == (2, 1, 2, 1)
    assert v["ctr"] == 0.5 and v["reward_per_impression"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
