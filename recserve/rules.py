"""Request-time business rules and exploration, applied AFTER ranking. numpy only (no torch, onnx or Triton).

Input: each row's ranked list as the served path returns it: `item_ids` (B, N) int64 raw ids, best first, PAD_ID
(-1) past the end, and `scores` (B, N) float32, the ranker's scores (descending; padding PAD_SCORE).
Output of `apply_rules`: (B, k) item ids, their scores and propensities; PAD_ID / PAD_SCORE / 0.0 where a row
has fewer than k items left. Item metadata (genres, year, vectors) comes from an `ItemTable`.

Semantics, per row:

1. Candidates: the row's ids minus padding (id < 0) and minus `Rules.exclude`. Ids the table does not know
   are kept: they have no genre, no year boost (0) and a zero vector (similarity 0 to everything). Repeated
   ids are not merged (the ranker returns distinct ids).
2. Relevance: rel = score + freshness * f(item), f = (year - min_year) / (max_year - min_year), min / max over
   the whole catalogue (the table), so f is in [0, 1], 0 for the oldest and for unknown ids; when every year
   is the same (e.g. all zero: no years in the data) f is 0 and the boost is a no-op. A year bucket 0
   ("unknown" in recserve.data) therefore counts as the oldest. Scores are used on their raw scale (the
   ranker's are logits of a listwise softmax), so `freshness` is in score units. NaN / infinite scores are
   clamped to the float32 range (NaN and -inf: the lowest).
3. Greedy selection, position by position, t = 0 .. k-1. The ALLOWED set at t: the candidates not yet picked
   that do not break the genre cap given the picks so far (with max_per_genre = c > 0 an item is allowed only
   when each of its genres has fewer than c picks; an item counts towards every one of its genres; items with
   no genre are never capped). An empty allowed set ends the row: the rest is padding.
   Adjusted relevance at t:  a = rel                                     when mmr_lambda == 1 (MMR off),
                             a = λ·rel' − (1 − λ)·max_{p picked} sim(item, p)   otherwise (max over none = 0),
   with rel' = rel min-max scaled to [0, 1] over the row's candidates (0 when they are all equal), so that
   relevance and similarity (in [-1, 1]) are on one scale whatever the ranker's score units;
   sim = dot of the table's item vectors (normalised to unit length once) or, without vectors, the Jaccard
   similarity of the genre sets (0 when both are empty). Greedy choice: the allowed item with the largest a,
   ties to the earlier input rank.
4. Exploration (`explore`):
     "none"     the greedy choice; propensity 1.0.
     "epsilon"  with probability 1 − ε the greedy choice, with probability ε one allowed item uniformly at
                random (possibly the greedy one): P(greedy) = 1 − ε + ε/|A|, P(other allowed) = ε/|A|.
     "softmax"  one item drawn from softmax(a / temperature) over the allowed set A, on the raw scale of a
                (not standardised: with T = 1 and MMR / freshness off this is the ranker's own softmax);
                position after position without replacement, i.e. Plackett–Luce.
   PROPENSITY of a returned item = the probability the policy had of choosing THAT item AT THAT position,
   given the items already chosen before it in the row (what inverse-propensity scoring divides by); the
   probability of the whole list is the product over its positions. Padding: 0.0.
5. RNG: row r of a request draws from np.random.default_rng([seed, r]) (a SeedSequence keyed by the pair),
   two uniforms per position, taken up front: u_t decides (ε-greedy: explore when u_t < ε; softmax: inverse
   CDF at u_t), v_t picks the uniform item (index floor(v_t·|A|) among A in input order). So a row's output
   depends only on (seed, row index, its inputs, the rules), not on the batch size, and a larger k only
   appends positions. seed=None: fresh OS entropy per call (nondeterministic). No draws without exploration.
6. Without a re-ordering rule (max_per_genre = 0, mmr_lambda = 1, freshness = 0, explore "none") the input
   order is kept as is: the first k non-padding, non-excluded ids, propensity 1.0 (a cheap vectorised path).

Returned scores are the ranker's scores of the returned items (not the adjusted relevance), so when the rules
re-order they need not be descending. Rows are processed together, one vectorised step per position.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from recserve.ranking import PAD_ID, PAD_SCORE

EXPLORE = ("none", "epsilon", "softmax")
_LOW, _HIGH = float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Item metadata the rules read, one row per item, rows in ascending raw id."""

    item_ids: np.ndarray              # (I,) int64 raw ids, strictly increasing
    genres: np.ndarray                # (I, G) 0/1 multi-hot (float or bool); an item may have none or several
    year: np.ndarray                  # (I,) int year or year bucket, bigger = newer; may be all zeros
    vectors: np.ndarray | None = None  # (I, D) item vectors for MMR; None: MMR uses genre Jaccard similarity
    year_range: tuple[float, float] | None = None   # the catalogue's (min, max) year when the table holds a part

    def __post_init__(self) -> None:
        ids = np.asarray(self.item_ids, dtype=np.int64)
        genres = np.asarray(self.genres)
        year = np.asarray(self.year)
        if ids.ndim != 1:
            raise ValueError(f"item_ids must be 1-D, got shape {ids.shape}")
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("item_ids must be strictly increasing (sorted, distinct); use ItemTable.build")
        if genres.ndim != 2 or len(genres) != len(ids):
            raise ValueError(f"genres must be ({len(ids)}, G), got shape {genres.shape}")
        if year.shape != ids.shape:
            raise ValueError(f"year must be ({len(ids)},), got shape {year.shape}")
        object.__setattr__(self, "item_ids", ids)
        object.__setattr__(self, "genres", genres)
        object.__setattr__(self, "year", year)
        if self.vectors is not None:
            vec = np.asarray(self.vectors, dtype=np.float32)
            if vec.ndim != 2 or len(vec) != len(ids):
                raise ValueError(f"vectors must be ({len(ids)}, D), got shape {vec.shape}")
            object.__setattr__(self, "vectors", vec)

    @classmethod
    def build(cls, item_ids, genres, year, vectors=None, year_range=None) -> ItemTable:
        """A table from rows in any order (sorted here by raw id; a repeated id is kept once)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        _, order = np.unique(ids, return_index=True)
        vec = None if vectors is None else np.asarray(vectors)[order]
        return cls(ids[order], np.asarray(genres)[order], np.asarray(year)[order], vec, year_range)

    @classmethod
    def from_npz(cls, path: str | Path, vectors: np.ndarray | None = None) -> ItemTable:
        """From an exported `item_features.npz` (item_ids, genres, year, ...); `vectors` in its row order."""
        with np.load(path, allow_pickle=False) as f:
            return cls.build(f["item_ids"], f["genres"], f["year"], vectors)

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Raw ids (any shape) -> row index in the table, -1 where unknown (padding included)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.item_ids) == 0:
            return np.full(ids.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, ids), len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == ids, pos, -1).astype(np.int64)

    # Per-row features with one extra all-zero row at the end, so that row index -1 (unknown) reads zeros.
    @cached_property
    def genre_ext(self) -> np.ndarray:
        """(I + 1, G) float32 0/1."""
        g = (self.genres != 0).astype(np.float32)
        return np.concatenate([g, np.zeros((1, g.shape[1]), np.float32)])

    @cached_property
    def fresh_ext(self) -> np.ndarray:
        """(I + 1,) float64: (year - min) / (max - min) over the catalogue, 0 when all years are equal."""
        y = self.year.astype(np.float64)
        if self.year_range is not None:
            lo, hi = (float(v) for v in self.year_range)
        else:
            lo, hi = (float(y.min()), float(y.max())) if len(y) else (0.0, 0.0)
        f = (y - lo) / (hi - lo) if hi > lo else np.zeros_like(y)
        return np.append(f, 0.0)

    @cached_property
    def vector_ext(self) -> np.ndarray | None:
        """(I + 1, D) float32 unit vectors (zero vectors stay zero), or None."""
        if self.vectors is None:
            return None
        norm = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        v = np.where(norm > 0, self.vectors / np.where(norm > 0, norm, 1), 0).astype(np.float32)
        return np.concatenate([v, np.zeros((1, v.shape[1]), np.float32)])


def rules_from_options(option, exclude=()) -> Rules:
    """One request row's Rules from `recommend`'s option tensors (spec.OPTIONS), as the served model and the
    client's pipeline mode both read them. `option(name, default)` gives one scalar; `explore` is the index of the
    mode in EXPLORE (0 off, 1 epsilon-greedy, 2 softmax), checked by the caller; `explore_param` is epsilon or the
    temperature. ValueError names a bad value."""
    mode = EXPLORE[int(option("explore", 0))]
    param = float(option("explore_param", 0.1 if mode == "epsilon" else 1.0))
    return Rules(exclude=tuple(int(x) for x in exclude), max_per_genre=int(option("max_per_genre", 0)),
                 mmr_lambda=float(option("mmr_lambda", 1.0)), freshness=float(option("freshness", 0.0)),
                 explore=mode, epsilon=param if mode == "epsilon" else 0.1,
                 temperature=param if mode == "softmax" else 1.0,
                 seed=int(option("seed", 0)) if mode != "none" else None)


@dataclass(frozen=True)
class Rules:
    """One request's rules; every field's default is "off". Invalid values raise ValueError on construction."""

    exclude: tuple[int, ...] = ()     # raw item ids never returned
    max_per_genre: int = 0            # 0 = off; else at most this many returned items share any one genre
    mmr_lambda: float = 1.0           # 1 = off; < 1: MMR, a = λ·rel − (1−λ)·max sim to the items picked
    freshness: float = 0.0            # 0 = off; relevance += freshness * normalised year (score units)
    explore: str = "none"             # "none" | "epsilon" | "softmax"
    epsilon: float = 0.1              # ε of "epsilon"
    temperature: float = 1.0          # T of "softmax", over the raw adjusted relevance
    seed: int | None = None           # per-request seed (int >= 0); None = nondeterministic

    def __post_init__(self) -> None:
        try:
            exclude = tuple(sorted({operator.index(x) for x in self.exclude}))
        except TypeError as e:
            raise ValueError(f"exclude must be a sequence of integer item ids, got {self.exclude!r}") from e
        object.__setattr__(self, "exclude", exclude)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its allowed range."""
        if isinstance(self.max_per_genre, bool) or not isinstance(self.max_per_genre, (int, np.integer)) \
                or self.max_per_genre < 0:
            raise ValueError(f"max_per_genre must be an integer >= 0 (0 = off), got {self.max_per_genre!r}")
        _in_range("mmr_lambda", self.mmr_lambda, "in [0, 1]", lambda x: 0.0 <= x <= 1.0)
        _in_range("freshness", self.freshness, "a finite number", lambda x: True)
        if self.explore not in EXPLORE:
            raise ValueError(f"explore must be one of {', '.join(map(repr, EXPLORE))}, got {self.explore!r}")
        _in_range("epsilon", self.epsilon, "in [0, 1]", lambda x: 0.0 <= x <= 1.0)
        _in_range("temperature", self.temperature, "> 0", lambda x: x > 0.0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @property
    def deterministic(self) -> bool:
        """True when there is no exploration: the answer depends on the inputs only (cacheable)."""
        return self.explore == "none"

    @property
    def reorders(self) -> bool:
        """False when the output is simply the first k kept ids of the input (the fast path)."""
        return self.max_per_genre > 0 or self.mmr_lambda < 1.0 or self.freshness != 0.0 or self.explore != "none"

    @property
    def needs_items(self) -> bool:
        """True when the rules read item metadata (genre cap, MMR, freshness)."""
        return self.max_per_genre > 0 or self.mmr_lambda < 1.0 or self.freshness != 0.0

    @classmethod
    def parse_explore(cls, text: str) -> dict:
        """"none" | "epsilon:<ε in [0, 1]>" | "softmax:<T > 0>" -> the matching Rules fields, as a dict."""
        spec = str(text).strip().lower()
        name, sep, value = spec.partition(":")
        name, value = name.strip(), value.strip()
        if name == "none" and not sep:
            return {"explore": "none"}
        fields = {"epsilon": "epsilon", "softmax": "temperature"}
        if name not in fields or not value:
            raise ValueError(f"explore must be 'none', 'epsilon:<epsilon in [0, 1]>' or "
                             f"'softmax:<temperature > 0>', got {text!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"explore {name!r}: {fields[name]} must be a number, got {value!r}") from None
        out = {"explore": name, fields[name]: number}
        cls(**out)            # validates the range, naming the field
        return out


def apply_rules(item_ids: np.ndarray, scores: np.ndarray, k: int, rules: Rules,
                items: ItemTable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, N) ranked ids / scores -> (B, k) ids (int64), scores (float32), propensities (float32).

    Rows with fewer than k items left are padded with PAD_ID / PAD_SCORE / 0.0. See the module docstring.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    sc = np.asarray(scores, dtype=np.float32)
    if ids.ndim != 2 or sc.shape != ids.shape:
        raise ValueError(f"item_ids and scores must both be (B, N), got {ids.shape} and {sc.shape}")
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if rules.needs_items and items is None:
        raise ValueError("these rules (genre cap, MMR or freshness) need an ItemTable")
    drop = ids < 0
    if rules.exclude:
        ex = np.asarray(rules.exclude, dtype=np.int64)
        drop |= (ids[..., None] == ex).any(-1) if len(ex) <= 32 else np.isin(ids, ex)   # isin sorts: slow when small
    if not rules.reorders:
        return _first_k(ids, sc, drop, k)
    return _greedy(ids, sc, ~drop, k, rules, items)


def _first_k(ids: np.ndarray, sc: np.ndarray, drop: np.ndarray, k: int):
    """The first k kept ids of each row in input order, propensity 1."""
    b, n = ids.shape
    if drop.any():
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]     # kept ids first, in their order
        keep = ~np.take_along_axis(drop, order, 1)
        out_ids = np.where(keep, np.take_along_axis(ids, order, 1), PAD_ID)
        out_sc = np.where(keep, np.take_along_axis(sc, order, 1), PAD_SCORE).astype(np.float32)
    else:
        keep = np.ones((b, min(k, n)), bool)
        out_ids, out_sc = ids[:, :k].copy(), sc[:, :k].copy()
    prop = keep.astype(np.float32)
    if out_ids.shape[1] < k:
        extra = k - out_ids.shape[1]
        out_ids = np.concatenate([out_ids, np.full((b, extra), PAD_ID, np.int64)], 1)
        out_sc = np.concatenate([out_sc, np.full((b, extra), PAD_SCORE, np.float32)], 1)
        prop = np.concatenate([prop, np.zeros((b, extra), np.float32)], 1)
    return out_ids, out_sc, prop


def _greedy(ids, sc, valid, k, rules: Rules, items: ItemTable | None):
    b, n = ids.shape
    out_pos = np.full((b, k), -1, np.int64)
    out_prop = np.zeros((b, k), np.float32)
    n_pos = min(k, n)
    rows = items.rows(ids) if items is not None else np.full(ids.shape, -1, np.int64)
    rel = np.nan_to_num(sc.astype(np.float64), nan=_LOW, neginf=_LOW, posinf=_HIGH)
    if rules.freshness != 0.0:
        rel = rel + rules.freshness * items.fresh_ext[rows]
    cap = int(rules.max_per_genre)
    lam = float(rules.mmr_lambda)
    mmr = lam < 1.0
    gen = items.genre_ext[rows] if cap or (mmr and items.vector_ext is None) else None    # (B, N, G)
    vec = items.vector_ext[rows] if mmr and items.vector_ext is not None else None       # (B, N, D)
    gsize = gen.sum(2) if gen is not None and vec is None and mmr else None               # (B, N)
    explore, eps, temp = rules.explore, float(rules.epsilon), float(rules.temperature)
    draws = _draws(rules.seed, b, n_pos) if explore != "none" else None                  # (B, n_pos, 2)

    ar = np.arange(b)
    cols = np.arange(n)
    picked = np.zeros((b, n), bool)
    counts = np.zeros((b, gen.shape[2]), np.float32) if cap else None
    maxsim = np.full((b, n), -np.inf)
    if mmr:   # relevance min-max scaled to [0, 1] over the row's candidates: comparable with a similarity
        lo = np.where(valid, rel, np.inf).min(1, keepdims=True)
        hi = np.where(valid, rel, -np.inf).max(1, keepdims=True)
        span = np.where(np.isfinite(hi - lo) & (hi > lo), hi - lo, 1.0)
        rel = np.where(valid & (hi > lo), (rel - np.where(np.isfinite(lo), lo, 0.0)) / span, 0.0)
    adj = lam * rel if mmr else rel
    for t in range(n_pos):
        allowed = valid & ~picked
        if cap:
            full = (counts >= cap).astype(np.float32)                                     # (B, G)
            allowed &= (gen @ full[:, :, None])[:, :, 0] == 0
        cnt = allowed.sum(1)
        has = cnt > 0
        if not has.any():
            break
        if mmr and t > 0:
            adj = lam * rel - (1.0 - lam) * maxsim
        masked = np.where(allowed, adj, -np.inf)
        greedy = np.argmax(masked, 1)
        if explore == "none":
            pick, prop = greedy, np.ones(b)
        elif explore == "epsilon":
            safe = np.maximum(cnt, 1)
            j = np.minimum((draws[:, t, 1] * safe).astype(np.int64), safe - 1)         # j-th allowed item
            uniform = np.argmax(np.cumsum(allowed, 1) > j[:, None], 1)
            pick = np.where(draws[:, t, 0] < eps, uniform, greedy)
            prop = np.where(pick == greedy, 1.0 - eps + eps / safe, eps / safe)
        else:
            z = masked / temp
            top = np.where(has, z[ar, greedy], 0.0)
            p = np.where(allowed, np.exp(z - top[:, None]), 0.0)
            cum = np.cumsum(p, 1)
            total = np.where(has, cum[:, -1], 1.0)
            last = n - 1 - np.argmax((p > 0)[:, ::-1], 1)                                # guards u·total == total
            pick = np.minimum((cum <= (draws[:, t, 0] * total)[:, None]).sum(1), last)
            prop = p[ar, pick] / total
        pick = np.where(has, pick, 0)
        out_pos[:, t] = np.where(has, pick, -1)
        out_prop[:, t] = np.where(has, prop, 0.0)
        picked |= (cols[None, :] == pick[:, None]) & has[:, None]
        if cap:
            counts += gen[ar, pick] * has[:, None]
        if mmr:
            if vec is not None:
                sim = (vec @ vec[ar, pick][:, :, None])[:, :, 0].astype(np.float64)
            else:
                inter = (gen @ gen[ar, pick][:, :, None])[:, :, 0]
                union = gsize + gsize[ar, pick][:, None] - inter
                sim = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0).astype(np.float64)
            maxsim = np.where(has[:, None], np.maximum(maxsim, sim), maxsim)

    keep = out_pos >= 0
    safe_pos = np.maximum(out_pos, 0)
    out_ids = np.where(keep, np.take_along_axis(ids, safe_pos, 1) if n else PAD_ID, PAD_ID)
    out_sc = np.where(keep, np.take_along_axis(sc, safe_pos, 1) if n else PAD_SCORE, PAD_SCORE).astype(np.float32)
    return out_ids.astype(np.int64), out_sc, out_prop


def _draws(seed: int | None, b: int, n_pos: int) -> np.ndarray:
    """(B, n_pos, 2) uniforms: row r from default_rng([seed, r]), position t its draws 2t and 2t + 1."""
    if seed is None:
        seed = np.random.SeedSequence().entropy
    seed = int(seed)
    return np.stack([np.random.default_rng([seed, r]).random((n_pos, 2)) for r in range(b)]) if b \
        else np.zeros((0, n_pos, 2))


def _in_range(name: str, value, allowed: str, ok) -> None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x) or not ok(x):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
