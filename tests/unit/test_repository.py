"""Repository generation: configs rendered through protobuf and parsed back, manifest, atomic swap."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format

from recserve.errors import ArtifactError
from recserve.export import repository as repo
from recserve.export.index import IndexSpec, build_index, recall_vs_exact
from recserve.triton_models.ranker_inputs import candidate_features
from recserve.triton_models.retrieval import PAD_SCORE, mask_padding
from recserve.triton_models.topk import top_k
from recserve.triton_models.user_features import lookup_users

META = {"user_cat_names": ["age", "gender"], "history_len": 5, "dim": 8, "n_genres": 3, "n_items": 40,
        "fingerprint": "f"}


@pytest.mark.parametrize("flavor", ["embedded", "native"])
def test_every_config_renders_through_protobuf_and_parses_back_identically(flavor):
    opts = repo.RepoOptions(flavor=flavor, candidates=7)
    configs = {n: repo.model_config(n, META, opts) for n in (*repo.ONNX_MODELS, *repo.PY_MODELS)}
    configs["recommend"] = repo.ensemble_config(META, opts)
    for name, cfg in configs.items():
        parsed = repo.parse(repo.render(cfg))
        assert parsed.name == name
        back = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
        assert [i["name"] for i in back["input"]] == [i["name"] for i in cfg["input"]]
        assert back["max_batch_size"] == cfg["max_batch_size"]
        if name != "recommend":
            assert back["dynamic_batching"]["preferred_batch_size"], name
            assert back["instance_group"][0]["kind"] == "KIND_CPU"


def test_native_flavor_uses_the_onnxruntime_backend_and_embedded_the_python_backend():
    native = repo.parse(repo.render(repo.model_config("ranker", META, repo.RepoOptions(flavor="native"))))
    embedded = repo.parse(repo.render(repo.model_config("ranker", META, repo.RepoOptions(flavor="embedded"))))
    assert native.platform == "onnxruntime_onnx" and native.default_model_filename == "model.onnx"
    assert [list(i.reshape.shape) for i in native.input if i.name == "hour"] == [[]]   # [B,1] -> [B]
    assert embedded.backend == "python" and not embedded.platform
    assert repo.parse(repo.render(repo.model_config("retrieval", META, repo.RepoOptions(flavor="native")))).backend \
        == "python"


def test_ensemble_wires_every_step_input_to_an_ensemble_input_or_an_earlier_output():
    opts = repo.RepoOptions(candidates=7)
    ens = repo.ensemble_config(META, opts)
    io = repo.model_io(META, 7)
    available = {t["name"] for t in ens["input"]}
    for step in ens["ensemble_scheduling"]["step"]:
        model_inputs = {t["name"] for t in io[step["model_name"]][0]}
        assert set(step["input_map"]) == model_inputs, step["model_name"]
        assert set(step["input_map"].values()) <= available, step["model_name"]
        assert set(step["output_map"]) <= {t["name"] for t in io[step["model_name"]][1]}
        available |= set(step["output_map"].values())
    assert {t["name"] for t in ens["output"]} <= available


def test_ensemble_batch_size_does_not_exceed_its_smallest_member():
    opts = repo.RepoOptions()
    ens = repo.ensemble_config(META, opts)
    members = [repo.model_config(s["model_name"], META, opts) for s in ens["ensemble_scheduling"]["step"]]
    assert ens["max_batch_size"] <= min(m["max_batch_size"] for m in members)


def test_render_rejects_a_field_model_config_does_not_have():
    with pytest.raises(json_format.ParseError):
        repo.render({"name": "x", "max_batch_sizes": 3})


def test_bad_options_are_rejected_with_the_flag_named(tmp_path):
    with pytest.raises(ArtifactError, match="--flavor"):
        repo.RepoOptions(flavor="docker").validate()
    with pytest.raises(ArtifactError, match="export onnx"):
        repo.write_repository(tmp_path, tmp_path / "r")


def test_swap_replaces_the_old_repository_whole(tmp_path):
    target = tmp_path / "model_repository"
    target.mkdir()
    (target / "stale").write_text("old")
    new = tmp_path / "build"
    new.mkdir()
    (new / "fresh").write_text("new")
    repo._swap_into_place(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["model_repository"]


def test_flat_index_is_exact_and_ivf_recall_is_measured():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((3000, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:100] + 0.1 * rng.standard_normal((100, 16)).astype(np.float32)
    flat, spec = build_index(items, IndexSpec("auto"))
    assert spec.kind == "flat" and recall_vs_exact(flat, items, queries, 50) == 1.0
    ivf, spec = build_index(items, IndexSpec("ivf", nlist=32, nprobe=4))
    r = recall_vs_exact(ivf, items, queries, 50)
    assert spec.kind == "ivf" and 0.3 < r < 1.0
    ivf_all, _ = build_index(items, IndexSpec("ivf", nlist=32, nprobe=32))
    assert recall_vs_exact(ivf_all, items, queries, 50) > 0.99


def test_index_kind_follows_catalogue_size():
    assert IndexSpec().resolved(99_999).kind == "flat"
    big = IndexSpec().resolved(1_000_000)
    assert big.kind == "ivf" and big.nlist == 4000 and big.nprobe == 250


def test_faiss_padding_is_masked_with_a_finite_lowest_score():
    ids, scores = mask_padding(np.array([[3, -1]]), np.array([[0.5, 1e30]], np.float32))
    assert ids.tolist() == [[3, -1]] and scores[0, 1] == PAD_SCORE and np.isfinite(scores).all()


def test_candidate_features_mark_padding_and_seen_items_invalid():
    tables = {"genres": np.eye(4, 3, dtype=np.float32), "year": np.arange(4), "pop": np.arange(4, dtype=np.float32),
              "item_vec": np.arange(8, dtype=np.float32).reshape(4, 2),
              "seen_indptr": np.array([0, 1, 1]), "seen": np.array([2])}
    out = candidate_features(np.array([[2, 1, -1], [2, 3, 0]]), np.array([0, 1]), tables)
    assert out["cand_valid"].tolist() == [[False, True, False], [True, True, True]]
    assert out["cand_idx"].tolist() == [[2, 1, 0], [2, 3, 0]]
    assert out["cand_vec"].shape == (2, 3, 2) and out["cand_year"].tolist() == [[2, 1, 0], [2, 3, 0]]


def test_top_k_skips_invalid_candidates_and_keeps_retrieval_order_on_ties():
    ids, scores = top_k(np.array([1.0, 5.0, 5.0, 9.0]), np.array([10, 11, 12, 13]),
                        np.array([True, True, True, False]), 3)
    assert ids.tolist() == [11, 12, 10] and scores.tolist() == [5.0, 5.0, 1.0]
    assert top_k(np.array([1.0]), np.array([4]), np.array([False]), 1)[0].size == 0


def test_lookup_users_marks_unknown_ids():
    assert lookup_users(np.array([5, 7, 100, 1]), np.array([1, 5, 9])).tolist() == [1, -1, -1, 0]


def test_readme_documents_every_generated_model():
    text = repo.README.read_text()
    for model in (*repo.ONNX_MODELS, *repo.PY_MODELS, "recommend"):
        assert f"`{model}`" in text, model


def test_tensorrt_profiles_follow_the_batchers_preferred_sizes():
    from recserve.export.tensorrt import profile_ranges

    assert profile_ranges([4, 8], 32) == [(1, 4, 4), (5, 8, 8), (9, 32, 32)]
    assert profile_ranges([16, 64], 256) == [(1, 16, 16), (17, 64, 64), (65, 256, 256)]


def test_without_tensorrt_the_status_says_why_in_one_line():
    import importlib.util

    from recserve.export.tensorrt import tensorrt_status

    usable, note = tensorrt_status()
    if importlib.util.find_spec("tensorrt") is None:
        assert not usable and "TensorRT is not installed" in note and "ONNX flavor" in note
    assert "\n" not in note


def test_native_config_switches_to_tensorrt_plan_when_engines_are_built():
    cfg = repo.parse(repo.render(repo.model_config("ranker", META, repo.RepoOptions(flavor="native", tensorrt=True))))
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
