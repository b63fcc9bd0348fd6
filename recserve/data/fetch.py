"""Download and unpack the official MovieLens zips into a local cache."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import requests
from tqdm import tqdm

from recserve.errors import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens"
DATASETS = ("ml-100k", "ml-1m", "ml-25m", "ml-latest-small")

# Integrity check. A pinned sha256 here takes precedence; none is pinned, because no copy of these zips could be
# hashed when this was written and a digest from memory could be wrong (and ml-latest-small is re-published from
# time to time). Without one, the download is checked against the md5 GroupLens publishes next to each zip
# ({url}.md5). That catches corrupt and truncated transfers; it cannot catch a tampered server, which would
# serve a matching .md5 too.
KNOWN_SHA256: dict[str, str] = {}

_COMPLETE = ".recserve-complete"  # written last: its presence means the folder was extracted in full
_TIMEOUT_S = 30
_CHUNK = 1 << 20
_MD5 = re.compile(r"\b([0-9a-fA-F]{32})\b")


def default_cache_dir() -> Path:
    """Where datasets go: ``$RECSERVE_CACHE/datasets`` when that is set, else ``~/.cache/recserve/datasets``."""
    root = os.environ.get("RECSERVE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "recserve") / "datasets"


def fetch(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Download a MovieLens data set (once) and return the folder holding its files.

    Args:
        name: One of ``ml-100k``, ``ml-1m``, ``ml-25m``, ``ml-latest-small``.
        cache_dir: Folder to keep datasets in; defaults to :func:`default_cache_dir`.
        progress: Show a progress bar while downloading.

    Returns:
        ``cache_dir / name``, holding e.g. ``u.data`` or ``ratings.csv``; ready for ``load_movielens``.

    Raises:
        DataError: Unknown name, no network, an HTTP error, a checksum mismatch or a broken zip. Nothing is left
            in the cache after a failure.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    if (target / _COMPLETE).is_file():
        return target
    url = f"{BASE_URL}/{name}.zip"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot create the dataset cache ({exc}); pass another cache_dir or set "
                        "RECSERVE_CACHE.") from exc
    # Work in a scratch folder beside the target, so the final rename stays on one file system and a failure
    # leaves nothing half-made behind.
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as scratch:
        archive = Path(scratch) / f"{name}.zip"
        digests = _download(url, archive, progress)
        _verify(name, url, digests)
        extracted = _extract(archive, Path(scratch) / "extracted")
        if target.exists():  # an earlier run died before writing its completion mark
            shutil.rmtree(target)
        extracted.rename(target)
    (target / _COMPLETE).write_text(f"{url}\nsha256 {digests['sha256']}\n")
    return target


def _no_network(url: str, reason: object) -> DataError:
    return DataError(
        f"could not download {url}: {reason}. This machine may have no network access: download the zip by hand "
        "on a machine that has, unzip it, and pass its folder with --data DIR."
    )


def _get(url: str, stream: bool) -> requests.Response:
    try:
        response = requests.get(url, stream=stream, timeout=_TIMEOUT_S)
    except requests.RequestException as exc:
        raise _no_network(url, exc) from exc
    if response.status_code != 200:
        response.close()
        raise DataError(f"could not download {url}: the server answered HTTP {response.status_code}. Check the "
                        "dataset name, or download the zip by hand and pass its unzipped folder with --data DIR.")
    return response


def _download(url: str, path: Path, progress: bool) -> dict[str, str]:
    """Stream url into path; return its md5 and sha256 hex digests, computed on the way."""
    response = _get(url, stream=True)
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    total = int(response.headers.get("content-length") or 0) or None
    try:
        with path.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                                          disable=not progress) as bar:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                out.write(chunk)
                md5.update(chunk)
                sha256.update(chunk)
                bar.update(len(chunk))
    except requests.RequestException as exc:
        raise _no_network(url, exc) from exc
    finally:
        response.close()
    if total is not None and path.stat().st_size != total:
        raise DataError(f"download of {url} stopped early ({path.stat().st_size} of {total} bytes); try again.")
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _verify(name: str, url: str, digests: dict[str, str]) -> None:
    """Check against the pinned sha256 when there is one, else against GroupLens' published md5."""
    if name in KNOWN_SHA256:
        algorithm, expected = "sha256", KNOWN_SHA256[name].lower()
    else:
        algorithm, expected = "md5", _published_md5(url)
    if digests[algorithm] != expected:
        raise DataError(f"checksum mismatch for {url}: {algorithm} is {digests[algorithm]}, expected {expected}. "
                        "The download is corrupt or the file changed on the server; try again, or download it by "
                        "hand and pass its unzipped folder with --data DIR.")


def _published_md5(url: str) -> str:
    """The md5 from ``{url}.md5`` (``MD5 (name.zip) = <hex>`` or ``<hex>  name.zip``)."""
    response = _get(f"{url}.md5", stream=False)
    try:
        match = _MD5.search(response.text)
    finally:
        response.close()
    if match is None:
        raise DataError(f"{url}.md5 holds no md5 digest, so the download cannot be verified; download the zip by "
                        "hand and pass its unzipped folder with --data DIR.")
    return match.group(1).lower()


def _extract(archive: Path, dest: Path) -> Path:
    """Unzip into dest, refusing members that would land outside it; return the folder holding the files."""
    try:
        with zipfile.ZipFile(archive) as zf:
            base = dest.resolve()
            for member in zf.namelist():
                if not (dest / member).resolve().is_relative_to(base):
                    raise DataError(f"{archive.name}: member {member!r} points outside the archive; refusing it.")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive.name} is not a valid zip ({exc}); try again, or download it by hand and pass "
                        "its unzipped folder with --data DIR.") from exc
    # The GroupLens zips hold one top folder (ml-100k/...); use it when that is all there is.
    entries = [e for e in dest.iterdir() if e.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest
