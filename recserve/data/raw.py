"""The one shape every loader returns: raw ids, before any encoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class RawData:
    """Interaction logs plus side information, as read from disk.

    ratings: columns user_id (int64), item_id (int64), rating (float32), timestamp (int64, unix seconds).
    items:   columns item_id (int64), title (str), genres (list[str]), year (int64, -1 when unknown).
    users:   columns user_id (int64) plus categorical attribute columns as str (e.g. age, gender,
             occupation); None when the format has no user file.
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    source: str
    files: list[Path] = field(default_factory=list)
