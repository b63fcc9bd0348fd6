"""`recserve items add`: new items join the catalogue and the index without retraining, and nothing else moves."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from recserve.data.dataset import Dataset
from recserve.deploy import deploy, read_manifest
from recserve.errors import ArtifactError, DataError
from recserve.items import add_items, items_add, read_items
from recserve.serving.local import LocalPipeline
from recserve.serving.repository import RepoOptions
from recserve.sources import read_view

CANDIDATES = 60
# id 0 sorts before every item of the tiny set (ids 1..240), so every old item's index moves up by one
NEW = "item_id,title,genres,year\n0,First New,cat00|cat01,2019\n1000,Last New,cat02,\n"


@pytest.fixture(scope="module")
def grown(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    (root / "new.csv").write_text(NEW)
    ds = Dataset.load(tiny_artifacts / "dataset.npz")
    new = read_items(root / "new.csv", ds.genre_names, ds.item_ids)
    report = add_items(tiny_artifacts, new, root / "grown")
    return tiny_artifacts, root / "grown", report


def _rows_by_raw_id(ds: Dataset, ids) -> np.ndarray:
    return np.searchsorted(ds.item_ids, np.asarray(ids))


@pytest.mark.parametrize("text, words", [
    ("title\nA\n", "lacks item_id"),
    ("item_id,title,colour\n5000,A,red\n", "unknown columns"),
    ("item_id,title\n", "no items after the header"),
    ("item_id,title\nabc,A\n", "'abc' is not an integer"),
    ("item_id,title\n-3,A\n", "out of range"),
    ("item_id,title\n7,A\n", "item 7 is already in the catalogue"),
    ("item_id,title\n5000,A\n5000,B\n", "listed twice (also on line 2)"),
    ("item_id,title\n5000,\n", "has no title"),
    ("item_id,title,genres\n5000,A,Polka\n", "genre 'Polka' is not one the models know"),
    ("item_id,title,year\n5000,A,soon\n", "year 'soon' is not an integer"),
    ("item_id,title,year\n5000,A,30000\n", "outside 1000..2200"),
    ("item_id,title\n5000,A,extra\n", "more fields than the header"),
])
def test_a_bad_items_file_is_refused_naming_the_line_and_the_fix(tmp_path, tiny_artifacts, text, words):
    ds = Dataset.load(tiny_artifacts / "dataset.npz")
    path = tmp_path / "items.csv"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_items(path, ds.genre_names, ds.item_ids)
    assert words in str(err.value) and str(path) in str(err.value)


def test_added_items_join_the_catalogue_in_raw_id_order_and_every_interaction_keeps_its_item(grown):
    old_dir, new_dir, report = grown
    old, new = Dataset.load(old_dir / "dataset.npz"), Dataset.load(new_dir / "dataset.npz")
    assert report["added"] == 2 and new.n_items == old.n_items + 2
    assert np.all(np.diff(new.item_ids) > 0) and {0, 1000} <= set(new.item_ids.tolist())
    assert report["new_index"] == [0, new.n_items - 1]
    np.testing.assert_array_equal(new.item_ids[new.items], old.item_ids[old.items])     # the same raw items
    np.testing.assert_array_equal(new.users, old.users)
    i = _rows_by_raw_id(new, [0, 1000])
    assert new.titles[i].tolist() == ["First New", "Last New"]
    assert new.item_genres[i[0], :2].tolist() == [1.0, 1.0] and new.item_genres[i[0]].sum() == 2
    assert new.item_year[i[1]] == 0                                                  # unknown year
    assert new.fingerprint != old.fingerprint and new.extra["added_items"] == 2


def test_trained_rows_move_with_their_items_and_the_new_items_rows_are_zero(grown):
    old_dir, new_dir, _ = grown
    old_ds, new_ds = Dataset.load(old_dir / "dataset.npz"), Dataset.load(new_dir / "dataset.npz")
    moved = _rows_by_raw_id(new_ds, old_ds.item_ids)
    added = _rows_by_raw_id(new_ds, [0, 1000])
    for name, keys in (("two_tower.pt", ["item_tower.item_emb.weight"]), ("ranker.pt", ["item_emb.weight"]),
                       ("mf.pt", ["Q.weight", "b.weight"])):
        a = torch.load(old_dir / name, weights_only=True)
        b = torch.load(new_dir / name, weights_only=True)
        assert b["fingerprint"] == new_ds.fingerprint and b["model_args"]["n_items"] == new_ds.n_items
        for key in keys:
            torch.testing.assert_close(b["state_dict"][key][moved], a["state_dict"][key], rtol=0, atol=0)
            assert float(b["state_dict"][key][added].abs().sum()) == 0.0
        for key, w in a["state_dict"].items():          # every weight that does not index items is unchanged
            if key not in keys and key != "user_tower.hist_emb.weight":
                torch.testing.assert_close(b["state_dict"][key], w, rtol=0, atol=0)
    a = torch.load(old_dir / "two_tower.pt", weights_only=True)["state_dict"]["user_tower.hist_emb.weight"]
    b = torch.load(new_dir / "two_tower.pt", weights_only=True)["state_dict"]["user_tower.hist_emb.weight"]
    torch.testing.assert_close(b[moved], a[:-1], rtol=0, atol=0)
    torch.testing.assert_close(b[-1], a[-1], rtol=0, atol=0)                          # padding stays last
    for view in ("valid", "test", "serve"):
        va, vb = read_view(old_dir / "sources.npz", view), read_view(new_dir / "sources.npz", view)
        np.testing.assert_array_equal(vb.als_item[moved], va.als_item)
        np.testing.assert_array_equal(vb.pop[moved], va.pop)
        assert not vb.als_item[added].any() and not vb.pop[added].any()
        np.testing.assert_array_equal(vb.nbr[moved][:, moved].toarray(), va.nbr.toarray())
        assert vb.nbr[added].nnz == 0 and vb.nbr[:, added].nnz == 0
        pad_a, pad_b = va.recent == old_ds.n_items, vb.recent == new_ds.n_items
        np.testing.assert_array_equal(pad_a, pad_b)
        np.testing.assert_array_equal(new_ds.item_ids[vb.recent[~pad_b]], old_ds.item_ids[va.recent[~pad_a]])


def test_new_items_are_embedded_from_their_content_alone_by_the_served_item_tower(grown, tmp_path):
    _, new_dir, _ = grown
    ds = Dataset.load(new_dir / "dataset.npz")
    repository = tmp_path / "repo"
    deploy(new_dir, repository, RepoOptions(candidates=CANDIDATES))
    i = _rows_by_raw_id(ds, [0, 1000])
    tower = ort.InferenceSession(str(repository / "item_tower" / "1" / "model.onnx"),
                                 providers=["CPUExecutionProvider"])
    served = tower.run(["item_vec"], {"item_idx": i.astype(np.int64), "item_genres": ds.item_genres[i],
                                      "item_year": ds.item_year[i]})[0]
    index_vectors = np.load(repository / "retrieval" / "1" / "items.npz")["vectors"][i]
    np.testing.assert_allclose(index_vectors, served, atol=1e-5)
    # the same as the trained tower with its id embedding dropped: the content-only placement training taught it
    from recserve.checkpoint import load
    model, _ = load(new_dir / "two_tower.pt", ds.fingerprint)
    with torch.no_grad():
        content = model.item_tower(torch.as_tensor(i), torch.as_tensor(ds.item_genres[i]),
                                   torch.as_tensor(ds.item_year[i]), torch.zeros(len(i), 1)).numpy()
    np.testing.assert_allclose(served, content, atol=1e-5)


def test_items_add_deploys_a_version_whose_old_items_score_as_before_and_whose_new_items_can_be_served(
        grown, tmp_path):
    old_dir, _, _ = grown
    work = tmp_path / "art"
    shutil.copytree(old_dir, work)
    repository = tmp_path / "repo"
    deploy(work, repository, RepoOptions(candidates=CANDIDATES))
    assert read_manifest(repository)["artifacts"] == str(work.resolve())
    (tmp_path / "new.csv").write_text(NEW)
    r = items_add(repository, tmp_path / "new.csv", opts=RepoOptions(candidates=CANDIDATES))
    assert r["model_version"] == 2 and r["artifacts"] == str(tmp_path / "art-items-v2")
    m = read_manifest(repository)
    assert m["model_version"] == 2 and m["artifacts"] == str((tmp_path / "art-items-v2").resolve())
    v1, v2 = LocalPipeline(repository, version=1), LocalPipeline(repository, version=2)
    # the blend vectors the index searches, by raw id: the old items' are unchanged
    old_rows = np.searchsorted(v2.items.item_ids, v1.items.item_ids)
    b1 = np.load(repository / "retrieval" / "1" / "blend_items.npy")
    b2 = np.load(repository / "retrieval" / "2" / "blend_items.npy")
    np.testing.assert_allclose(b2[old_rows], b1, atol=1e-6)
    users = v1.retriever.user_ids
    ctx = np.full(len(users), 3)
    got = v2.recommend(users, v2.k_max, ctx, ctx)
    assert (got == 0).any() or (got == 1000).any(), "no user is served either new item in the top k_max"
    # an unknown user who has just clicked a new item is served from that history
    request = {"user_id": np.array([[10 ** 9]]), "k": np.array([[5]], np.int32), "hour": np.array([[3]]),
               "weekday": np.array([[3]]), "history": np.array([[0]])}
    from recserve.serving.steps.retrieval import check_request
    check_request(request, v2.retriever.user_ids, v2.k_max, allow_unknown=True)
    out = v2.serve([request])[0]
    assert out["source"].reshape(-1)[0] in (b"history", "history") and (out["item_ids"] >= 0).sum() == 5
    # adding an item twice is refused, and the repository stays on its version
    with pytest.raises(DataError, match="already in the catalogue"):
        items_add(repository, tmp_path / "new.csv", opts=RepoOptions(candidates=CANDIDATES))
    assert read_manifest(repository)["model_version"] == 2


def test_items_add_refuses_artifacts_the_live_version_was_not_built_from(grown, tmp_path):
    old_dir, new_dir, _ = grown
    repository = tmp_path / "repo"
    deploy(new_dir, repository, RepoOptions(candidates=CANDIDATES))
    (tmp_path / "more.csv").write_text("item_id,title\n5000,More\n")
    with pytest.raises(ArtifactError, match="pass the artifacts the live version was built from"):
        items_add(repository, tmp_path / "more.csv", artifacts=old_dir, opts=RepoOptions(candidates=CANDIDATES))
    with pytest.raises(ArtifactError, match="already exists"):
        add_items(new_dir, read_items(tmp_path / "more.csv", Dataset.load(new_dir / "dataset.npz").genre_names,
                                      Dataset.load(new_dir / "dataset.npz").item_ids), new_dir)


def test_a_tower_that_reads_titles_gets_the_new_items_title_words(tmp_path):
    from recserve import checkpoint
    from recserve.data.dataset import title_tokens
    from recserve.items import _grow_checkpoint
    from recserve.models import TowerConfig, TwoTower

    titles = np.array(["Alpha Movie", "Beta Story", "Gamma"])
    model = TwoTower(TowerConfig(4, 3, 2, [2], title_vocab=64, title_len=4))
    model.item_tower.title_tokens.copy_(torch.as_tensor(title_tokens(titles, 4, 64)))
    checkpoint.save(model, "two_tower", tmp_path / "a.pt", "f1")
    grown_titles = np.array(["New Story", "Alpha Movie", "Beta Story", "Gamma"])     # the new item sorts first
    _grow_checkpoint(tmp_path / "a.pt", tmp_path / "b.pt", np.array([1, 2, 3]), 4, "f2", [0, 1, 2, 3], grown_titles)
    grown, _ = checkpoint.load(tmp_path / "b.pt", "f2")
    np.testing.assert_array_equal(grown.item_tower.title_tokens.numpy(), title_tokens(grown_titles, 4, 64))
