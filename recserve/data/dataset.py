"""Encode raw logs into dense indices and feature tables, and split them by time.

Everything downstream (training, evaluation, export, serving tables) reads a `Dataset`;
it round-trips through one `.npz` file so artifacts are self-describing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recserve.data.raw import RawData
from recserve.errors import ArtifactError, DataError

TRAIN, VALID, TEST = 0, 1, 2
UPDATE = 3      # interactions folded in by `recserve update` after training: only the serve view knows them
YEAR_MIN, N_YEAR_BUCKETS = 1900, 32  # 5-year buckets from 1900; bucket 0 means "unknown"
HISTORY_LEN = 20


@dataclass
class Dataset:
    """Interactions sorted by (user, time), with dense ids and per-user / per-item feature tables.

    Item index `n_items` is the padding id used in history tensors.
    """

    user_ids: np.ndarray          # (U,) raw user id of each user index
    item_ids: np.ndarray          # (I,) raw item id of each item index
    titles: np.ndarray            # (I,) str
    genre_names: list[str]
    item_genres: np.ndarray       # (I, G) float32 multi-hot
    item_year: np.ndarray         # (I,) int64 year bucket, 0 = unknown
    user_cat_names: list[str]
    user_cat_vocab: dict[str, list[str]]  # value strings per attribute; index 0 is "<unknown>"
    user_cats: np.ndarray         # (U, C) int64, C >= 1 (a constant "none" column when there is no user file)
    users: np.ndarray             # (N,) int64 user index, sorted by user then time
    items: np.ndarray             # (N,) int64 item index
    timestamps: np.ndarray        # (N,) int64 unix seconds
    split: np.ndarray             # (N,) int8: TRAIN / VALID / TEST
    source: str = "unknown"
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_genres(self) -> int:
        return self.item_genres.shape[1]

    @property
    def user_cat_cards(self) -> list[int]:
        return [len(self.user_cat_vocab[n]) for n in self.user_cat_names]

    def mask(self, *splits: int) -> np.ndarray:
        return np.isin(self.split, splits)

    def item_popularity(self, *splits: int) -> np.ndarray:
        """log(1 + count) of each item over the given splits (float32, shape (I,))."""
        counts = np.bincount(self.items[self.mask(*splits)], minlength=self.n_items)
        return np.log1p(counts).astype(np.float32)

    def seen_csr(self, *splits: int) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, indices) of each user's distinct items over the given splits."""
        m = self.mask(*splits)
        return _csr(self.users[m], self.items[m], self.n_users)

    def last_history(self, *splits: int, length: int = HISTORY_LEN) -> np.ndarray:
        """(U, length) most recent items of each user over the splits, newest first, padded with n_items."""
        m = self.mask(*splits)
        u, it = self.users[m], self.items[m]
        out = np.full((self.n_users, length), self.n_items, dtype=np.int64)
        if len(u) == 0:
            return out
        # rows are sorted by (user, time): the k-th newest item is k places before each user's last row
        ends = np.searchsorted(u, np.arange(self.n_users), side="right")
        starts = np.searchsorted(u, np.arange(self.n_users), side="left")
        for k in range(length):
            pos = ends - 1 - k
            ok = pos >= starts
            out[ok, k] = it[pos[ok]]
        return out

    def rolling_history(self, rows: np.ndarray, length: int = HISTORY_LEN) -> np.ndarray:
        """(len(rows), length) items each user had *before* each row (same split rules: training rows only).

        Used for training examples, so a tower never sees the item it must predict.
        """
        train = self.mask(TRAIN)
        out = np.full((len(rows), length), self.n_items, dtype=np.int64)
        for k in range(1, length + 1):
            prev = rows - k
            ok = prev >= 0
            ok[ok] &= (self.users[prev[ok]] == self.users[rows[ok]]) & train[prev[ok]]
            out[ok, k - 1] = self.items[prev[ok]]
        return out

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        meta = {
            "genre_names": self.genre_names,
            "user_cat_names": self.user_cat_names,
            "user_cat_vocab": self.user_cat_vocab,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "extra": self.extra,
        }
        np.savez_compressed(
            path,
            user_ids=self.user_ids, item_ids=self.item_ids, titles=self.titles.astype(str),
            item_genres=self.item_genres, item_year=self.item_year, user_cats=self.user_cats,
            users=self.users, items=self.items, timestamps=self.timestamps, split=self.split,
            meta=np.array(json.dumps(meta)),
        )

    @classmethod
    def load(cls, path: Path) -> Dataset:
        if not Path(path).exists():
            raise ArtifactError(f"{path} is missing: run `recserve train --data DIR --out ARTIFACTS` first")
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        return cls(
            user_ids=z["user_ids"], item_ids=z["item_ids"], titles=z["titles"], genre_names=meta["genre_names"],
            item_genres=z["item_genres"], item_year=z["item_year"], user_cat_names=meta["user_cat_names"],
            user_cat_vocab=meta["user_cat_vocab"], user_cats=z["user_cats"], users=z["users"], items=z["items"],
            timestamps=z["timestamps"], split=z["split"], source=meta["source"], fingerprint=meta["fingerprint"],
            extra=meta.get("extra", {}),
        )


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.unique(np.stack([rows, cols], axis=1), axis=0) if len(rows) else np.zeros((0, 2), np.int64)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, pairs[:, 0] + 1, 1)
    return np.cumsum(indptr), pairs[:, 1].astype(np.int64)


