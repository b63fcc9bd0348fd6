"""New items without retraining: `recserve items add` puts items nobody has interacted with yet into the catalogue.

An item the models have never seen is exactly what training calls a cold item: an item with no training
interaction, whose id embedding rows are zero (`recserve.train`), so the item tower places it by its content
alone (genres, year), as training taught it to (`--id-dropout`). Adding items therefore changes no trained
weight:

  dataset.npz       the new items in the catalogue, in raw-id order (every lookup of a raw id is a binary
                    search), so the indices of the items after them move up; every interaction is renumbered
  *.pt              each item-indexed row (tower id embeddings, the history embedding, the ranker's item
                    embedding, MF) moves with its item; the new items' rows are zero; the history padding row
                    stays last
  sources.npz       ALS item factors zero, no neighbours, popularity 0, recent items renumbered
  popularity.npz    count 0

Then `recserve export onnx` embeds every item with the item tower (the served item tower graph of the new
version computes the same vectors: tests/unit/test_items.py), `recserve deploy` builds the index over them and
makes the version live: a running `recserve serve` switches to it within a second. The old artifacts are not
touched; the new ones go to a directory of their own, written in full before it appears.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.errors import ArtifactError, DataError

YEAR_RANGE = (1000, 2200)
EXTRA = "\0extra"          # where csv puts the fields of a row longer than the header
# item-indexed weights per checkpoint kind; the history embedding has one padding row after the items
ITEM_ROWS = {"two_tower": ("item_tower.item_emb.weight",), "ranker": ("item_emb.weight",),
             "mf": ("Q.weight", "b.weight")}
PADDED_ROWS = {"two_tower": ("user_tower.hist_emb.weight",)}


@dataclass
class NewItems:
    item_ids: np.ndarray      # (M,) int64 raw ids
    titles: np.ndarray        # (M,) str
    genres: np.ndarray        # (M, G) float32 multi-hot, in the dataset's genre order
    year: np.ndarray          # (M,) int64 year (0 = unknown)


def read_items(path: Path, genre_names: list[str], known_ids: np.ndarray) -> NewItems:
    """A CSV with a header: item_id, title, and optionally genres ("|"-separated names) and year.

    Every problem names the file, the line and what to write instead."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (a CSV with the header item_id,title,genres,year)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, restkey=EXTRA)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("item_id", "title") if c not in header]
        if missing:
            raise DataError(f"{path}: the header {header or '(empty)'} lacks {', '.join(missing)}: the first line "
                            "must be item_id,title[,genres][,year]")
        unknown_cols = [c for c in header if c not in ("item_id", "title", "genres", "year")]
        if unknown_cols:
            raise DataError(f"{path}: unknown columns {unknown_cols}: write item_id, title, genres, year")
        rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in r.items()}
                for r in reader]
    if not rows:
        raise DataError(f"{path}: no items after the header")
    gidx = {g: j for j, g in enumerate(genre_names)}
    known = set(np.asarray(known_ids).tolist())
    ids, titles, years = [], [], []
    genres = np.zeros((len(rows), len(genre_names)), np.float32)
    first_line: dict[int, int] = {}
    for n, r in enumerate(rows):
        line = n + 2
        if EXTRA in r:
            raise DataError(f"{path}, line {line}: more fields than the header has columns (quote a title with "
                            "commas in it)")
        try:
            item = int(r["item_id"])
        except (TypeError, ValueError):
            raise DataError(f"{path}, line {line}: item_id {r['item_id']!r} is not an integer") from None
        if not 0 <= item < 2 ** 63:
            raise DataError(f"{path}, line {line}: item_id {item} is out of range (0 .. 2^63 - 1)")
        if item in known:
            raise DataError(f"{path}, line {line}: item {item} is already in the catalogue; items add only adds "
                            "new ids (a changed item needs `recserve train`)")
        if item in first_line:
            raise DataError(f"{path}, line {line}: item {item} is listed twice (also on line {first_line[item]})")
        first_line[item] = line
        if not r["title"]:
            raise DataError(f"{path}, line {line}: item {item} has no title")
        for g in filter(None, (x.strip() for x in (r.get("genres") or "").split("|"))):
            if g == "(no genres listed)":
                continue
            if g not in gidx:
                raise DataError(f"{path}, line {line}: genre {g!r} is not one the models know; choose from "
                                f"{', '.join(genre_names)} (separated by |)")
            genres[n, gidx[g]] = 1.0
        year = 0
        if r.get("year"):
            try:
                year = int(r["year"])
            except ValueError:
                raise DataError(f"{path}, line {line}: year {r['year']!r} is not an integer (leave it empty if "
                                "it is unknown)") from None
            if not YEAR_RANGE[0] <= year <= YEAR_RANGE[1]:
                raise DataError(f"{path}, line {line}: year {year} is outside {YEAR_RANGE[0]}..{YEAR_RANGE[1]}")
        ids.append(item)
        titles.append(r["title"])
        years.append(year)
    return NewItems(np.array(ids, np.int64), np.array(titles, dtype=str), genres, np.array(years, np.int64))


