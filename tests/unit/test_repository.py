"""Repository generation from the serving spec: configs rendered through protobuf and parsed back, wiring, swap."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format

from recserve.errors import ArtifactError
from recserve.export.index import IndexSpec, build_index, recall_vs_exact
from recserve.serving import repository as repo
from recserve.serving import spec
from recserve.serving.steps.base import RequestError
from recserve.serving.steps.retrieval import check_request, lookup_users

SIZES = {"D": 8, "K": 7, "KMAX": 5, "G": 3, "S": 3}


@pytest.mark.parametrize("flavor", ["embedded", "native"])
def test_every_config_renders_through_protobuf_and_parses_back_identically(flavor):
    opts = repo.RepoOptions(flavor=flavor)
    configs = {s.name: repo.model_config(s.name, SIZES, opts) for s in spec.STEPS}
    configs[spec.ENSEMBLE] = repo.ensemble_config(opts, SIZES)
    for name, cfg in configs.items():
        parsed = repo.parse(repo.render(cfg))
        assert parsed.name == name
        back = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
        assert [i["name"] for i in back["input"]] == [i["name"] for i in cfg["input"]]
        assert back["max_batch_size"] == cfg["max_batch_size"]
    for s in spec.path():
        back = json_format.MessageToDict(repo.parse(repo.render(configs[s.name])), preserving_proto_field_name=True)
        assert back["dynamic_batching"]["preferred_batch_size"], s.name
        assert back["instance_group"][0]["kind"] == "KIND_CPU"


def test_configs_carry_the_specs_tensors_with_symbols_resolved():
    ranker = repo.parse(repo.render(repo.model_config("ranker", SIZES, repo.RepoOptions())))
    dims = {t.name: list(t.dims) for t in ranker.input}
    assert dims == {"user_idx": [1], "user_vec": [8], "context_hour": [1], "context_weekday": [1], "cand_idx": [7],
                    "cand_src": [7, 3], "k": [1]}
    retrieval = repo.parse(repo.render(repo.model_config("retrieval", SIZES, repo.RepoOptions())))
    assert [t.name for t in retrieval.input if t.optional] == ["hour", "weekday"]
    assert retrieval.parameters["k_max"].string_value == "5"


def test_at_most_three_models_sit_on_the_request_path():
    ens = repo.ensemble_config(repo.RepoOptions(), SIZES)
    assert [s["model_name"] for s in ens["ensemble_scheduling"]["step"]] == ["retrieval", "ranker"]
    assert len(ens["ensemble_scheduling"]["step"]) <= 3


def test_native_flavor_runs_graphs_on_onnxruntime_and_python_steps_on_the_python_backend():
    native = repo.RepoOptions(flavor="native")
    ranker = repo.parse(repo.render(repo.model_config("ranker", SIZES, native)))
    assert ranker.platform == "onnxruntime_onnx" and ranker.default_model_filename == "model.onnx"
    tower = repo.parse(repo.render(repo.model_config("item_tower", SIZES, native, squeeze=("item_idx",))))
    assert [list(i.reshape.shape) for i in tower.input if i.name == "item_idx"] == [[]]   # [B,1] -> [B]
    embedded = repo.parse(repo.render(repo.model_config("ranker", SIZES, repo.RepoOptions())))
    assert embedded.backend == "python" and not embedded.platform
    assert repo.parse(repo.render(repo.model_config("retrieval", SIZES, native))).backend == "python"


def test_ensemble_wires_every_step_input_to_a_request_input_or_an_earlier_output():
    ens = repo.ensemble_config(repo.RepoOptions(), SIZES)
    available = {t["name"] for t in ens["input"]}
    for step in ens["ensemble_scheduling"]["step"]:
        s = spec.step(step["model_name"])
        assert set(step["input_map"]) == set(s.input_names), s.name
        assert set(step["input_map"].values()) <= available, s.name
        assert set(step["output_map"]) == set(s.output_names)
        assert not (set(step["output_map"].values()) & available), f"{s.name} overwrites a tensor"
        available |= set(step["output_map"].values())
    assert {t["name"] for t in ens["output"]} <= available


def test_wiring_refuses_a_step_input_nothing_produces(monkeypatch):
    broken = spec.Step("ranker", "onnx", "candidate", (spec.Tensor("nobody_makes_this", "INT64", (1,)),),
                       spec.RESPONSE, ("model.onnx",))
    monkeypatch.setattr(spec, "STEPS", (spec.step("retrieval"), broken))
    with pytest.raises(ValueError, match="nobody_makes_this"):
        spec.wiring()


def test_ensemble_batch_size_does_not_exceed_its_smallest_member():
    opts = repo.RepoOptions()
    ens = repo.ensemble_config(opts, SIZES)
    members = [repo.model_config(s["model_name"], SIZES, opts) for s in ens["ensemble_scheduling"]["step"]]
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
    flat, resolved = build_index(items, IndexSpec("auto"))
    assert resolved.kind == "flat" and recall_vs_exact(flat, items, queries, 50) == 1.0
    ivf, resolved = build_index(items, IndexSpec("ivf", nlist=32, nprobe=4))
    r = recall_vs_exact(ivf, items, queries, 50)
    assert resolved.kind == "ivf" and 0.3 < r < 1.0
    ivf_all, _ = build_index(items, IndexSpec("ivf", nlist=32, nprobe=32))
    assert recall_vs_exact(ivf_all, items, queries, 50) > 0.99


def test_index_kind_follows_catalogue_size():
    assert IndexSpec().resolved(99_999).kind == "flat"
    big = IndexSpec().resolved(1_000_000)
    assert big.kind == "ivf" and big.nlist == 4000 and big.nprobe == 250


def test_lookup_users_marks_unknown_ids():
    assert lookup_users(np.array([5, 7, 100, 1]), np.array([1, 5, 9])).tolist() == [1, -1, -1, 0]


def test_request_check_names_the_bad_value_and_fills_the_context():
    known = np.array([3, 8, 20])
    ok = {"user_id": np.array([[8]]), "k": np.array([[5]], np.int32)}
    check_request(ok, known, k_max=5)
    assert ok["user_idx"].tolist() == [[1]] and 0 <= int(ok["hour"][0, 0]) <= 23 and 0 <= int(ok["weekday"][0, 0]) <= 6
    for bad, pattern in (({"user_id": np.array([[9]])}, "unknown user_id 9"), ({"k": np.array([[6]], np.int32)},
                         r"k=6 is out of range: choose 1\.\.5"), ({"hour": np.array([[24]])}, "hour=24"),
                         ({"weekday": np.array([[-1]])}, "weekday=-1")):
        request = {"user_id": np.array([[3]]), "k": np.array([[1]], np.int32), "hour": np.array([[0]]),
                   "weekday": np.array([[0]]), **bad}
        with pytest.raises(RequestError, match=pattern):
            check_request(request, known, k_max=5)


def test_readme_table_is_the_one_the_spec_generates():
    text = repo.README.read_text()
    assert spec.markdown_table() in text, "regenerate it: python -m recserve.serving.spec (model_repository/README.md)"


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
    cfg = repo.parse(repo.render(repo.model_config("ranker", SIZES, repo.RepoOptions(flavor="native", tensorrt=True))))
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
