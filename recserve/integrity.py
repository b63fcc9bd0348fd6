"""Integrity of a served repository: what `recserve export repository` wrote is what `recserve serve` starts.

The manifest records the sha256 of every file of the repository (graphs, index, tables, configs, the model.py
shims) and of the recserve code those shims import (`SERVED_CODE`). `verify_repository` recomputes them all
before the server starts and refuses, naming the file, on any difference, a missing file or an extra one.
Python's bytecode caches in the repository are removed first (they are derived; with the server's
PYTHONDONTWRITEBYTECODE none are written back).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from recserve.errors import ServerError

PACKAGE = Path(__file__).resolve().parent
# The code a served model runs: the steps and what they import (a unit test checks that this is the closure).
SERVED_CODE = ("__init__.py", "coldstart.py", "drift.py", "errors.py", "integrity.py", "ranking.py", "rules.py",
               "sources.py",
               "serving/__init__.py",
               "serving/spec.py", "serving/split.py", "serving/local.py", "serving/steps")
FIX = "rebuild it with `recserve export repository`, or pass --no-verify (development only)"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_files() -> list[Path]:
    files = []
    for name in SERVED_CODE:
        p = PACKAGE / name
        files += sorted(q for q in p.rglob("*") if q.suffix in (".py", ".lua") and "__pycache__" not in q.parts) \
            if p.is_dir() else [p]
    return files


def code_hashes() -> dict[str, str]:
    """{path inside the recserve package: sha256} of the served code."""
    return {str(p.relative_to(PACKAGE)): sha256_of(p) for p in code_files()}


def repository_hashes(root: Path) -> dict[str, str]:
    """{path inside the repository: sha256} of every file but the manifest (and Python's byte-code caches, which
    `verify_repository` removes)."""
    root = Path(root)
    files = []
    # os.walk, not rglob: another server verifying the same repository may remove a __pycache__ meanwhile
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [Path(folder) / n for n in names if not (folder == str(root) and n == "manifest.json")]
    return {str(p.relative_to(root)): sha256_of(p) for p in sorted(files) if p.is_file()}


def verify_repository(repository: Path) -> dict:
    """Recompute every hash the manifest records; returns the manifest, or raises ServerError naming the file."""
    repository = Path(repository)
    path = repository / "manifest.json"
    if not path.is_file():
        raise ServerError(f"{repository} has no manifest.json, so nothing says what it should hold: {FIX}")
    try:
        manifest = json.loads(path.read_text())
        files, code = dict(manifest["sha256"]), dict(manifest["code_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(f"{path} is not a recserve manifest with file and code hashes ({exc}): {FIX}") from None
    caches = [Path(folder) / "__pycache__" for folder, dirs, _ in os.walk(repository) if "__pycache__" in dirs]
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    found = repository_hashes(repository)
    for name, want in files.items():
        got = found.pop(name, None)
        if got is None:
            raise ServerError(f"{repository / name} is missing, but the manifest lists it: {FIX}")
        if got != want:
            raise ServerError(f"{repository / name} was changed after export (sha256 {got[:12]}, the manifest says "
                              f"{want[:12]}): the server refuses to start; {FIX}")
    if found:
        raise ServerError(f"{repository / sorted(found)[0]} is not in the manifest (a file added after export): "
                          f"remove it, or {FIX}")
    served = code_hashes()
    for name, want in code.items():
        got = served.get(name)
        if got != want:
            what = "is missing" if got is None else "differs from the code the repository was exported with"
            raise ServerError(f"recserve/{name} {what} (served models import it): reinstall that recserve version, "
                              f"or {FIX}")
    extra = sorted(set(served) - set(code))
    if extra:
        raise ServerError(f"recserve/{extra[0]} is new since the repository was exported (served models may "
                          f"import it): {FIX}")
    return manifest