def _grow(rows: np.ndarray, new_index: np.ndarray, n: int) -> np.ndarray:
    """Rows of the old items moved to their new indices; the added items' rows zero."""
    out = np.zeros((n, *rows.shape[1:]), rows.dtype)
    out[new_index] = rows
    return out


def _grow_checkpoint(path: Path, dst: Path, new_index: np.ndarray, n: int, fingerprint: str,
                     item_ids: list[int], titles: np.ndarray) -> None:
    import torch

    from recserve.models import MODEL_CLASSES

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    kind = ckpt.get("kind")
    if kind not in MODEL_CLASSES:
        raise ArtifactError(f"{path}: a checkpoint of kind {kind!r}, which items add does not know how to extend")
    state = ckpt["state_dict"]
    idx = torch.as_tensor(new_index)
    for name in ITEM_ROWS.get(kind, ()):
        w = state[name]
        out = torch.zeros((n, *w.shape[1:]), dtype=w.dtype)
        out[idx] = w
        state[name] = out
    for name in PADDED_ROWS.get(kind, ()):
        w = state[name]
        out = torch.zeros((n + 1, *w.shape[1:]), dtype=w.dtype)
        out[idx] = w[:-1]
        out[-1] = w[-1]
        state[name] = out
    if "item_tower.title_tokens" in state:      # `train --titles`: every item's title words, the new ones' too
        from recserve.data.dataset import title_tokens

        length = state["item_tower.title_tokens"].shape[1]
        state["item_tower.title_tokens"] = torch.as_tensor(
            title_tokens(titles, length, int(ckpt["model_args"]["title_vocab"])))
    ckpt["model_args"] = {**ckpt["model_args"], "n_items": n}
    cls, cfg_cls = MODEL_CLASSES[kind]
    cls(cfg_cls(**ckpt["model_args"])).load_state_dict(state)      # strict: every shape fits the new catalogue
    if "vocab" in ckpt:
        ckpt["vocab"] = {**ckpt["vocab"], "item_ids": item_ids, "history_padding_id": n}
    ckpt["fingerprint"] = fingerprint
    torch.save(ckpt, dst)


def _grow_sources(path: Path, dst: Path, new_index: np.ndarray, n: int) -> None:
    import scipy.sparse as sp

    from recserve.sources import VIEWS, read_view, save_sources

    views = {}
    for name in VIEWS:
        v = read_view(path, name)
        old_n = len(v.pop)
        coo = v.nbr.tocoo()
        nbr = sp.csr_matrix((coo.data, (new_index[coo.row], new_index[coo.col])), shape=(n, n), dtype=np.float32)
        nbr.sort_indices()
        recent = np.where(v.recent < old_n, new_index[np.minimum(v.recent, old_n - 1)], n).astype(np.int64)
        views[name] = type(v)(als_user=v.als_user, als_item=_grow(v.als_item, new_index, n), nbr=nbr,
                              pop=_grow(v.pop, new_index, n), recent=recent, ctx_user=v.ctx_user,
                              ctx_item=_grow(v.ctx_item, new_index, n))
    save_sources(dst, views)


