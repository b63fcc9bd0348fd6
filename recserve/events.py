"""The event log of the feedback loop: impressions and clicks, appended as JSON lines, rotated by size.

`RecClient(event_log=PATH)` appends one `impression` per answered `recommend` (time, request id, user, items in
order, their propensities when exploring, source, model version, and the arm while an A/B split runs) and
`RecClient.click(rec, item)` one `click` (time, request id, user, item, its position in the answer, version).
A file past `max_bytes` is renamed `PATH.1` (`PATH.1` to `PATH.2`, ...; at most `keep` old files) and a new one
begun. `read_events` reads them oldest first; a torn last line (a crash in the middle of a write) is skipped
and counted, never fatal. `recserve ab report` reads this log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from recserve.errors import ClientError


class EventLog:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 64 << 20, keep: int = 10):
        if max_bytes < 1024 or keep < 1:
            raise ClientError(f"event log: max_bytes={max_bytes} (>= 1024) and keep={keep} (>= 1)")
        self.path, self.max_bytes, self.keep = Path(path), int(max_bytes), int(keep)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held until close()

    def write(self, event: dict) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **event}, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file.tell() + len(line) > self.max_bytes and self._file.tell() > 0:
                self._rotate()
            self._file.write(line)
            self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                if i == self.keep:
                    older.unlink()
                else:
                    older.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            self._file.close()


def log_files(path: Path) -> list[Path]:
    """The log and its rotated files, oldest first."""
    path = Path(path)
    rotated = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    return [*rotated, *([path] if path.exists() else [])]


def read_events(path: Path, skipped: list[int] | None = None) -> Iterator[dict]:
    """Every event of the log, oldest first. Lines that are not whole JSON objects are skipped (their count is
    appended to `skipped` when given)."""
    files = log_files(path)
    if not files:
        raise ClientError(f"no event log at {path}: pass the file RecClient(event_log=...) writes")
    bad = 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(event, dict) and "type" in event and "request_id" in event:
                    yield event
                else:
                    bad += 1
    if skipped is not None:
        skipped.append(bad)
