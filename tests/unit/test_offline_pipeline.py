"""The offline half end to end on a small synthetic data set: train, evaluate, export to ONNX, recommend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from recserve import checkpoint
from recserve.data import generate
from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
from recserve.evaluate import METRICS, MODELS, Evaluator, evaluate_artifacts
from recserve.export.onnx import OUTPUTS, TOWER_INPUTS, export_onnx, random_inputs
from recserve.models import MODEL_CLASSES
from recserve.reference import RANKER_INPUTS, Reference, item_vectors
from recserve.train import TrainConfig, train_all

pytestmark = pytest.mark.unit

# 400 users x 400 items is big enough that popularity stops winning recall@50 (on 120 items the top 50 by
# popularity already hold most of anyone's test items). Over data seeds 0-4 and training seeds 0-1 the two
# towers led popularity's recall@50 by 0.10 to 0.16 after these 10 epochs; the test asks for 0.05.
SIZES = dict(n_users=400, n_items=400, n_interactions=20_000, seed=1)
CONFIG = TrainConfig(seed=0, tower_epochs=10, mf_epochs=3, ranker_epochs=2, candidates=50, baselines_budget=0)
MAX_REL_ERROR = 1e-5
ONNX_INPUTS = {**TOWER_INPUTS, "ranker": RANKER_INPUTS}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    train_all(generate(**SIZES), out, CONFIG, progress=False)
    return out


@pytest.fixture(scope="module")
def ds(artifacts: Path) -> Dataset:
    return Dataset.load(artifacts / "dataset.npz")


@pytest.fixture(scope="module")
def metrics(artifacts: Path) -> dict:
    return evaluate_artifacts(artifacts)


@pytest.fixture(scope="module")
def exported(artifacts: Path) -> dict:
    return export_onnx(artifacts)


@pytest.fixture(scope="module")
def sessions(artifacts: Path, exported: dict) -> dict[str, ort.InferenceSession]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return {name: ort.InferenceSession(str(artifacts / "onnx" / f"{name}.onnx"), opts,
                                       providers=["CPUExecutionProvider"]) for name in ONNX_INPUTS}


@pytest.fixture(scope="module")
def modules(artifacts: Path, ds: Dataset) -> dict[str, torch.nn.Module]:
    two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", ds.fingerprint)
    ranker, _ = checkpoint.load(artifacts / "ranker.pt", ds.fingerprint)
    return {"user_tower": two_tower.user_tower, "item_tower": two_tower.item_tower, "ranker": ranker,
            "two_tower": two_tower}


# ---- training artifacts -----------------------------------------------------------------------------------


def test_artifacts_exist(artifacts: Path, ds: Dataset):
    for name in ("dataset.npz", "popularity.npz", "mf.pt", "two_tower.pt", "ranker.pt", "train.json"):
        assert (artifacts / name).is_file(), name
    pop = np.load(artifacts / "popularity.npz")
    np.testing.assert_array_equal(pop["counts"], np.bincount(ds.items[ds.mask(TRAIN)], minlength=ds.n_items))
    assert str(pop["fingerprint"]) == ds.fingerprint
    summary = json.loads((artifacts / "train.json").read_text())
    assert summary["fingerprint"] == ds.fingerprint and summary["config"]["tower_epochs"] == CONFIG.tower_epochs


@pytest.mark.parametrize("kind", ["mf", "two_tower", "ranker"])
def test_checkpoints_are_self_describing(artifacts: Path, ds: Dataset, kind: str):
    ckpt = torch.load(artifacts / f"{kind}.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == kind and ckpt["fingerprint"] == ds.fingerprint
    assert ckpt["model_args"]["n_users"] == ds.n_users and ckpt["model_args"]["n_items"] == ds.n_items
    # nothing but the checkpoint is needed to rebuild the model
    cls, cfg_cls = MODEL_CLASSES[kind]
    model = cls(cfg_cls(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    assert ckpt["train_config"]["seed"] == CONFIG.seed
    vocab = ckpt["vocab"]    # indices -> raw ids and category values, without dataset.npz
    assert vocab["user_ids"] == ds.user_ids.tolist() and vocab["item_ids"] == ds.item_ids.tolist()
    assert vocab["genres"] == ds.genre_names and vocab["history_padding_id"] == ds.n_items
    assert vocab["user_attributes"] == {n: ds.user_cat_vocab[n] for n in ds.user_cat_names}


# ---- evaluation -------------------------------------------------------------------------------------------


def test_metrics_json_shape(artifacts: Path, ds: Dataset, metrics: dict):
    on_disk = json.loads((artifacts / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) == {"protocol", "models", "served", "ranker_gate", "blend"}
    gate = on_disk["ranker_gate"]
    assert on_disk["served"] == ("blend+ranker" if gate["shipped"] else "blend")
    assert on_disk["blend"]["coef"] and set(on_disk["blend"]["weights"]) == {"two_tower", "als", "popularity",
                                                                             "neighbours", "context"}
    assert gate["shipped"] == (gate["ranker"] > gate["retrieval_order"])
    data = on_disk["protocol"]["data"]
    assert data["fingerprint"] == ds.fingerprint and data["users"] == ds.n_users and data["items"] == ds.n_items
    assert data["test_users"] == len(np.unique(ds.users[ds.split == TEST]))
    assert list(on_disk["models"]) == list(MODELS) == ["popularity", "mf", "two_tower", "blend", "blend+ranker"]
    for name, values in on_disk["models"].items():
        assert list(values) == list(METRICS), name
        assert all(v is None or 0.0 <= v <= 1.0 for v in values.values()), (name, values)
        assert values["recall@10"] <= values["recall@20"] <= values["recall@50"], (name, values)
        assert values["recall@10"] > 0 and values["coverage@10"] > 0, (name, values)


def test_two_tower_beats_popularity_on_planted_structure(metrics: dict):
    models = metrics["models"]
    assert models["two_tower"]["recall@50"] > models["popularity"]["recall@50"] + 0.05, models



class KnownItemsFirst(torch.nn.Module):
    """A ranker that scores the user's known items 1 and every other candidate 0."""

    def __init__(self, known: torch.Tensor):
        super().__init__()
        self.known = known                                                    # (U, I)

    def forward(self, user_idx, user_cats, user_vec, hour, weekday, cand_idx, *candidate_features):
        return self.known[user_idx.unsqueeze(1), cand_idx]                   # (B, K)