def add_items(artifacts: Path, new: NewItems, out: Path, precision: str = "fp32") -> dict:
    """Write ARTIFACTS with the new items added to OUT (which must not exist), exported to ONNX (and INT8 when
    `precision` is int8) so that `recserve deploy --artifacts OUT` can serve it; returns what it did."""
    from recserve.data.dataset import Dataset, year_bucket
    from recserve.export.onnx import export_onnx

    artifacts, out = Path(artifacts), Path(out)
    if out.exists():
        raise ArtifactError(f"{out} already exists: items add writes a new artifacts directory; name another "
                            "with --out")
    ds = Dataset.load(artifacts / "dataset.npz")
    for name in ("two_tower.pt", "ranker.pt", "sources.npz"):
        if not (artifacts / name).exists():
            raise ArtifactError(f"{artifacts / name} is missing: run `recserve train` first")
    if new.genres.shape[1] != ds.n_genres:
        raise DataError(f"the new items have {new.genres.shape[1]} genre columns, the catalogue {ds.n_genres}")
    old_n, n = ds.n_items, ds.n_items + len(new.item_ids)
    all_ids = np.concatenate([ds.item_ids.astype(np.int64), new.item_ids])
    order = np.argsort(all_ids, kind="stable")                 # new index -> old position
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)                              # old position -> new index
    moved, added = position[:old_n], position[old_n:]
    fingerprint = hashlib.sha256(f"{ds.fingerprint}+{all_ids[order].tolist()}".encode()).hexdigest()[:16]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        grown = Dataset(
            user_ids=ds.user_ids, item_ids=all_ids[order],
            titles=np.concatenate([ds.titles.astype(str), new.titles.astype(str)])[order],
            genre_names=ds.genre_names, item_genres=np.concatenate([ds.item_genres, new.genres])[order],
            item_year=np.concatenate([ds.item_year, year_bucket(new.year)])[order],
            user_cat_names=ds.user_cat_names, user_cat_vocab=ds.user_cat_vocab, user_cats=ds.user_cats,
            users=ds.users, items=moved[ds.items], timestamps=ds.timestamps, split=ds.split, source=ds.source,
            fingerprint=fingerprint,
            extra={**ds.extra, "added_items": int(ds.extra.get("added_items", 0)) + len(new.item_ids),
                   "fingerprint_before_items_add": ds.extra.get("fingerprint_before_items_add", ds.fingerprint)})
        grown.save(tmp / "dataset.npz")
        ids = grown.item_ids.tolist()
        for ckpt in sorted(artifacts.glob("*.pt")):
            _grow_checkpoint(ckpt, tmp / ckpt.name, moved, n, fingerprint, ids, grown.titles)
        _grow_sources(artifacts / "sources.npz", tmp / "sources.npz", moved, n)
        if (artifacts / "popularity.npz").exists():
            counts = np.load(artifacts / "popularity.npz")["counts"]
            np.savez(tmp / "popularity.npz", counts=_grow(counts, moved, n), fingerprint=fingerprint)
        for f in artifacts.iterdir():           # what does not index items: the blend, the gate, the reports
            if f.is_file() and not (tmp / f.name).exists() and f.suffix in (".json",):
                shutil.copy2(f, tmp / f.name)
        export_onnx(tmp)                        # every item embedded by the item tower, the graphs' tables
        if precision == "int8":
            from recserve.export.quantize import quantize_artifacts

            quantize_artifacts(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"artifacts": str(out), "added": len(new.item_ids), "items": n, "items_before": old_n,
            "new_index": added.tolist(), "fingerprint": fingerprint}


def items_add(repository: Path, items_file: Path, artifacts: Path | None = None, out: Path | None = None,
              opts=None) -> dict:
    """`recserve items add`: the live version's artifacts plus the file's items, deployed as the next version."""
    from recserve.data.dataset import Dataset
    from recserve.deploy import _verified, deploy

    repository = Path(repository)
    manifest = _verified(repository)            # refuse a tampered or stale repository before any work
    if artifacts is None:
        if not manifest.get("artifacts"):
            raise ArtifactError(f"{repository}/manifest.json does not say which artifacts its live version was "
                                "built from: pass --artifacts")
        artifacts = Path(manifest["artifacts"])
    artifacts = Path(artifacts)
    ds = Dataset.load(artifacts / "dataset.npz")
    if ds.fingerprint != manifest.get("fingerprint"):
        raise ArtifactError(f"{artifacts} holds data {ds.fingerprint}, but {repository}'s live version serves "
                            f"{manifest.get('fingerprint')}: pass the artifacts the live version was built from")
    new = read_items(items_file, ds.genre_names, ds.item_ids)
    version = max(int(v) for v in manifest["versions"]) + 1
    out = Path(out) if out else artifacts.parent / f"{artifacts.name}-items-v{version}"
    precision = opts.precision if opts is not None else manifest.get("precision", "fp32")
    report = add_items(artifacts, new, out, precision=precision)
    live = deploy(out, repository, opts)
    return {**report, "model_version": live["model_version"], "precision": live["precision"]}