def tie_order(user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random uint64 per (raw user id, raw item id): splitmix64 of their combination."""
    with np.errstate(over="ignore"):
        x = user_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + item_ids.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


TITLE_LEN, TITLE_VOCAB = 8, 4096   # title tokens per item (hashed into TITLE_VOCAB - 1 buckets; 0 pads)
_STOP = frozenset("the a an of and in on to for with at by from is it la le les de du des el los das der die und"
                  .split())


def title_tokens(titles, length: int = TITLE_LEN, vocab: int = TITLE_VOCAB) -> np.ndarray:
    """(I, length) int64 hashed word ids of each title, in order, 0-padded: lower case, letters and digits, no stop
    words, no years or other bare numbers (a title's "(1995)" is the year feature's business), each word once."""
    import re
    import zlib

    out = np.zeros((len(titles), length), np.int64)
    for i, title in enumerate(titles):
        words = []
        for w in re.findall(r"[a-z0-9]+", str(title).lower()):
            if w in _STOP or w.isdigit() or len(w) < 2 or w in words:
                continue
            words.append(w)
            if len(words) == length:
                break
        out[i, :len(words)] = [zlib.crc32(w.encode()) % (vocab - 1) + 1 for w in words]
    return out


def year_bucket(year: np.ndarray) -> np.ndarray:
    year = np.asarray(year, dtype=np.int64)
    b = np.clip((year - YEAR_MIN) // 5 + 1, 1, N_YEAR_BUCKETS - 1)
    return np.where(year > 0, b, 0).astype(np.int64)


def temporal_split(users: np.ndarray, test_frac: float = 0.2, valid_frac: float = 0.1) -> np.ndarray:
    """Per-user split of rows already sorted by (user, time).

    Each user's most recent `test_frac` (at least one) is TEST, the `valid_frac` before it VALID.
    A user with a single interaction keeps it in TRAIN: there is nothing to learn them from otherwise.
    """
    split = np.zeros(len(users), dtype=np.int8)
    if len(users) == 0:
        return split
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    n_test = np.where(counts >= 2, np.maximum(1, np.floor(counts * test_frac)), 0).astype(np.int64)
    n_valid = np.floor(counts * valid_frac).astype(np.int64)
    n_valid = np.minimum(n_valid, np.maximum(counts - n_test - 1, 0))
    pos = np.arange(len(users)) - np.repeat(starts, counts)  # position within the user's rows
    from_end = np.repeat(counts, counts) - pos                 # 1 for the newest row
    split[from_end <= np.repeat(n_test + n_valid, counts)] = VALID
    split[from_end <= np.repeat(n_test, counts)] = TEST
    return split


def fingerprint(raw: RawData) -> str:
    """Content hash of the interactions and item ids: two runs on the same data agree."""
    h = hashlib.sha256()
    r = raw.ratings
    for col in ("user_id", "item_id", "timestamp"):
        h.update(np.ascontiguousarray(r[col].to_numpy(np.int64)).tobytes())
    h.update(np.ascontiguousarray(raw.items["item_id"].to_numpy(np.int64)).tobytes())
    return h.hexdigest()[:16]


def build_dataset(raw: RawData) -> Dataset:
    """Encode a `RawData` into a `Dataset`: dense ids, feature tables, temporal split."""
    r = raw.ratings
    if len(r) == 0:
        raise DataError(f"{raw.source}: no interactions to train on (files: {', '.join(map(str, raw.files))})")
    # only items someone interacted with get an index: the rest can never be evaluated or learned
    # a repeated (user, item) keeps its earliest interaction, whatever the file's row order
    r = r.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "item_id"], keep="first")
    item_ids = np.unique(r["item_id"].to_numpy(np.int64))
    user_ids = np.unique(r["user_id"].to_numpy(np.int64))
    items_tab = raw.items.drop_duplicates("item_id").set_index("item_id").reindex(item_ids)
    missing = items_tab["title"].isna()
    if missing.any():
        raise DataError(
            f"{raw.source}: {int(missing.sum())} rated item ids have no row in the item file "
            f"(e.g. {int(item_ids[missing.to_numpy()][0])}); the ratings and item files do not belong together"
        )
    genre_names = sorted({g for gs in items_tab["genres"] for g in gs})
    gidx = {g: j for j, g in enumerate(genre_names)}
    item_genres = np.zeros((len(item_ids), max(1, len(genre_names))), dtype=np.float32)
    for i, gs in enumerate(items_tab["genres"]):
        for g in gs:
            item_genres[i, gidx[g]] = 1.0
    item_year = year_bucket(items_tab["year"].fillna(-1).to_numpy(np.int64))

    user_cat_names, user_cat_vocab, user_cats = _user_attributes(raw, user_ids)

    uidx = np.searchsorted(user_ids, r["user_id"].to_numpy(np.int64))
    iidx = np.searchsorted(item_ids, r["item_id"].to_numpy(np.int64))
    ts = r["timestamp"].to_numpy(np.int64)
    # by user, then time; equal timestamps by a fixed hash of (user id, item id): the split depends neither on
    # the file's row order nor on how the data set numbered its items (ordering ties by item id put the
    # higher ids of ML-100K's many same-second ratings into test: every model's ndcg@10 fell by 5-8%)
    order = np.lexsort((tie_order(r["user_id"].to_numpy(np.int64), r["item_id"].to_numpy(np.int64)), ts, uidx))
    users, items, ts = uidx[order], iidx[order], ts[order]
    return Dataset(
        user_ids=user_ids, item_ids=item_ids, titles=items_tab["title"].astype(str).to_numpy(),
        genre_names=genre_names or ["none"], item_genres=item_genres, item_year=item_year,
        user_cat_names=user_cat_names, user_cat_vocab=user_cat_vocab, user_cats=user_cats,
        users=users.astype(np.int64), items=items.astype(np.int64), timestamps=ts, split=temporal_split(users),
        source=raw.source, fingerprint=fingerprint(raw),
    )


def _user_attributes(raw: RawData, user_ids: np.ndarray) -> tuple[list[str], dict[str, list[str]], np.ndarray]:
    if raw.users is None or len(raw.users.columns) <= 1:
        return ["none"], {"none": ["<unknown>"]}, np.zeros((len(user_ids), 1), dtype=np.int64)
    tab = raw.users.drop_duplicates("user_id").set_index("user_id").reindex(user_ids)
    names = [c for c in tab.columns if c != "zip"]
    vocab, cols = {}, []
    for name in names:
        values = tab[name].astype("string").fillna("<unknown>")
        vocab[name] = ["<unknown>"] + sorted(set(values) - {"<unknown>"})
        lookup = {v: j for j, v in enumerate(vocab[name])}
        cols.append(values.map(lookup).to_numpy(np.int64))
    return names, vocab, np.stack(cols, axis=1)
