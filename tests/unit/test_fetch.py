"""fetch() against a fake GroupLens server: requests.get is monkeypatched; no network is used."""

from __future__ import annotations

import hashlib
import importlib
import io
import zipfile
from pathlib import Path

import pytest
import requests

from recserve.data import fetch, load_movielens
from recserve.errors import DataError

pytestmark = pytest.mark.unit

# recserve.data re-exports the function under the module's name, so attribute access gives the function.
fetch_module = importlib.import_module("recserve.data.fetch")
URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GENRE_FLAGS = "|".join(["0"] * 18 + ["1"])


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text.encode("latin-1"))
    return buffer.getvalue()


ML100K_ZIP = _zip({
    "ml-100k/u.data": "1\t1\t5\t881250949\n2\t1\t3\t881250950\n",
    "ml-100k/u.item": f"1|Café (1995)|01-Jan-1995||http://x|{GENRE_FLAGS}\n",
    "ml-100k/u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n",
})  # fmt: skip


class FakeResponse:
    """The parts of requests.Response that fetch uses."""

    def __init__(self, body: bytes, status_code: int = 200, content_length: int | None = None):
        self.body, self.status_code = body, status_code
        self.headers = {"content-length": str(len(body) if content_length is None else content_length)}
        self.closed = False

    def iter_content(self, chunk_size: int):
        for start in range(0, len(self.body), 7):  # small chunks, to exercise the streaming loop
            yield self.body[start : start + 7]

    @property
    def text(self) -> str:
        return self.body.decode()

    def close(self) -> None:
        self.closed = True


class FakeServer:
    """Maps URLs to responses and records what was asked for."""

    def __init__(self, routes: dict[str, FakeResponse]):
        self.routes, self.calls = routes, []

    def get(self, url: str, stream: bool = False, timeout: float | None = None) -> FakeResponse:
        assert timeout is not None  # a download must never hang forever
        self.calls.append(url)
        return self.routes.get(url) or FakeResponse(b"not found", status_code=404)


def _serve(monkeypatch, body: bytes = ML100K_ZIP, md5: str | None = None, **response_args) -> FakeServer:
    digest = hashlib.md5(body).hexdigest() if md5 is None else md5
    server = FakeServer({URL: FakeResponse(body, **response_args),
                         URL + ".md5": FakeResponse(f"MD5 (ml-100k.zip) = {digest}\n".encode())})
    monkeypatch.setattr(requests, "get", server.get)
    return server


def _nothing_left(cache: Path) -> bool:
    return not cache.exists() or not any(cache.iterdir())


def test_downloads_verifies_md5_and_extracts(monkeypatch, tmp_path):
    server = _serve(monkeypatch)
    path = fetch("ml-100k", cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "ml-100k"
    assert server.calls == [URL, URL + ".md5"]
    assert all(r.closed for r in server.routes.values())
    raw = load_movielens(path)
    assert len(raw.ratings) == 2 and raw.items.loc[0, "title"] == "Café (1995)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k"]  # the scratch folder is gone


def test_second_call_skips_the_download(monkeypatch, tmp_path):
    _serve(monkeypatch)
    first = fetch("ml-100k", cache_dir=tmp_path, progress=False)

    def no_network(*args, **kwargs):
        raise AssertionError("fetch went to the network for an extracted dataset")

    monkeypatch.setattr(requests, "get", no_network)
    assert fetch("ml-100k", cache_dir=tmp_path, progress=False) == first


def test_half_extracted_folder_is_replaced(monkeypatch, tmp_path):
    stale = tmp_path / "ml-100k"
    stale.mkdir()
    (stale / "u.data").write_text("garbage from an interrupted run")
    _serve(monkeypatch)
    path = fetch("ml-100k", cache_dir=tmp_path, progress=False)
    assert (path / "u.data").read_text().startswith("1\t1\t5")


def test_md5_mismatch_is_refused_and_leaves_nothing(monkeypatch, tmp_path):
    _serve(monkeypatch, md5="0" * 32)
    with pytest.raises(DataError, match=r"checksum mismatch for .*ml-100k.zip: md5 is [0-9a-f]{32}, expected 0{32}"):
        fetch("ml-100k", cache_dir=tmp_path, progress=False)
    assert _nothing_left(tmp_path)


def test_pinned_sha256_takes_precedence_over_md5(monkeypatch, tmp_path):
    server = _serve(monkeypatch, md5="0" * 32)  # would fail, but is not consulted
    monkeypatch.setitem(fetch_module.KNOWN_SHA256, "ml-100k", hashlib.sha256(ML100K_ZIP).hexdigest())
    assert (fetch("ml-100k", cache_dir=tmp_path, progress=False) / "u.data").is_file()
    assert server.calls == [URL]


def test_pinned_sha256_mismatch(monkeypatch, tmp_path):
    _serve(monkeypatch)
    monkeypatch.setitem(fetch_module.KNOWN_SHA256, "ml-100k", "f" * 64)
    with pytest.raises(DataError, match="sha256 is .*expected f{64}"):
        fetch("ml-100k", cache_dir=tmp_path, progress=False)
    assert _nothing_left(tmp_path)


def test_no_network_says_so_and_suggests_data_dir(monkeypatch, tmp_path):
    def offline(url, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'files.grouplens.org'")

    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(DataError) as info:
        fetch("ml-1m", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "ml-1m.zip" in message and "no network access" in message and "--data DIR" in message
    assert _nothing_left(tmp_path)


def test_http_error(monkeypatch, tmp_path):
    monkeypatch.setattr(requests, "get", FakeServer({}).get)
    with pytest.raises(DataError, match="HTTP 404"):
        fetch("ml-25m", cache_dir=tmp_path, progress=False)


def test_missing_md5_file_means_unverified_and_refused(monkeypatch, tmp_path):
    server = _serve(monkeypatch)
    del server.routes[URL + ".md5"]
    with pytest.raises(DataError, match=r"ml-100k.zip.md5: the server answered HTTP 404"):
        fetch("ml-100k", cache_dir=tmp_path, progress=False)
    assert _nothing_left(tmp_path)


def test_truncated_download(monkeypatch, tmp_path):
    _serve(monkeypatch, content_length=len(ML100K_ZIP) + 100)
    with pytest.raises(DataError, match="stopped early"):
        fetch("ml-100k", cache_dir=tmp_path, progress=False)


def test_not_a_zip(monkeypatch, tmp_path):
    _serve(monkeypatch, body=b"<html>maintenance</html>")
    with pytest.raises(DataError, match="not a valid zip"):
        fetch("ml-100k", cache_dir=tmp_path, progress=False)
    assert _nothing_left(tmp_path)


def test_member_escaping_the_archive_is_refused(monkeypatch, tmp_path):
    _serve(monkeypatch, body=_zip({"ml-100k/u.data": "1\t1\t5\t1\n", "../evil.txt": "x"}))
    with pytest.raises(DataError, match="points outside the archive"):
        fetch("ml-100k", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_unknown_name():
    with pytest.raises(DataError, match="unknown dataset 'ml-2m'; choose one of ml-100k, ml-1m, ml-25m"):
        fetch("ml-2m")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSERVE_CACHE", str(tmp_path / "cache"))
    assert fetch_module.default_cache_dir() == tmp_path / "cache" / "datasets"
    _serve(monkeypatch)
    assert fetch("ml-100k", progress=False) == tmp_path / "cache" / "datasets" / "ml-100k"


def test_default_cache_dir_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RECSERVE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch_module.default_cache_dir() == tmp_path / ".cache" / "recserve" / "datasets"
