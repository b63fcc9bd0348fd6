"""A/B tests between two versions of `recommend`, on live traffic: the split, and the report from the event log.

`recserve ab start --repository R --b V --share 0.1` loads version V of `recommend` beside the live version
(its config lists both; the other models stay on the live version) and records the split in the manifest
(`"ab"`). The front door (recserve/serving/frontdoor.lua) then sends a request that names no version to
arm b's version when `crc32(salt:user_id) % 10000 < share * 10000`, else to arm a's (the live one): a user
always sees the same arm, and a new salt reshuffles users. Each answer names its arm (the `recserve-arm` header)
and its version (`model_version`). The front door cannot read gRPC bodies: over gRPC, `RecClient` reads the
split from `recommend`'s config (parameter `recserve_ab`, looked at every 10 s) and asks for its arm's version
itself; for any other gRPC client the newest loaded version, which Triton answers unversioned requests with,
forwards the other arm's users to their version (recserve/serving/steps/fused.py).
`recserve ab stop`, a deploy or a rollback end the split.

`recserve ab report --events LOG` reads the event log the client writes (`recserve.events`) and compares the
arms by the version that answered: click-through (the share of impressions with a click) with a 95% (Wilson)
interval and a two-proportion z-test, and clicks weighted by position (a DCG-style reward: a click at rank r
counts 1 / log2(r + 1)); the differences between the arms get 95% intervals from a bootstrap over users, the
unit the split assigns (one user's impressions are not independent, and the z-test takes them as if they were).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections import defaultdict
from pathlib import Path

from recserve.deploy import _replace_file, _verified, _write_manifest, _write_text, locked
from recserve.errors import ArtifactError
from recserve.serving.split import BUCKETS, PARAMETER, arm  # noqa: F401 - arm and BUCKETS are this module's API too

MODEL = "recommend"


@locked("repository")
def start(repository: Path, b: int, share: float, salt: str | None = None) -> dict:
    """Serve version `b` of `recommend` to `share` of the users, the live version to the rest."""
    from recserve.serving.repository import parse, render_proto

    repository = Path(repository)
    if not 0.0 < share < 1.0:
        raise ArtifactError(f"share={share}: give the part of users arm b gets, between 0 and 1 (0.1 = 10%)")
    manifest = _verified(repository)
    a = int(manifest["model_version"])
    if str(b) not in manifest["versions"] or b == a:
        kept = sorted(int(v) for v in manifest["versions"])
        raise ArtifactError(f"version {b} cannot be arm b: the repository keeps {kept} and {a} is live (arm a); "
                            "add a version with `recserve deploy`, then roll back to the one arm a should be")
    cfg_a, cfg_b = (parse((repository / MODEL / str(v) / "config.pbtxt").read_text()) for v in (a, b))
    for cfg in (cfg_a, cfg_b):
        cfg.ClearField("version_policy")
    if cfg_a != cfg_b:
        raise ArtifactError(f"versions {a} and {b} of {MODEL} differ in their config (inputs, outputs, batching or "
                            "parameters): one config serves both arms, so they must agree; export both alike")
    cfg_a.version_policy.specific.versions.extend(sorted({a, b}))
    split = {"model": MODEL, "a": a, "b": int(b), "share": float(share), "salt": salt or secrets.token_hex(4)}
    # clients read it from the config (`RecClient` over gRPC, which the front door cannot split)
    cfg_a.parameters[PARAMETER].string_value = json.dumps(split, sort_keys=True)
    text = render_proto(cfg_a)
    _write_text(repository / MODEL / "config.pbtxt", text)
    hashes = {**manifest["sha256"], f"{MODEL}/config.pbtxt": hashlib.sha256(text.encode()).hexdigest()}
    _write_manifest(repository, {**manifest, "ab": split}, hashes)
    return split


@locked("repository")
def stop(repository: Path) -> dict:
    """End the split: `recommend` serves the live version alone again."""
    repository = Path(repository)
    manifest = _verified(repository)
    if not manifest.get("ab"):
        raise ArtifactError(f"{repository} runs no A/B split")
    live = int(manifest["model_version"])
    _replace_file(repository / MODEL / str(live) / "config.pbtxt", repository / MODEL / "config.pbtxt")
    hashes = {**manifest["sha256"], f"{MODEL}/config.pbtxt": manifest["sha256"][f"{MODEL}/{live}/config.pbtxt"]}
    ended = manifest["ab"]
    _write_manifest(repository, {k: v for k, v in manifest.items() if k != "ab"}, hashes)
    return ended


# -- the report ------------------------------------------------------------------------------------------------

def _interval(clicks: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    z, p = 1.959964, clicks / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


BOOTSTRAP = 1000     # resamples of the users for the bootstrap intervals


def _bootstrap(per_user, resamples: int, rng) -> tuple:
    """(CTR, reward per impression) of `resamples` Poisson-bootstrap resamples of the users; `per_user` has a row
    per user: impressions, impressions with a click, reward."""
    import numpy as np

    n, clicked, reward = per_user[:, 0], per_user[:, 1], per_user[:, 2]
    ctr, rew = np.empty(resamples), np.empty(resamples)
    rows = max(1, min(resamples, 20_000_000 // max(1, len(n))))      # bounded memory at millions of users
    for lo in range(0, resamples, rows):
        w = rng.poisson(1.0, size=(min(rows, resamples - lo), len(n))).astype(np.float64)
        shown = np.maximum(w @ n, 1.0)
        ctr[lo:lo + len(w)], rew[lo:lo + len(w)] = (w @ clicked) / shown, (w @ reward) / shown
    return ctr, rew


def _percentiles(x) -> tuple[float, float]:
    import numpy as np

    return (float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))) if len(x) else (float("nan"),) * 2


def report(events: Path, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Per model version (the arms of a split are versions): impressions, users, clicks, CTR (the share of
    impressions with a click) with its 95% Wilson interval, and the DCG-style reward per impression with a 95%
    bootstrap interval; with two versions, the later-named against the first: the differences with 95%
    bootstrap intervals and the two-proportion z-test.

    The bootstrap resamples users, the unit the split assigns: one user's impressions are not independent (the
    same taste, the same arm all along), and a test that takes them as independent (the z-test, the Wilson
    interval) is too sure of itself when users see many impressions. A repeated click on the same item of the
    same impression counts once."""
    import numpy as np

    from recserve.events import read_events

    shown: dict[str, tuple[str, str, dict[int, int]]] = {}
    per_impression: dict[str, list] = {}        # request id -> [clicked items, reward]
    skipped: list[int] = []
    for e in read_events(events, skipped):
        if e["type"] == "impression":
            version = str(e.get("version") or "?")
            shown[e["request_id"]] = (version, str(e.get("user", "")),
                                      {int(i): pos for pos, i in enumerate(e.get("items", []))})
            per_impression[e["request_id"]] = [set(), 0.0]
        elif e["type"] == "click" and e["request_id"] in shown:
            _, _, positions = shown[e["request_id"]]
            item = int(e.get("item", -1))
            pos = positions.get(item)
            got = per_impression[e["request_id"]]
            if pos is not None and item not in got[0]:
                got[0].add(item)
                got[1] += 1.0 / math.log2(pos + 2)
    # per version, per user: impressions, impressions with a click, reward, clicks
    users: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for rid, (version, user, _) in shown.items():
        items, reward = per_impression[rid]
        row = users[version].setdefault(user, [0, 0, 0.0, 0])
        row[0] += 1
        row[1] += bool(items)
        row[2] += reward
        row[3] += len(items)
    rng = np.random.default_rng(seed)
    arms, draws = {}, {}
    for name in sorted(users, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)):
        per_user = np.array(list(users[name].values()), np.float64)
        n, clicked, reward, clicks = per_user.sum(axis=0)
        n, clicked, clicks = int(n), int(clicked), int(clicks)
        draws[name] = _bootstrap(per_user, resamples, rng)
        arms[name] = {"impressions": n, "users": len(per_user), "clicks": clicks,
                      "clicked_impressions": clicked, "ctr": clicked / n, "ctr_95": _interval(clicked, n),
                      "reward_per_impression": float(reward) / n, "reward_95": _percentiles(draws[name][1])}
    out: dict = {"versions": arms, "skipped_lines": sum(skipped), "bootstrap_resamples": resamples}
    if len(arms) == 2:
        (va, a), (vb, b) = arms.items()
        pooled = (a["clicked_impressions"] + b["clicked_impressions"]) / (a["impressions"] + b["impressions"])
        se = math.sqrt(pooled * (1 - pooled) * (1 / a["impressions"] + 1 / b["impressions"]))
        z = (b["ctr"] - a["ctr"]) / se if se > 0 else 0.0
        out["comparison"] = {
            "a": va, "b": vb, "ctr_lift": b["ctr"] / a["ctr"] - 1 if a["ctr"] else float("nan"),
            "ctr_difference": b["ctr"] - a["ctr"], "ctr_difference_95": _percentiles(draws[vb][0] - draws[va][0]),
            "reward_difference": b["reward_per_impression"] - a["reward_per_impression"],
            "reward_difference_95": _percentiles(draws[vb][1] - draws[va][1]),
            "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}
    return out


def format_report(r: dict) -> str:
    lines = ["version  impressions    users  clicks  CTR     95% (Wilson)      reward/impression  95% (users)"]
    for name, a in r["versions"].items():
        lo, hi = a["ctr_95"]
        rlo, rhi = a["reward_95"]
        lines.append(f"{name:<8} {a['impressions']:>11,} {a['users']:>8,} {a['clicks']:>7,}  {a['ctr']:.4f}  "
                     f"[{lo:.4f}, {hi:.4f}]  {a['reward_per_impression']:.4f}             [{rlo:.4f}, {rhi:.4f}]")
    if "comparison" in r:
        c = r["comparison"]
        (clo, chi), (rlo, rhi) = c["ctr_difference_95"], c["reward_difference_95"]
        lines.append(f"version {c['b']} against {c['a']}: CTR {c['ctr_lift']:+.1%} ({c['ctr_difference']:+.4f}, "
                     f"95% [{clo:+.4f}, {chi:+.4f}]), reward/impression {c['reward_difference']:+.4f} "
                     f"(95% [{rlo:+.4f}, {rhi:+.4f}])")
        lines.append(f"  two-proportion z-test: z = {c['z']:.2f}, two-sided p = {c['p_value']:.4f} (takes impressions "
                     f"as independent; the intervals resample users, {r['bootstrap_resamples']:,} times)")
    if r["skipped_lines"]:
        lines.append(f"{r['skipped_lines']} line(s) of the log were not whole events and were skipped")
    return "\n".join(lines)
