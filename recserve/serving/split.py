"""The A/B split's arithmetic, one definition for the served model, the client and `recserve ab`: a user's arm is
`crc32(salt:user_id) % BUCKETS < share * BUCKETS` ("b") else "a" (recserve/serving/frontdoor.lua computes the same
for HTTP). numpy-free, so the served step imports it cheaply."""

from __future__ import annotations

import json
import zlib

BUCKETS = 10000
PARAMETER = "recserve_ab"      # recommend's config parameter that holds the running split (`recserve ab start`)
PIN = "recserve_pin"           # a request parameter: serve this request by the version it reached, never forwarded


def arm(user_id: int, share: float, salt: str) -> str:
    """The arm of one user, as the front door computes it."""
    return "b" if zlib.crc32(f"{salt}:{int(user_id)}".encode()) % BUCKETS < round(share * BUCKETS) else "a"


def read_split(params: dict[str, str]) -> dict | None:
    """The split a model config's parameters carry ({"a", "b", "share", "salt"}), or None."""
    raw = params.get(PARAMETER, "")
    return json.loads(raw) if raw else None


def version_of(split: dict, user_id: int) -> int:
    """The model version that serves this user while the split runs."""
    return int(split[arm(user_id, float(split["share"]), str(split["salt"]))])