def test_reranking_never_brings_back_known_items(ds: Dataset, modules: dict):
    # 400 items < 500 re-rank candidates: every known item is among the candidates the ranker sees
    ev = Evaluator(ds, TEST, modules["two_tower"].cfg.history_len)
    known = torch.zeros(ds.n_users, ds.n_items)
    for u in range(ds.n_users):
        known[u, torch.as_tensor(ev.tables.seen_of(u))] = 1.0
    # with known items excluded, the ties among the rest keep retrieval order: the two towers' own lists
    assert ev.two_tower_ranker(modules["two_tower"], KnownItemsFirst(known)) == ev.two_tower(modules["two_tower"])


def test_evaluation_keeps_sections_other_stages_added(artifacts: Path, tmp_path: Path):
    copy = shutil.copytree(artifacts, tmp_path / "artifacts", ignore=shutil.ignore_patterns("onnx"))
    (copy / "metrics.json").write_text(json.dumps({"int8": {"gate": "passed"}, "models": {}}))
    result = evaluate_artifacts(copy)
    assert result["int8"] == {"gate": "passed"} and list(result["models"]) == list(MODELS)
    assert json.loads((copy / "metrics.json").read_text()) == result


# ---- ONNX export ------------------------------------------------------------------------------------------


def test_export_writes_models_and_tables(artifacts: Path, ds: Dataset, exported: dict, modules: dict):
    out = artifacts / "onnx"
    for name in ("user_tower.onnx", "item_tower.onnx", "ranker.onnx", "item_embeddings.npy", "item_features.npz",
                 "user_features.npz", "export.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "export.json").read_text()) == exported
    assert exported["fingerprint"] == ds.fingerprint and exported["n_items"] == ds.n_items
    assert all(m["max_rel_error"] <= MAX_REL_ERROR for m in exported["models"].values())

    emb = np.load(out / "item_embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (ds.n_items, exported["dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, item_vectors(modules["two_tower"], ds), rtol=0, atol=1e-6)

    items = np.load(out / "item_features.npz")
    np.testing.assert_array_equal(items["item_ids"], ds.item_ids)
    np.testing.assert_array_equal(items["genres"], ds.item_genres)
    np.testing.assert_array_equal(items["year"], ds.item_year)
    np.testing.assert_allclose(items["pop"], ds.item_popularity(TRAIN))

    users = np.load(out / "user_features.npz")
    np.testing.assert_array_equal(users["user_ids"], ds.user_ids)
    np.testing.assert_array_equal(users["user_cats"], ds.user_cats)
    # serving sees every interaction, not only the training period
    np.testing.assert_array_equal(users["history"], ds.last_history(TRAIN, VALID, TEST, length=exported["history_len"]))
    indptr, seen = ds.seen_csr(TRAIN, VALID, TEST)
    np.testing.assert_array_equal(users["seen_indptr"], indptr)
    np.testing.assert_array_equal(users["seen"], seen)


@pytest.mark.parametrize("name", list(ONNX_INPUTS))
def test_onnx_input_and_output_names_are_as_documented(sessions: dict, name: str):
    sess = sessions[name]
    assert [i.name for i in sess.get_inputs()] == list(ONNX_INPUTS[name])
    assert [o.name for o in sess.get_outputs()] == [OUTPUTS[name]]


CASES = [("user_tower", 1, 1), ("user_tower", 37, 1), ("item_tower", 1, 1), ("item_tower", 37, 1),
         *[("ranker", b, k) for b in (1, 37) for k in (1, 50)]]


@pytest.mark.parametrize(("name", "batch", "k"), CASES, ids=[f"{n}-B{b}-K{k}" for n, b, k in CASES])
def test_onnx_runtime_matches_pytorch(ds: Dataset, exported: dict, sessions: dict, modules: dict,
                                      name: str, batch: int, k: int):
    # seeds unlike export's own (1 and 2) and shapes unlike its example (B=4, K=8): the dynamic axes must work
    inputs = random_inputs(name, ds, exported["history_len"], exported["dim"], batch=batch, k=k,
                           seed=1000 + batch + k)
    got = sessions[name].run(None, inputs)[0]
    with torch.no_grad():  # fed in the documented order, so a swapped input name would show up here
        want = modules[name](*[torch.as_tensor(inputs[n]) for n in ONNX_INPUTS[name]]).numpy()
    assert got.shape == want.shape == ((batch, k) if name == "ranker" else (batch, exported["dim"]))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < MAX_REL_ERROR, f"{name} B={batch} K={k}: max relative error {rel:.2e}"


# ---- reference recommender --------------------------------------------------------------------------------


def test_reference_recommends_k_unseen_items_per_user(artifacts: Path, ds: Dataset):
    ref = Reference(artifacts)
    users = np.arange(0, ds.n_users, 9)
    hour, weekday = np.full(len(users), 20), np.full(len(users), 4)
    recs = ref.recommend(users, hour, weekday, k=10)
    assert len(recs) == len(users)
    indptr, seen = ds.seen_csr(TRAIN, VALID, TEST)  # no target: serving knows every interaction
    for u, (items, scores) in zip(users, recs):
        assert items.shape == scores.shape == (10,)
        assert len(set(items.tolist())) == 10 and ((0 <= items) & (items < ds.n_items)).all()
        assert np.isfinite(scores).all() and (np.diff(scores) <= 0).all()  # best first
        assert not np.isin(items, seen[indptr[u]:indptr[u + 1]]).any(), f"user {u} got an item they already saw"


def test_items_without_training_rows_keep_a_zero_id_embedding():
    from recserve.data.dataset import build_dataset
    from recserve.train import _val_evaluator, train_two_tower

    small = build_dataset(generate(n_users=60, n_items=400, n_interactions=3000, seed=0))
    cold = np.bincount(small.items[small.split == TRAIN], minlength=small.n_items) == 0
    assert cold.any()                                       # the data this test needs
    cfg = TrainConfig(tower_epochs=2, id_dropout=0.2, baselines_budget=0)
    tower = train_two_tower(small, cfg, _val_evaluator(small, cfg), progress=False)
    emb = tower.item_tower.item_emb.weight.detach().numpy()
    hist = tower.user_tower.hist_emb.weight.detach().numpy()[:-1]
    assert (emb[cold] == 0).all() and (hist[cold] == 0).all()
    assert (np.abs(emb[~cold]).sum(axis=1) > 0).all()


def test_the_towers_id_dropout_is_the_one_validation_preferred(artifacts: Path):
    choice = json.loads((artifacts / "train.json").read_text())["two_tower"]
    assert [t["id_dropout"] for t in choice["tried"]] == list(CONFIG.id_dropout_grid)
    best = max(choice["tried"], key=lambda t: t["valid_recall@50"])
    assert choice["id_dropout"] == best["id_dropout"]


def test_the_evaluated_and_served_towers_are_refit_on_train_and_valid_for_the_epochs_validation_chose(
        artifacts: Path, metrics: dict):
    choice = json.loads((artifacts / "train.json").read_text())["two_tower"]
    refit = choice["refit"]
    assert refit["splits"] == ["train", "valid"] and refit["ran_epochs"] == refit["epochs"] >= 1
    assert metrics["protocol"]["test_time_data"]["two_tower"].startswith("refit on train+valid")


def test_a_refit_trains_exactly_the_epochs_it_is_given_on_the_splits_it_is_given():
    """And the train-only towers (`test_items_without_training_rows_keep_a_zero_id_embedding`) do not."""
    from recserve.data.dataset import build_dataset
    from recserve.train import train_two_tower

    small = build_dataset(generate(n_users=60, n_items=400, n_interactions=3000, seed=0))
    cfg = TrainConfig(tower_epochs=30, baselines_budget=0)
    tower = train_two_tower(small, cfg, None, progress=False, splits=(TRAIN, VALID), epochs=3)
    assert tower.best_epoch == 3
    # it knows the validation interactions: an item first seen in validation gets a trained id row
    emb = tower.item_tower.item_emb.weight.detach().numpy()
    count = {split: np.bincount(small.items[small.split == split], minlength=small.n_items) for split in (TRAIN, VALID)}
    valid_only = (count[TRAIN] == 0) & (count[VALID] > 0)
    never = (count[TRAIN] + count[VALID]) == 0
    assert valid_only.any() and never.any(), "the data this test needs"
    assert (np.abs(emb[valid_only]).sum(axis=1) > 0).all() and (emb[never] == 0).all()


def test_title_words_are_tried_once_and_kept_only_on_a_clear_validation_gain(monkeypatch):
    """Titles that tell items apart get one trial towers training with the chosen id dropout; the decision
    follows TITLES_MIN_GAIN on validation recall@50, and the refit trains the towers with the same choice."""
    import dataclasses

    from recserve import train as train_mod
    from recserve.data.dataset import build_dataset
    from recserve.train import TITLES_MIN_GAIN, _val_evaluator, best_two_tower, has_title_words

    raw = generate(n_users=150, n_items=120, n_interactions=4000, seed=4)
    assert not has_title_words(build_dataset(raw))            # synthetic titles are one word: no trial
    words = np.array(["red", "blue", "green", "dark", "night", "love", "war", "city", "star", "river"])
    rng = np.random.default_rng(0)
    titles = [" ".join(rng.choice(words, 2, replace=False)) + f" ({y})" for y in raw.items.year]
    ds = build_dataset(dataclasses.replace(raw, items=raw.items.assign(title=titles)))
    assert has_title_words(ds)
    cfg = TrainConfig(tower_epochs=2, baselines_budget=0, id_dropout_grid=(0.0,))
    trained = []
    real = train_mod.train_two_tower
    monkeypatch.setattr(train_mod, "train_two_tower",
                        lambda d, c, *a, **k: (trained.append(c.titles), real(d, c, *a, **k))[1])
    model, info = best_two_tower(ds, cfg, _val_evaluator(ds, cfg), progress=False)
    trial = info["titles_trial"]
    assert trained == [False, True]
    assert trial["kept"] == (trial["valid_recall@50"] >= trial["without"] * (1 + TITLES_MIN_GAIN)) == info["titles"]
    assert (model.cfg.title_vocab > 0) == info["titles"]
    refit, _ = train_mod.refit_two_tower(ds, cfg, model, {**info, "titles": True}, progress=False)
    assert trained[-1] is True and refit.cfg.title_vocab > 0
    _, forced = best_two_tower(ds, dataclasses.replace(cfg, titles=True), _val_evaluator(ds, cfg), progress=False)
    assert "titles_trial" not in forced and forced["titles"] is True and trained[-1] is True
