"""Distillation: the loss on hand-made tensors, then a tiny teacher -> student run on synthetic data."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from recserve import checkpoint
from recserve import distill as dst
from recserve.errors import RecserveError

pytestmark = pytest.mark.unit

REPORT_KEYS = {"data", "config", "models", "baseline_two_tower_only", "latency", "student_keeps", "latency_ratio",
               "latency_ratios", "gate", "worth_shipping", "promotion", "seconds"}
TINY_TEACHER = {"emb_dim": 16, "cross_layers": 3, "hidden": [256, 128]}
SETTINGS = {"onnxruntime_1_thread", "onnxruntime_default_threads", "torch_eager_1_thread",
            "torch_eager_default_threads"}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the loss, on hand-made tensors ---------------------------------------------------------------

def test_loss_is_plain_listwise_ce_when_alpha_is_one():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    want = F.cross_entropy(student, torch.zeros(5, dtype=torch.long))
    for t in (0.5, 1.0, 4.0):
        assert torch.allclose(dst.distill_loss(student, teacher, 1.0, t), want, atol=0, rtol=1e-6)


def test_kl_term_is_zero_when_student_equals_teacher_and_positive_otherwise():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    assert dst.distill_loss(logits, logits.clone(), 0.0, 2.0).abs().item() < 1e-6
    assert dst.distill_loss(logits, logits.flip(-1), 0.0, 2.0).item() > 0.01
    # alpha = 0.5 with identical logits leaves half the CE.
    ce = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(dst.distill_loss(logits, logits, 0.5, 1.0), 0.5 * ce, atol=1e-6)


def test_kl_term_matches_a_hand_computed_value_and_scales_with_t_squared():
    teacher = torch.tensor([[0.0, 0.0]])                       # softmax [1/2, 1/2]
    student = torch.tensor([[math.log(3.0), 0.0]])             # softmax [3/4, 1/4]
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(teacher || student)
    assert dst.distill_loss(student, teacher, 0.0, 1.0).item() == pytest.approx(kl, rel=1e-6)
    # At T=2 the student's logits are halved first, so doubling them gives the same softmax; the T^2 factor remains.
    assert dst.distill_loss(2 * student, teacher, 0.0, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_teacher_receives_no_gradient():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    dst.distill_loss(student, teacher, 0.3, 2.0).backward()
    assert student.grad is not None and teacher.grad is None


# --- a tiny end-to-end run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tiny_artifacts, tiny_train_config, tmp_path_factory):
    import shutil

    art = tmp_path_factory.mktemp("distill") / "artifacts"
    shutil.copytree(tiny_artifacts, art)     # distilling writes into the artifacts
    cfg = tiny_train_config
    before = _sha(art / "ranker.pt")
    # A mid-sized teacher and no timing of ranker.pt keep this quick; the defaults are for real data.
    report = dst.distill(art, cfg, teacher_cfg=TINY_TEACHER, alpha=0.5, temperature=2.0, progress=False,
                         latency_runs=5, candidates=60, compare_current=False)
    return art, report, before


def test_writes_both_checkpoints_and_the_report(run):
    art, report, _ = run
    for name in ("ranker_teacher.pt", "ranker_student.pt", "distill.json"):
        assert (art / name).exists(), name
    assert json.loads((art / "distill.json").read_text()) == json.loads(json.dumps(report))
    assert REPORT_KEYS <= set(report)


def test_student_is_the_small_architecture_with_far_fewer_parameters(run):
    art, report, _ = run
    fp = report["data"]["fingerprint"]
    teacher, t_ckpt = checkpoint.load(art / "ranker_teacher.pt", fp)
    student, s_ckpt = checkpoint.load(art / "ranker_student.pt", fp)
    assert (student.cfg.cross_layers, student.cfg.hidden, student.cfg.emb_dim) == (1, [32], 8)
    assert (teacher.cfg.cross_layers, teacher.cfg.hidden, teacher.cfg.emb_dim) == (3, [256, 128], 16)
    assert teacher.cfg.dropout == dst.TEACHER["dropout"]       # overrides merge over the defaults
    assert dst.n_params(student) * 4 < dst.n_params(teacher)
    assert report["models"]["student"]["params"] == dst.n_params(student)
    assert s_ckpt["distill"] == {"role": "student", "alpha": 0.5, "temperature": 2.0, "teacher": "ranker_teacher.pt"}


def test_figures_are_finite_and_latencies_positive(run):
    _, report, _ = run
    assert "current" not in report["models"]
    for name in ("teacher", "student"):
        test = report["models"][name]["test"]
        assert {"ndcg@10", "recall@50"} <= set(test)
        assert all(v is None or (math.isfinite(v) and 0.0 <= v <= 1.0) for v in test.values()), (name, test)
    assert set(report["latency"]["settings"]) == SETTINGS
    assert report["latency"]["candidates"] == 60
    for setting, per_model in report["latency"]["settings"].items():
        assert set(per_model) == {"teacher", "student"}, setting
        for stats in per_model.values():
            assert stats["median_ms"] > 0 and stats["p90_ms"] >= stats["median_ms"], (setting, stats)
    assert all(e < 1e-4 for e in report["latency"]["onnx_vs_torch_max_rel_error"].values())
    assert math.isfinite(report["student_keeps"]) and report["student_keeps"] > 0
    assert report["latency_ratio"] == report["latency_ratios"]["onnxruntime_1_thread"] > 0
    want = report["student_keeps"] >= 0.98 and report["latency_ratio"] < 0.5
    assert report["worth_shipping"] is want
    assert [e["epoch"] for e in report["models"]["student"]["epochs"]][0] == 1


def test_promote_false_leaves_ranker_pt_untouched(run):
    art, report, before = run
    assert _sha(art / "ranker.pt") == before
    assert report["promotion"]["promoted"] is False
    assert "left alone" in report["promotion"]["note"]


def test_promotion_copies_the_student_and_keeps_the_previous_ranker(tmp_path):
    (tmp_path / "ranker.pt").write_bytes(b"old")
    (tmp_path / "ranker_student.pt").write_bytes(b"student")
    assert dst._promote(tmp_path, promote=True, worth=False)["promoted"] is False
    assert (tmp_path / "ranker.pt").read_bytes() == b"old"
    assert dst._promote(tmp_path, promote=True, worth=True)["promoted"] is True
    assert (tmp_path / "ranker.pt").read_bytes() == b"student"
    assert (tmp_path / "ranker_previous.pt").read_bytes() == b"old"


def test_format_distill_names_every_model_and_the_verdict(run):
    _, report, _ = run
    text = dst.format_distill(report)
    for word in ("teacher", "student", "worth shipping", "left alone"):
        assert word in text


def test_bad_settings_are_refused_with_the_field_named(run):
    art, _, _ = run
    with pytest.raises(RecserveError, match="alpha"):
        dst.distill(art, alpha=1.5)
    with pytest.raises(RecserveError, match="temperature"):
        dst.distill(art, temperature=0)
    with pytest.raises(RecserveError, match="student_cfg: unknown field.*widht"):
        dst.distill(art, student_cfg={"widht": 3}, progress=False)
