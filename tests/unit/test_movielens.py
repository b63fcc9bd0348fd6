"""load_movielens on tiny fixtures written in each family's exact format, and every error it raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.data import load_movielens
from recserve.data.movielens import ML100K_GENRES, age_bucket
from recserve.errors import DataError

pytestmark = pytest.mark.unit

SHARED_ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "ml-100k"


def _flags(*genres: str) -> str:
    return "|".join("1" if name in genres else "0" for name in ML100K_GENRES)


U_DATA = "1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250951\n2\t30\t1\t881250952\n3\t20\t2\t881250953\n"
U_ITEM = (
    f"10|Café au lait (1994)|01-Jan-1994||http://us.imdb.com/x|{_flags('Comedy')}\n"
    f"20|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/y|{_flags('Drama', 'Romance')}\n"
    f"30|Untitled|01-Jan-1997||http://us.imdb.com/z|{_flags('unknown')}\n"
    f"40|unknown||||{_flags('unknown')}\n"
)
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|32067\n4|60|F|retired|00000\n"
U_GENRE = "".join(f"{name}|{i}\n" for i, name in enumerate(ML100K_GENRES)) + "\n"

RATINGS_DAT = "1::1193::5::978300760\n1::2::3::978302109\n2::3::4::978301968\n"
MOVIES_DAT = (
    "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
    "2::Amélie (2001)::Comedy|Romance\n"
    "3::Señor Nobody (1999)::Drama\n"
)
USERS_DAT = "1::F::1::10::48067\n2::M::56::16::70072\n"

RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n2,2,0.5,964982224\n"
MOVIES_CSV = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children\n"
    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
    '3,"Crème brûlée, ""The Film"" (2006–2007)",(no genres listed)\n'
    "4,Untitled,Drama\n"
)


def _write(directory: Path, files: dict[str, str], encoding: str = "latin-1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_bytes(text.encode(encoding))
    return directory


def _ml100k(tmp_path: Path, **overrides: str) -> Path:
    files = {"u.data": U_DATA, "u.item": U_ITEM, "u.user": U_USER, "u.genre": U_GENRE} | overrides
    return _write(tmp_path / "ml-100k", {k: v for k, v in files.items() if v is not None})


def _ml1m(tmp_path: Path, **overrides: str) -> Path:
    files = {"ratings.dat": RATINGS_DAT, "movies.dat": MOVIES_DAT, "users.dat": USERS_DAT} | overrides
    return _write(tmp_path / "ml-1m", files)


def _mlcsv(tmp_path: Path, **overrides: str) -> Path:
    files = {"ratings.csv": RATINGS_CSV, "movies.csv": MOVIES_CSV} | overrides
    return _write(tmp_path / "ml-latest-small", files, encoding="utf-8")


def _check_dtypes(raw) -> None:
    assert list(raw.ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(t) for t in raw.ratings.dtypes] == ["int64", "int64", "float32", "int64"]
    assert list(raw.items.columns) == ["item_id", "title", "genres", "year"]
    assert str(raw.items["item_id"].dtype) == "int64" and str(raw.items["year"].dtype) == "int64"
    assert all(isinstance(g, list) for g in raw.items["genres"])


# ---------------------------------------------------------------------------------------------------------------
# Loading each family


def test_ml100k_loads_every_field(tmp_path):
    raw = load_movielens(_ml100k(tmp_path))
    _check_dtypes(raw)
    assert raw.source == "ml-100k"
    assert raw.ratings.values.tolist() == [[1, 10, 5, 881250949], [1, 20, 3, 881250950], [2, 10, 4, 881250951],
                                           [2, 30, 1, 881250952], [3, 20, 2, 881250953]]
    items = raw.items.set_index("item_id")
    assert items.loc[10, "title"] == "Café au lait (1994)"
    assert items.loc[20, "genres"] == ["Drama", "Romance"]
    assert items["year"].to_dict() == {10: 1994, 20: 1995, 30: 1997, 40: -1}  # 30: from the release date
    users = raw.users.set_index("user_id")
    assert list(raw.users.columns) == ["user_id", "age", "gender", "occupation"]
    assert users["age"].to_dict() == {1: "18", 2: "50", 3: "1", 4: "56"}
    assert users.loc[2, "occupation"] == "other" and users.loc[3, "gender"] == "M"
    # User 4 has no ratings: kept in the user table, not an error.
    assert 4 in users.index and 4 not in set(raw.ratings["user_id"])
    assert [p.name for p in raw.files] == ["u.data", "u.item", "u.genre", "u.user"]


def test_ml100k_genre_names_come_from_u_genre(tmp_path):
    renamed = U_GENRE.replace("Comedy|5", "Funny|5")
    raw = load_movielens(_ml100k(tmp_path, **{"u.genre": renamed}))
    assert raw.items.set_index("item_id").loc[10, "genres"] == ["Funny"]


def test_ml100k_without_u_genre_uses_the_standard_names(tmp_path):
    directory = _ml100k(tmp_path)
    (directory / "u.genre").unlink()
    raw = load_movielens(directory)
    assert raw.items.set_index("item_id").loc[20, "genres"] == ["Drama", "Romance"]


def test_age_buckets_match_ml1m_codes():
    assert [age_bucket(a) for a in (7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73)] == [
        "1", "1", "18", "18", "25", "25", "35", "35", "45", "45", "50", "50", "56", "56"]  # fmt: skip


def test_ml1m_loads_latin1_titles_and_user_codes(tmp_path):
    raw = load_movielens(_ml1m(tmp_path))
    _check_dtypes(raw)
    assert raw.source == "ml-1m"
    assert raw.ratings["rating"].tolist() == [5.0, 3.0, 4.0]
    items = raw.items.set_index("item_id")
    assert items.loc[2, "title"] == "Amélie (2001)" and items.loc[3, "title"] == "Señor Nobody (1999)"
    assert items.loc[2, "genres"] == ["Comedy", "Romance"]
    assert items["year"].to_dict() == {1193: 1975, 2: 2001, 3: 1999}
    assert raw.users.to_dict("list") == {"user_id": [1, 2], "age": ["1", "56"], "gender": ["F", "M"],
                                         "occupation": ["10", "16"]}


def test_ml1m_without_users_dat_gives_no_user_table(tmp_path):
    directory = _ml1m(tmp_path)
    (directory / "users.dat").unlink()  # as in ML-10M, which has the ML-1M layout but no user file
    raw = load_movielens(directory)
    assert raw.users is None and len(raw.ratings) == 3


def test_csv_family_loads_quoted_titles_and_half_stars(tmp_path):
    raw = load_movielens(_mlcsv(tmp_path))
    _check_dtypes(raw)
    assert raw.source == "ml-csv" and raw.users is None
    assert raw.ratings["rating"].tolist() == [4.0, 4.5, 0.5]
    items = raw.items.set_index("item_id")
    assert items.loc[2, "title"] == "American President, The (1995)"
    assert items.loc[3, "title"] == 'Crème brûlée, "The Film" (2006–2007)'
    assert items.loc[3, "genres"] == []  # "(no genres listed)"
    assert items.loc[1, "genres"] == ["Adventure", "Animation", "Children"]
    assert items["year"].to_dict() == {1: 1995, 2: 1995, 3: 2006, 4: -1}


def test_stray_spaces_blank_lines_and_crlf_still_load(tmp_path):
    messy = "1\t10 \t5\t881250949\r\n\r\n 1\t20\t3\t881250950\r\n2\t10\t4\t881250951\n2\t30\t1\t881250952\n\n"
    raw = load_movielens(_ml100k(tmp_path, **{"u.data": messy}))
    assert raw.ratings[["user_id", "item_id"]].values.tolist() == [[1, 10], [1, 20], [2, 10], [2, 30]]
    assert str(raw.ratings["rating"].dtype) == "float32"


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the file, the line where there is one, and the fix


def _error(directory: Path) -> str:
    with pytest.raises(DataError) as info:
        load_movielens(directory)
    return str(info.value)


def test_missing_directory(tmp_path):
    message = _error(tmp_path / "nope")
    assert str(tmp_path / "nope") in message and "does not exist" in message


def test_no_recognised_family_lists_what_was_looked_for(tmp_path):
    _write(tmp_path / "empty", {"readme.txt": "hello"})
    message = _error(tmp_path / "empty")
    for name in ("u.data", "ratings.dat", "ratings.csv", "movies.csv"):
        assert name in message


def test_parent_folder_hints_at_the_data_folder(tmp_path):
    _ml1m(tmp_path)
    message = _error(tmp_path)
    assert f"Did you mean {tmp_path / 'ml-1m'}" in message


def test_two_families_in_one_folder(tmp_path):
    directory = _ml1m(tmp_path)
    _write(directory, {"ratings.csv": RATINGS_CSV})
    message = _error(directory)
    assert "more than one" in message and "ratings.dat" in message and "ratings.csv" in message


def test_required_file_of_the_family_missing(tmp_path):
    directory = _ml100k(tmp_path)
    (directory / "u.item").unlink()
    message = _error(directory)
    assert str(directory / "u.item") in message and "missing" in message


def test_wrong_separator_names_line_and_expected_separator(tmp_path):
    bad = U_DATA.replace("2\t10\t4\t881250951", "2,10,4,881250951")
    message = _error(_ml100k(tmp_path, **{"u.data": bad}))
    assert f"{tmp_path / 'ml-100k' / 'u.data'}, line 3:" in message
    assert "separated by tabs" in message and "looks separated by commas" in message


def test_single_colons_in_ratings_dat(tmp_path):
    message = _error(_ml1m(tmp_path, **{"ratings.dat": RATINGS_DAT + "3:1:2:978300000\n"}))
    assert "ratings.dat, line 4:" in message and "single colons" in message and "'::'" in message


def test_non_numeric_rating_names_the_line(tmp_path):
    bad = RATINGS_DAT.replace("1::2::3::978302109", "1::2::three::978302109")
    message = _error(_ml1m(tmp_path, **{"ratings.dat": bad}))
    assert f"{tmp_path / 'ml-1m' / 'ratings.dat'}, line 2:" in message
    assert "rating 'three' is not a number" in message and "UserID::MovieID::Rating::Timestamp" in message


def test_non_numeric_user_id_in_csv_counts_the_header_line(tmp_path):
    bad = RATINGS_CSV.replace("1,3,4.5,964981247", "x1,3,4.5,964981247")
    message = _error(_mlcsv(tmp_path, **{"ratings.csv": bad}))
    assert "ratings.csv, line 3:" in message and "user id 'x1' is not an integer" in message


def test_non_numeric_timestamp(tmp_path):
    bad = U_DATA.replace("881250953", "2001-01-01")
    message = _error(_ml100k(tmp_path, **{"u.data": bad}))
    assert "u.data, line 5:" in message and "timestamp '2001-01-01'" in message


def test_non_finite_rating(tmp_path):
    bad = RATINGS_CSV.replace("4.5", "nan")
    message = _error(_mlcsv(tmp_path, **{"ratings.csv": bad}))
    assert "ratings.csv, line 3:" in message and "rating 'nan'" in message


def test_missing_field(tmp_path):
    bad = U_DATA.replace("1\t20\t3\t881250950", "1\t20\t3")
    message = _error(_ml100k(tmp_path, **{"u.data": bad}))
    assert "u.data, line 2:" in message and "expected 4 fields" in message and "found 3" in message


def test_wrong_csv_header(tmp_path):
    message = _error(_mlcsv(tmp_path, **{"ratings.csv": RATINGS_CSV.replace("userId", "user")}))
    assert "ratings.csv, line 1:" in message and "userId,movieId,rating,timestamp" in message


def test_empty_ratings_file(tmp_path):
    message = _error(_ml1m(tmp_path, **{"ratings.dat": "\n"}))
    assert f"{tmp_path / 'ml-1m' / 'ratings.dat'}: holds no ratings" in message


def test_header_only_csv_is_empty(tmp_path):
    message = _error(_mlcsv(tmp_path, **{"ratings.csv": "userId,movieId,rating,timestamp\n"}))
    assert "ratings.csv: holds no ratings" in message


def test_every_row_bad_fails_on_the_first(tmp_path):
    message = _error(_ml100k(tmp_path, **{"u.data": "a b c d\ne f g h\n"}))
    assert "u.data, line 1:" in message


def test_ratings_naming_unknown_items(tmp_path):
    bad = U_DATA + "3\t99\t4\t881250954\n1\t99\t2\t881250955\n3\t98\t1\t881250956\n"
    message = _error(_ml100k(tmp_path, **{"u.data": bad}))
    assert "u.data, line 6:" in message and "item id 99 is not in" in message and "u.item" in message
    assert "3 ratings name 2 item ids" in message and "do not belong together" in message


def test_ratings_naming_unknown_users(tmp_path):
    message = _error(_ml1m(tmp_path, **{"ratings.dat": RATINGS_DAT + "7::2::4::978300000\n"}))
    assert "ratings.dat, line 4:" in message and "user id 7 is not in" in message and "users.dat" in message


def test_bad_u_item_line(tmp_path):
    bad = U_ITEM.replace("30|Untitled|01-Jan-1997||", "30|Untitled|01-Jan-1997|")
    message = _error(_ml100k(tmp_path, **{"u.item": bad}))
    assert f"{tmp_path / 'ml-100k' / 'u.item'}, line 3:" in message and "expected 24 fields" in message


def test_bad_genre_flag(tmp_path):
    bad = U_ITEM.replace(f"Les (1995)|01-Jan-1995||http://us.imdb.com/y|{_flags('Drama', 'Romance')}",
                         f"Les (1995)|01-Jan-1995||http://us.imdb.com/y|{_flags('Drama').replace('1', 'y')}")
    message = _error(_ml100k(tmp_path, **{"u.item": bad}))
    assert "u.item, line 2:" in message and "must be 0 or 1" in message


def test_unquoted_comma_in_movies_csv(tmp_path):
    bad = MOVIES_CSV.replace('"American President, The (1995)"', "American President, The (1995)")
    message = _error(_mlcsv(tmp_path, **{"movies.csv": bad}))
    assert "movies.csv, line 3:" in message and "found 4" in message and "double quotes" in message


def test_duplicate_movie_id(tmp_path):
    message = _error(_ml1m(tmp_path, **{"movies.dat": MOVIES_DAT + "2::Again (2002)::Drama\n"}))
    assert "movies.dat, line 4:" in message and "appears twice (first on line 2)" in message


def test_bad_user_line(tmp_path):
    message = _error(_ml100k(tmp_path, **{"u.user": U_USER.replace("2|53|F", "2|old|F")}))
    assert "u.user, line 2:" in message and "age 'old' is not an integer" in message


# ---------------------------------------------------------------------------------------------------------------
# The real ML-100K


@pytest.mark.ml100k
@pytest.mark.skipif(not SHARED_ML100K.is_dir(), reason=f"{SHARED_ML100K} is absent")
def test_real_ml100k():
    raw = load_movielens(SHARED_ML100K)
    assert (raw.ratings["user_id"].nunique(), len(raw.items), len(raw.ratings)) == (943, 1682, 100000)
    assert len(raw.users) == 943 and raw.ratings["rating"].between(1, 5).all()
    assert set(np.unique(raw.users["age"])) <= {"1", "18", "25", "35", "45", "50", "56"}
    assert raw.items.set_index("item_id").loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert (raw.items["year"] == -1).sum() == 1  # item 267 is "unknown" with no date
