"""Load the MovieLens families (ML-100K, ML-1M, ML-20M/25M/latest) into :class:`RawData`.

The family is detected from the files present. Ratings files are read with pandas' C parser (ML-25M has 25M
rows); when that fast path meets anything unexpected, a line-by-line reader takes over, so that the error names
the exact file and line, and so that harmless oddities (stray spaces, blank lines) still load.
"""

from __future__ import annotations

import csv
import io
import math
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recserve.data.raw import RawData
from recserve.errors import DataError

# The 19 genres of ML-100K, in u.item flag order; used when u.genre is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# ML-1M's age codes: each is the lower bound of its bucket ("1" means under 18).
AGE_BUCKETS = ("1", "18", "25", "35", "45", "50", "56")
_AGE_LOWER_BOUNDS = (0, 18, 25, 35, 45, 50, 56)

NO_GENRES = "(no genres listed)"

_YEAR_IN_TITLE = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")
_YEAR_AT_END = re.compile(r"(\d{4})\s*$")
_INT = re.compile(r"[+-]?\d+")
_SEPARATOR_NAMES = {"\t": "tabs", "::": "'::'", ":": "single colons", "|": "'|'", ",": "commas", ";": "semicolons"}
_RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_RATINGS_DTYPES = {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
_USER_COLUMNS = ("user_id", "age", "gender", "occupation")


@dataclass(frozen=True)
class _Family:
    """The file names and layout of one MovieLens family."""

    source: str
    label: str
    ratings: str
    items: str
    users: str | None
    sep: str
    ratings_layout: str
    ratings_header: tuple[str, ...] | None = None


_FAMILIES = (
    _Family("ml-100k", "ML-100K", "u.data", "u.item", "u.user", "\t", "user id<TAB>item id<TAB>rating<TAB>timestamp"),
    _Family("ml-1m", "ML-1M", "ratings.dat", "movies.dat", "users.dat", "::", "UserID::MovieID::Rating::Timestamp"),
    _Family(
        "ml-csv", "ML-20M/25M/latest", "ratings.csv", "movies.csv", None, ",", "userId,movieId,rating,timestamp",
        ratings_header=("userId", "movieId", "rating", "timestamp"),
    ),
)  # fmt: skip


def load_movielens(data_dir: str | Path) -> RawData:
    """Read a MovieLens directory, detecting the family from the files it holds.

    Args:
        data_dir: The folder holding the unzipped files (``u.data``..., ``ratings.dat``... or ``ratings.csv``...).

    Returns:
        RawData with source ``"ml-100k"``, ``"ml-1m"`` or ``"ml-csv"``. ``users`` holds the columns user_id, age
        (ML-1M age code as str), gender and occupation (str); it is None for the csv family, and also when an
        ML-100K/ML-1M folder lacks its optional user file (ML-10M ships without one).

    Raises:
        DataError: The folder or a required file is missing, a line is malformed (the message names the file and
            line), there are no ratings, or the ratings name items or users the side files do not have.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data directory does not exist. Pass the folder holding the unzipped MovieLens files.")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a directory. Pass the folder holding the unzipped MovieLens files.")
    family = _detect_family(root)
    ratings_path, items_path = root / family.ratings, root / family.items
    for required in (ratings_path, items_path):
        if not required.is_file():
            raise DataError(
                f"{required}: missing; an {family.label} folder needs both {family.ratings} and {family.items}. "
                f"Re-extract the original {family.label} zip into {root}."
            )
    files = [ratings_path, items_path]
    if family.source == "ml-100k":
        genre_path = root / "u.genre"
        genres = _read_u_genre(genre_path) if genre_path.is_file() else list(ML100K_GENRES)
        files += [genre_path] if genre_path.is_file() else []
        items = _read_u_item(items_path, genres)
    elif family.source == "ml-1m":
        items = _read_movies_dat(items_path)
    else:
        items = _read_movies_csv(items_path)
    users = None
    users_path = root / family.users if family.users else None
    if users_path is not None and users_path.is_file():
        users = _read_u_user(users_path) if family.source == "ml-100k" else _read_users_dat(users_path)
        files.append(users_path)
    ratings = _read_ratings(ratings_path, family)
    _check_ids_known(ratings, "item_id", items["item_id"], ratings_path, items_path, family)
    if users is not None:
        _check_ids_known(ratings, "user_id", users["user_id"], ratings_path, users_path, family)
    return RawData(ratings=ratings, items=items, users=users, source=family.source, files=files)


# ---------------------------------------------------------------------------------------------------------------
# Family detection


def _detect_family(root: Path) -> _Family:
    """Pick the family whose ratings or item file is present; exactly one must match."""
    found = [f for f in _FAMILIES if (root / f.ratings).exists() or (root / f.items).exists()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(f"{f.label} ({f.ratings})" for f in found)
        raise DataError(f"{root}: holds files of more than one MovieLens family: {names}. Keep one family per folder.")
    looked_for = "; ".join(f"{f.ratings} + {f.items} ({f.label})" for f in _FAMILIES)
    hint = ""
    candidates = [d for d in sorted(root.iterdir()) if d.is_dir() and any((d / f.ratings).exists() for f in _FAMILIES)]
    if candidates:
        hint = f" Did you mean {candidates[0]}?"
    raise DataError(f"{root}: no MovieLens files found; looked for {looked_for}.{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Line-level helpers shared by every reader


def _error(path: Path, lineno: int, problem: str, fix: str) -> DataError:
    return DataError(f"{path}, line {lineno}: {problem} {fix}")


def _separator_hint(line: str, expected: str, n_fields: int) -> str:
    """Name the separator a malformed line seems to use instead of the expected one.

    A separator counts only when it splits the line into the right number of fields: titles hold commas and
    colons, so their mere presence says nothing.
    """
    for sep, name in _SEPARATOR_NAMES.items():
        if sep != expected and len(line.split(sep)) == n_fields:
            return f" The line looks separated by {name}, but this file must use {_SEPARATOR_NAMES[expected]}."
    return ""


def _split(line: str, sep: str) -> list[str]:
    return [field.strip() for field in line.split(sep)]


def _iter_lines(path: Path, encoding: str, skip_header: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, stripped text) for every non-blank line."""
    with path.open(encoding=encoding, errors="strict", newline=None) as handle:
        for lineno, raw in enumerate(handle, start=1):
            if skip_header and lineno == 1:
                continue
            line = raw.strip()
            if line:
                yield lineno, line


def _iter_records(
    path: Path, sep: str, n_fields: int, layout: str, encoding: str = "latin-1", skip_header: bool = False
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) and raise, naming the line, when a line has the wrong number of fields."""
    for lineno, line in _iter_lines(path, encoding, skip_header):
        fields = _split(line, sep)
        if len(fields) != n_fields:
            raise _error(
                path, lineno,
                f"expected {n_fields} fields separated by {_SEPARATOR_NAMES[sep]}, found {len(fields)} in {line!r}.",
                f"Each line must read {layout}; fix or delete this line.{_separator_hint(line, sep, n_fields)}",
            )  # fmt: skip
        yield lineno, fields


def _parse_int(text: str, what: str, path: Path, lineno: int, layout: str) -> int:
    if not _INT.fullmatch(text):
        raise _error(path, lineno, f"{what} {text!r} is not an integer.", f"Each line must read {layout}.")
    return int(text)


def _parse_rating(text: str, path: Path, lineno: int, layout: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _error(path, lineno, f"rating {text!r} is not a number.", f"Each line must read {layout}.")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Ratings


def _read_ratings(path: Path, family: _Family) -> pd.DataFrame:
    """Read a ratings file: pandas first, the line-by-line reader when pandas meets anything odd."""
    if family.ratings_header is not None:
        _check_header(path, family.ratings_header, family.ratings_layout)
    try:
        ratings = _read_ratings_fast(path, family)
    except (ValueError, UnicodeDecodeError):  # pandas' ParserError is a ValueError
        ratings = None
    if ratings is None or not np.isfinite(ratings["rating"].to_numpy()).all():
        ratings = _read_ratings_slow(path, family)
    if ratings.empty:
        raise DataError(f"{path}: holds no ratings. Each line must read {family.ratings_layout}.")
    return ratings


def _read_ratings_fast(path: Path, family: _Family) -> pd.DataFrame:
    source: Path | io.BytesIO = path
    sep = family.sep
    if sep == "::":
        # The C parser takes one-character separators only; \x1f (unit separator) never occurs in MovieLens text,
        # so a line with any other separator still fails to parse and reaches the line-by-line reader.
        source, sep = io.BytesIO(path.read_bytes().replace(b"::", b"\x1f")), "\x1f"
    ratings = pd.read_csv(
        source, sep=sep, header=None if family.ratings_header is None else 0, names=list(_RATING_COLUMNS),
        index_col=False, dtype=_RATINGS_DTYPES, engine="c", encoding="latin-1",
    )  # fmt: skip
    return ratings.reset_index(drop=True)


def _read_ratings_slow(path: Path, family: _Family) -> pd.DataFrame:
    """Parse line by line; raises on the first bad line. Used only when the fast path failed."""
    users, items, timestamps, ratings = array("q"), array("q"), array("q"), array("d")
    layout = family.ratings_layout
    skip_header = family.ratings_header is not None
    for lineno, fields in _iter_records(path, family.sep, 4, layout, skip_header=skip_header):
        users.append(_parse_int(fields[0], "user id", path, lineno, layout))
        items.append(_parse_int(fields[1], "item id", path, lineno, layout))
        ratings.append(_parse_rating(fields[2], path, lineno, layout))
        timestamps.append(_parse_int(fields[3], "timestamp", path, lineno, layout))
    return pd.DataFrame(
        {
            "user_id": np.frombuffer(users, dtype=np.int64),
            "item_id": np.frombuffer(items, dtype=np.int64),
            "rating": np.frombuffer(ratings, dtype=np.float64).astype(np.float32),
            "timestamp": np.frombuffer(timestamps, dtype=np.int64),
        }
    )


def _check_header(path: Path, expected: tuple[str, ...], layout: str) -> None:
    with path.open(encoding="latin-1") as handle:
        first = handle.readline().strip().lstrip("\ufeff")
    found = tuple(_split(first, ","))
    if found != expected:
        raise _error(path, 1, f"expected the header {','.join(expected)!r}, found {first!r}.",
                     f"The first line must be the header {layout!r}; restore it from the original download.")


def _check_ids_known(
    ratings: pd.DataFrame, column: str, known: pd.Series, ratings_path: Path, side_path: Path, family: _Family
) -> None:
    """Raise when ratings name ids the side file lacks: the files then come from different downloads."""
    unknown = ~np.isin(ratings[column].to_numpy(), known.to_numpy())
    if not unknown.any():
        return
    example = int(ratings[column].to_numpy()[unknown][0])
    n_ids = len(np.unique(ratings[column].to_numpy()[unknown]))
    what = "item" if column == "item_id" else "user"
    lineno = _find_line(ratings_path, family, 1 if column == "item_id" else 0, example)
    raise _error(
        ratings_path, lineno,
        f"{what} id {example} is not in {side_path} ({int(unknown.sum())} ratings name {n_ids} {what} ids "
        f"missing from it).",
        f"The files do not belong together: use {ratings_path.name} and {side_path.name} from the same download.",
    )  # fmt: skip


def _find_line(path: Path, family: _Family, field: int, value: int) -> int:
    """Line number of the first rating whose given field equals value (error path only)."""
    for lineno, line in _iter_lines(path, "latin-1", skip_header=family.ratings_header is not None):
        fields = _split(line, family.sep)
        if len(fields) > field and _INT.fullmatch(fields[field]) and int(fields[field]) == value:
            return lineno
    return 0  # unreachable for files the readers above accepted


# ---------------------------------------------------------------------------------------------------------------
# Items


def year_from_title(title: str, release_date: str = "") -> int:
    """Year from a trailing "(1995)" in the title, else from the end of the release date, else -1."""
    match = _YEAR_IN_TITLE.search(title) or _YEAR_AT_END.search(release_date)
    return int(match.group(1)) if match else -1


def _items_frame(ids: list[int], titles: list[str], genres: list[list[str]], years: list[int]) -> pd.DataFrame:
    items = pd.DataFrame({"item_id": np.asarray(ids, dtype=np.int64), "title": titles,
                          "genres": pd.Series(genres, dtype=object), "year": np.asarray(years, dtype=np.int64)})
    return items


def _check_unique(ids: dict[int, int], value: int, what: str, path: Path, lineno: int) -> None:
    if value in ids:
        raise _error(path, lineno, f"{what} {value} appears twice (first on line {ids[value]}).",
                     "Each id must appear once; delete the duplicate line.")
    ids[value] = lineno


def _read_u_genre(path: Path) -> list[str]:
    """Genre names of ML-100K in flag order, from ``genre|index`` lines."""
    by_index: dict[int, str] = {}
    for lineno, (name, index) in _iter_records(path, "|", 2, "genre|index"):
        by_index[_parse_int(index, "genre index", path, lineno, "genre|index")] = name
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise DataError(f"{path}: genre indices must run 0, 1, 2, ... without gaps; found {sorted(by_index)}. "
                        "Restore u.genre from the original ML-100K download.")
    return [by_index[i] for i in range(len(by_index))]


def _read_u_item(path: Path, genre_names: list[str]) -> pd.DataFrame:
    """ML-100K items: ``id|title|release date|video release date|IMDb URL|`` then one 0/1 flag per genre."""
    layout = f"item id|title|release date|video release date|IMDb URL|{len(genre_names)} genre flags (0 or 1)"
    ids, titles, genres, years, seen = [], [], [], [], {}
    for lineno, fields in _iter_records(path, "|", 5 + len(genre_names), layout):
        item_id = _parse_int(fields[0], "item id", path, lineno, layout)
        _check_unique(seen, item_id, "item id", path, lineno)
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise _error(path, lineno, f"genre flags must be 0 or 1, found {'|'.join(flags)!r}.",
                         f"Each line must read {layout}.")
        ids.append(item_id)
        titles.append(fields[1])
        genres.append([name for name, flag in zip(genre_names, flags) if flag == "1"])
        years.append(year_from_title(fields[1], fields[2]))
    return _items_frame(ids, titles, genres, years)


def _split_genres(text: str) -> list[str]:
    if text == NO_GENRES or not text:
        return []
    return [g.strip() for g in text.split("|") if g.strip()]


def _read_movies_dat(path: Path) -> pd.DataFrame:
    """ML-1M items: ``MovieID::Title (Year)::Genre1|Genre2`` (latin-1)."""
    layout = "MovieID::Title (Year)::Genre1|Genre2"
    ids, titles, genres, years, seen = [], [], [], [], {}
    for lineno, fields in _iter_records(path, "::", 3, layout):
        item_id = _parse_int(fields[0], "movie id", path, lineno, layout)
        _check_unique(seen, item_id, "movie id", path, lineno)
        ids.append(item_id)
        titles.append(fields[1])
        genres.append(_split_genres(fields[2]))
        years.append(year_from_title(fields[1]))
    return _items_frame(ids, titles, genres, years)


def _decode(path: Path) -> str:
    """Text of a csv file: UTF-8 as GroupLens writes it, latin-1 for files re-saved by older tools."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_movies_csv(path: Path) -> pd.DataFrame:
    """ML-20M/25M/latest items: header ``movieId,title,genres``; titles with commas are quoted."""
    layout = 'movieId,title,genres (titles with commas in double quotes, genres separated by "|")'
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    header = next(reader, [])
    if [h.strip() for h in header] != ["movieId", "title", "genres"]:
        raise _error(path, 1, f"expected the header 'movieId,title,genres', found {','.join(header)!r}.",
                     "Restore the first line from the original download.")
    ids, titles, genres, years, seen = [], [], [], [], {}
    for row in reader:
        lineno = reader.line_num
        if not row or all(not field.strip() for field in row):
            continue
        if len(row) != 3:
            raise _error(path, lineno, f"expected 3 comma-separated fields, found {len(row)} in {','.join(row)!r}.",
                         f"Each line must read {layout}.")
        item_id = _parse_int(row[0].strip(), "movie id", path, lineno, layout)
        _check_unique(seen, item_id, "movie id", path, lineno)
        ids.append(item_id)
        titles.append(row[1].strip())
        genres.append(_split_genres(row[2].strip()))
        years.append(year_from_title(row[1]))
    return _items_frame(ids, titles, genres, years)


# ---------------------------------------------------------------------------------------------------------------
# Users


def age_bucket(age: int) -> str:
    """Map an age in years to ML-1M's age code: the lower bound of its bucket, as str ("1" is under 18)."""
    index = int(np.searchsorted(_AGE_LOWER_BOUNDS, age, side="right")) - 1
    return AGE_BUCKETS[max(index, 0)]


def _users_frame(ids: list[int], ages: list[str], genders: list[str], occupations: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": np.asarray(ids, dtype=np.int64), "age": ages, "gender": genders,
                         "occupation": occupations}, columns=list(_USER_COLUMNS))


