"""GPU paths, each checked against its CPU reference. Skipped with a reason where there is no GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recserve.export.onnx import random_inputs
from recserve.models import Ranker, RankerConfig, TowerConfig, TwoTower

SIZES = {"n_users": 500, "n_items": 800, "n_genres": 6, "user_cat_cards": [4, 3]}


class _DS:   # the few Dataset fields random_inputs reads
    n_users, n_items, n_genres, user_cat_cards = 500, 800, 6, [4, 3]


def _models(seed=0):
    torch.manual_seed(seed)
    tcfg = TowerConfig(**SIZES)
    return TwoTower(tcfg).eval(), Ranker(RankerConfig(**SIZES, tower_dim=tcfg.dim)).eval()


@torch.no_grad()
def test_towers_and_ranker_on_cuda_match_the_cpu_within_1e_5():
    torch.backends.cuda.matmul.allow_tf32 = False        # compare true FP32 with true FP32
    two_tower, ranker = _models()
    cases = [(two_tower.user_tower, random_inputs("user_tower", _DS, 20, 64, 33, 1, seed=3)),
             (two_tower.item_tower, random_inputs("item_tower", _DS, 20, 64, 33, 1, seed=4)),
             (ranker, random_inputs("ranker", _DS, 20, 64, 7, 500, seed=5))]
    for module, inputs in cases:
        cpu = module(*[torch.as_tensor(v) for v in inputs.values()])
        gpu = module.cuda()(*[torch.as_tensor(v).cuda() for v in inputs.values()]).cpu()
        module.cpu()
        rel = float((gpu - cpu).abs().max() / cpu.abs().max())
        assert rel < 1e-5, f"{type(module).__name__}: {rel:.2e}"


@torch.no_grad()
def test_fp16_ranker_on_cuda_keeps_the_fp32_top_10():
    _, ranker = _models(1)
    ranker = ranker.cuda()
    x = [torch.as_tensor(v).cuda() for v in random_inputs("ranker", _DS, 20, 64, 16, 500, seed=6).values()]
    fp32 = ranker(*x)
    with torch.autocast("cuda", dtype=torch.float16):
        fp16 = ranker(*x).float()
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10
                       for a, b in zip(fp32.topk(10).indices.cpu(), fp16.topk(10).indices.cpu())])
    assert overlap >= 0.9, overlap


def test_faiss_gpu_index_returns_the_cpu_results():
    faiss = pytest.importorskip("faiss", reason="faiss is not installed on this machine")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("this faiss build has no GPU support (faiss-cpu); the retrieval model stays on the CPU")
    from recserve.export.index import IndexSpec, build_index
    from recserve.serving.steps.retrieval import place_index

    rng = np.random.default_rng(0)
    items = rng.standard_normal((20000, 64)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:64]
    cpu, _ = build_index(items, IndexSpec("flat"))
    gpu, (device, _res) = place_index(cpu, prefer_gpu=True)
    assert device == "gpu"
    _, want = cpu.search(queries, 100)
    _, got = gpu.search(queries, 100)
    assert np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(want, got)]) > 0.999


def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    import onnxruntime as ort

    from recserve.export.onnx import export_model
    from recserve.export.tensorrt import EngineRunner, build_engine

    _, ranker = _models(2)
    example = random_inputs("ranker", _DS, 20, 64, 4, 50, seed=7)
    export_model(ranker, "ranker", example, tmp_path / "ranker.onnx")
    dims = {n: list(v.shape[1:]) for n, v in example.items()}
    build_engine(tmp_path / "ranker.onnx", tmp_path / "ranker.plan", dims, [4, 8], 16, int8=False)
    feed = random_inputs("ranker", _DS, 20, 64, 8, 50, seed=8)
    want = ort.InferenceSession(str(tmp_path / "ranker.onnx")).run(None, feed)[0]
    got = EngineRunner(tmp_path / "ranker.plan")(feed)["scores"]
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-2    # FP16 fallback allowed
