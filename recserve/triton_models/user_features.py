"""user_id (raw) -> the user tower's inputs, from the tables written at export.

Also the request's context: `hour` and `weekday` are optional in the ensemble; when a request leaves them
out, they are the current time in UTC (Monday = 0), so `curl` users can send just a user id and k.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from recserve.triton_models.base import BatchedModel, RequestError


def lookup_users(user_ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Dense index of each raw id in the sorted `known` ids; -1 where unknown."""
    pos = np.searchsorted(known, user_ids)
    pos = np.clip(pos, 0, len(known) - 1)
    return np.where(known[pos] == user_ids, pos, -1)


class TritonPythonModel(BatchedModel):
    INPUTS = ("user_id",)
    OPTIONAL = ("hour", "weekday")
    OUTPUTS = ("user_idx", "user_cats", "history", "context_hour", "context_weekday")

    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        z = np.load(version_dir / "user_features.npz")
        self.user_ids, self.user_cats, self.history = z["user_ids"], z["user_cats"], z["history"]

    def fill_defaults(self, inputs: dict[str, np.ndarray], rows: int) -> None:
        hour, weekday = now_context()
        inputs.setdefault("hour", np.full((rows, 1), hour, dtype=np.int64))
        inputs.setdefault("weekday", np.full((rows, 1), weekday, dtype=np.int64))

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        for name, high in (("hour", 23), ("weekday", 6)):
            bad = inputs[name][(inputs[name] < 0) | (inputs[name] > high)]
            if bad.size:
                raise RequestError(f"{name}={int(bad[0])} is out of range: choose 0..{high}")
        ids = inputs["user_id"].reshape(-1)
        idx = lookup_users(ids, self.user_ids)
        if (idx < 0).any():
            bad = int(ids[idx < 0][0])
            raise RequestError(f"unknown user_id {bad}: not among the {len(self.user_ids)} users this model "
                               "was trained on; recommend for a known user (ids as in the data set)")

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = lookup_users(inputs["user_id"].reshape(-1), self.user_ids)
        return {"user_idx": idx.reshape(-1, 1), "user_cats": self.user_cats[idx], "history": self.history[idx],
                "context_hour": inputs["hour"].reshape(-1, 1), "context_weekday": inputs["weekday"].reshape(-1, 1)}


def now_context() -> tuple[int, int]:
    """(hour, weekday) of the current UTC time, Monday = 0, as the client's defaults."""
    t = time.gmtime()
    return t.tm_hour, t.tm_wday