def _read_u_user(path: Path) -> pd.DataFrame:
    """ML-100K users: ``id|age|gender|occupation|zip``; ages are bucketed like ML-1M's."""
    layout = "user id|age|gender|occupation|zip code"
    ids, ages, genders, occupations, seen = [], [], [], [], {}
    for lineno, fields in _iter_records(path, "|", 5, layout):
        user_id = _parse_int(fields[0], "user id", path, lineno, layout)
        _check_unique(seen, user_id, "user id", path, lineno)
        ids.append(user_id)
        ages.append(age_bucket(_parse_int(fields[1], "age", path, lineno, layout)))
        genders.append(fields[2])
        occupations.append(fields[3])
    return _users_frame(ids, ages, genders, occupations)


def _read_users_dat(path: Path) -> pd.DataFrame:
    """ML-1M users: ``UserID::Gender::Age::Occupation::Zip-code``; age and occupation are codes, kept as str."""
    layout = "UserID::Gender::Age::Occupation::Zip-code"
    ids, ages, genders, occupations, seen = [], [], [], [], {}
    for lineno, fields in _iter_records(path, "::", 5, layout):
        user_id = _parse_int(fields[0], "user id", path, lineno, layout)
        _check_unique(seen, user_id, "user id", path, lineno)
        ids.append(user_id)
        genders.append(fields[1])
        ages.append(fields[2])
        occupations.append(fields[3])
    return _users_frame(ids, ages, genders, occupations)
