"""Distil a large DCN-v2 teacher into a small student ranker, and say whether the student is worth shipping.

The teacher is trained exactly as `recserve train` trains the ranker (`train_ranker`), only wider and
deeper. The student sees the same groups of [positive, mined negatives] and learns from both the label
and the teacher's softmax over each group (listwise distillation, Hinton et al. 2015):

    loss = alpha * CE(student, positive) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

Both are scored on the test split as `recserve evaluate` scores the ranker, and timed per request
(one user, 500 candidates) in ONNX Runtime and PyTorch eager. The student ships when it keeps at least
98% of the teacher's ndcg@10 at under half its latency.

Written into ARTIFACTS: ranker_teacher.pt, ranker_student.pt, distill.json; ranker.pt only with `promote`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from recserve import checkpoint
from recserve.data.dataset import TEST, VALID, Dataset
from recserve.errors import ArtifactError, RecserveError
from recserve.evaluate import Evaluator, sources_for
from recserve.export.onnx import export_model, random_inputs
from recserve.models import Ranker, RankerConfig, TwoTower
from recserve.ranking import candidates as candidate_rule
from recserve.reference import RANKER_INPUTS, item_vectors, ranker_batch, user_vectors
from recserve.train import (
    EarlyStopping,
    Optimizer,
    TrainConfig,
    _epochs,
    _log,
    blend_scale,
    ranker_examples,
    train_ranker,
)

TEACHER = {"emb_dim": 32, "cross_layers": 3, "hidden": [512, 256, 128], "dropout": 0.2}
STUDENT = {"emb_dim": 8, "cross_layers": 1, "hidden": [32], "dropout": 0.1}
KEEP_AT_LEAST = 0.98       # student ndcg@10 / teacher ndcg@10
MAX_LATENCY_RATIO = 0.5    # student median / teacher median, ONNX Runtime on one thread
LATENCY_BASIS = "onnxruntime_1_thread"
HELD_OUT_SHARE = 15        # percent of users held out of ranker training, as in train_ranker
FILES = {"teacher": "ranker_teacher.pt", "student": "ranker_student.pt", "current": "ranker.pt"}
# Fields of RankerConfig that come from the data and the two towers, never from the caller.
_DATA_FIELDS = ("n_users", "n_items", "n_genres", "user_cat_cards", "tower_dim", "retrieval_temperature")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """Listwise distillation loss over groups whose column 0 is the positive.

    Args:
        student: (B, G) student scores.
        teacher: (B, G) teacher scores (no gradient flows into them).
        alpha: weight of the label's cross-entropy; 1 is plain listwise CE, 0 is pure distillation.
        temperature: softens both softmaxes; the KL term is scaled by T^2 so its gradients keep their size.
    """
    ce = F.cross_entropy(student, torch.zeros(len(student), dtype=torch.long))
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher.detach() / temperature, dim=-1),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def held_out_split(users: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): 15% of the users, drawn as `train_ranker` draws them from the same generator."""
    uniq = np.unique(users)
    held = np.isin(users, rng.permutation(uniq)[: max(1, len(uniq) * HELD_OUT_SHARE // 100)])
    return np.flatnonzero(~held), np.flatnonzero(held)


def ranker_config(ds: Dataset, two_tower: TwoTower, defaults: dict, overrides: dict | None, name: str) -> RankerConfig:
    """RankerConfig sized to the data and towers, with `defaults` then `overrides` for the architecture."""
    allowed = {f.name for f in dataclasses.fields(RankerConfig)} - set(_DATA_FIELDS)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise RecserveError(f"{name}_cfg: unknown field(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(sorted(allowed))}")
    arch = {**defaults, **overrides}
    if not arch.get("hidden", [1]) or arch.get("cross_layers", 0) < 0:
        raise RecserveError(f"{name}_cfg: `hidden` needs at least one layer and `cross_layers` must be >= 0")
    return RankerConfig(ds.n_users, ds.n_items, ds.n_genres, ds.user_cat_cards, two_tower.cfg.dim,
                        retrieval_temperature=two_tower.cfg.temperature, **arch)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _scores(model: Ranker, data: dict[str, torch.Tensor], rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(*[data[k][rows[s:s + chunk]] for k in RANKER_INPUTS]) for s in range(0, len(rows), chunk)])


def _ce(scores: torch.Tensor) -> float:
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long)).item()


def train_student(data: dict[str, torch.Tensor], teacher_scores: torch.Tensor, ranker_cfg: RankerConfig,
                  cfg: TrainConfig, alpha: float, temperature: float, progress: bool = True
                  ) -> tuple[Ranker, dict]:
    """Fit a student on the distillation loss; keep the epoch with the lowest held-out CE (train_ranker's rule).

    Selecting on the label's CE, not on the mixed loss, keeps the student's choice comparable with the
    teacher's and independent of alpha. The held-out users are the ones the teacher never trained on.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    fit_rows, held = held_out_split(data["user_idx"].numpy(), rng)
    held_rows = torch.as_tensor(held)
    model = Ranker(ranker_cfg)
    opt = Optimizer(model, lr=cfg.ranker_lr, weight_decay=1e-6)
    stopper, history = EarlyStopping(model, patience=2, higher_is_better=False), []
    bar = _epochs(cfg.ranker_epochs, "student", progress)
    for epoch in bar:
        model.train()
        perm = torch.as_tensor(rng.permutation(fit_rows))
        for s in range(0, len(perm), cfg.ranker_batch):
            idx = perm[s:s + cfg.ranker_batch]
            loss = distill_loss(model(*[data[k][idx] for k in RANKER_INPUTS]), teacher_scores[idx], alpha, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        held_scores = _scores(model, data, held_rows)
        held_ce = _ce(held_scores)
        held_kd = distill_loss(held_scores, teacher_scores[held_rows], alpha, temperature).item()
        history.append({"epoch": epoch + 1, "held_out_ce": round(held_ce, 5),
                        "held_out_distill_loss": round(held_kd, 5)})
        bar.set_postfix(held_out_ce=f"{held_ce:.4f}")
        if stopper.step(held_ce):
            break
    best = stopper.restore()
    model.eval()
    info = {"held_out_ce": round(best, 5), "epochs": history, "fit_groups": int(len(fit_rows)),
            "held_out_groups": int(len(held))}
    _log(f"  student: best held-out CE {best:.4f} after {len(history)} epoch(s)")
    return model, info


def latency_requests(ds: Dataset, two_tower: TwoTower, candidates: int = 500, n_users: int = 50, seed: int = 0
                     ) -> list[dict[str, np.ndarray]]:
    """Real one-user requests: test users' context and their top-`candidates` two-tower items, inputs (1, K, ...)."""
    ev = Evaluator(ds, TEST, two_tower.cfg.history_len)
    pick = np.sort(np.random.default_rng(seed).choice(len(ev.users), min(n_users, len(ev.users)), replace=False))
    users = ev.users[pick]
    f = ev.tables.users(users)
    uv = user_vectors(two_tower, f)
    iv = item_vectors(two_tower, ds)
    cand = np.maximum(candidate_rule(uv @ iv.T, users, ev.seen, candidates), 0)
    batch = ranker_batch(ev.tables, f, uv, ev.hour[pick], ev.weekday[pick], cand, iv)
    return [{k: np.ascontiguousarray(batch[k][r:r + 1]) for k in RANKER_INPUTS} for r in range(len(users))]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "mean_ms": round(float(ms.mean()), 4)}


def _time_interleaved(fns: dict, requests: list[dict], runs: int, warmup: int) -> dict[str, dict[str, float]]:
    """Time every model on the same request in turn, rotating who goes first, so load spikes hit all alike."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](requests[i % len(requests)])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        req = requests[i % len(requests)]
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[name](req)
            times[name].append(time.perf_counter() - t0)
    return {n: _summary(t) for n, t in times.items()}


def _torch_fn(model: Ranker):
    def run(req):
        with torch.no_grad():
            return model(*[torch.from_numpy(req[k]) for k in RANKER_INPUTS])
    return run


def _ort_fn(session: ort.InferenceSession):
    return lambda req: session.run(None, req)


def measure_latency(artifacts: Path, models: tuple[str, ...] = ("teacher", "student", "current"), candidates: int = 500,
                    runs: int = 200, warmup: int = 20, n_users: int = 50, seed: int = 0) -> dict:
    """Per-request latency of each ranker checkpoint, one user x `candidates`, in ONNX Runtime and PyTorch eager.

    Each model is exported to a temporary ONNX file (checked against PyTorch on a real request). Settings:
    ONNX Runtime with one intra-op thread, ONNX Runtime with its default threads, PyTorch eager with one thread
    and with torch's default threads. Figures are wall-clock per call (time.perf_counter), median and p90.
    """
    artifacts = Path(artifacts)
    ds = Dataset.load(artifacts / "dataset.npz")
    two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", ds.fingerprint)
    rankers = {n: checkpoint.load(artifacts / FILES[n], ds.fingerprint)[0] for n in models
               if n != "current" or (artifacts / FILES[n]).exists()}
    requests = latency_requests(ds, two_tower, candidates, n_users, seed)
    one = ort.SessionOptions()
    one.intra_op_num_threads, one.inter_op_num_threads = 1, 1
    sessions: dict[str, dict[str, ort.InferenceSession]] = {"one": {}, "default": {}}
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        example = random_inputs("ranker", ds, two_tower.cfg.history_len, two_tower.cfg.dim, batch=4, k=8, seed=1)
        for name, model in rankers.items():
            path = Path(tmp) / f"{name}.onnx"
            export_model(model, "ranker", example, path)
            sessions["one"][name] = ort.InferenceSession(str(path), one, providers=["CPUExecutionProvider"])
            sessions["default"][name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = sessions["one"][name].run(None, requests[0])[0]
            want = _torch_fn(model)(requests[0]).numpy()
            errors[name] = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
    load_before = os.getloadavg()
    settings = {
        "onnxruntime_1_thread": _time_interleaved({n: _ort_fn(s) for n, s in sessions["one"].items()},
                                                  requests, runs, warmup),
        "onnxruntime_default_threads": _time_interleaved({n: _ort_fn(s) for n, s in sessions["default"].items()},
                                                         requests, runs, warmup),
    }
    default_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        settings["torch_eager_1_thread"] = _time_interleaved({n: _torch_fn(m) for n, m in rankers.items()},
                                                             requests, runs, warmup)
    finally:
        torch.set_num_threads(default_threads)
    settings["torch_eager_default_threads"] = _time_interleaved({n: _torch_fn(m) for n, m in rankers.items()},
                                                                requests, runs, warmup)
    return {
        "candidates": int(requests[0]["cand_idx"].shape[1]), "requests": len(requests), "runs": runs, "warmup": warmup,
        "settings": settings, "onnx_vs_torch_max_rel_error": errors,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": default_threads, "onnxruntime": ort.__version__,
                    "torch": torch.__version__, "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }


def _promote(artifacts: Path, promote: bool, worth: bool) -> dict:
    if not promote:
        return {"requested": False, "promoted": False,
                "note": "ranker.pt left alone (promotion not requested)"}
    if not worth:
        return {"requested": True, "promoted": False,
                "note": "ranker.pt left alone: the student did not pass the gate"}
    current = artifacts / FILES["current"]
    if current.exists():
        shutil.copyfile(current, artifacts / "ranker_previous.pt")
    shutil.copyfile(artifacts / FILES["student"], current)
    return {"requested": True, "promoted": True,
            "note": "ranker_student.pt copied over ranker.pt (the old one kept as ranker_previous.pt); "
                    "re-run `recserve export onnx` and `recserve export repository` to ship it"}


def distill(artifacts: Path, cfg: TrainConfig | None = None, teacher_cfg: dict | None = None,
            student_cfg: dict | None = None, alpha: float = 0.5, temperature: float = 1.0, progress: bool = True,
            promote: bool = False, latency_runs: int = 200, candidates: int = 500, compare_current: bool = True
            ) -> dict:
    """Train teacher and student rankers on ARTIFACTS' data and towers, evaluate, time, write distill.json.

    Args:
        artifacts: directory `recserve train` wrote (dataset.npz, two_tower.pt).
        cfg: training settings; default: the ones two_tower.pt was trained with.
        teacher_cfg, student_cfg: RankerConfig architecture fields overriding TEACHER / STUDENT.
        alpha: weight of the label's CE in the student's loss (1: no distillation).
        temperature: distillation temperature T.
        promote: copy the student over ranker.pt when it passes the gate.
        latency_runs: timed calls per model and setting (after 20 warm-up calls).
        candidates: candidates per timed request.
        compare_current: also evaluate and time the ranker.pt in ARTIFACTS, for reference.
    """
    if not 0.0 <= alpha <= 1.0:
        raise RecserveError(f"`alpha` must be between 0 and 1, got {alpha}")
    if temperature <= 0:
        raise RecserveError(f"`temperature` must be greater than 0, got {temperature}")
    if latency_runs < 1:
        raise RecserveError(f"`latency_runs` must be at least 1, got {latency_runs}")
    t0 = time.time()
    artifacts = Path(artifacts)
    if not (artifacts / "dataset.npz").exists():
        raise ArtifactError(f"{artifacts / 'dataset.npz'} is missing: run `recserve train` to create it")
    ds = Dataset.load(artifacts / "dataset.npz")
    two_tower, tt_ckpt = checkpoint.load(artifacts / "two_tower.pt", ds.fingerprint)
    if cfg is None:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in tt_ckpt.get("train_config", {}).items() if k in known})
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the served candidate rule: both rankers re-rank the merged sources' candidates and see their scores
    examples = ranker_examples(ds, two_tower, cfg, sources_for(artifacts, VALID))
    scale = blend_scale(examples)
    t_cfg = replace(ranker_config(ds, two_tower, TEACHER, teacher_cfg, "teacher"), blend_scale=scale)
    s_cfg = replace(ranker_config(ds, two_tower, STUDENT, student_cfg, "student"), blend_scale=scale)
    extra = {"train_config": dataclasses.asdict(cfg)}

    t = time.time()
    _log(f"teacher: {_arch(t_cfg)}")
    teacher = train_ranker(ds, two_tower, cfg, progress, ranker_cfg=t_cfg, examples=examples).eval()
    teacher_seconds = time.time() - t
    checkpoint.save(teacher, "ranker", artifacts / FILES["teacher"], ds.fingerprint, **extra,
                    distill={"role": "teacher"})

    t = time.time()
    data = {k: torch.as_tensor(v) for k, v in examples.items()}
    all_rows = torch.arange(len(data["user_idx"]))
    teacher_scores = _scores(teacher, data, all_rows)                               # (N, 1 + negatives)
    _log(f"student: {_arch(s_cfg)}, alpha {alpha}, temperature {temperature}")
    student, s_info = train_student(data, teacher_scores, s_cfg, cfg, alpha, temperature, progress)
    student_seconds = time.time() - t
    checkpoint.save(student, "ranker", artifacts / FILES["student"], ds.fingerprint, **extra,
                    distill={"role": "student", "alpha": alpha, "temperature": temperature,
                             "teacher": FILES["teacher"]})
    _, held = held_out_split(data["user_idx"].numpy(), np.random.default_rng(cfg.seed + 2))
    teacher_held_ce = _ce(teacher_scores[torch.as_tensor(held)])

    ev = Evaluator(ds, TEST, two_tower.cfg.history_len, sources=sources_for(artifacts, TEST))
    models = {
        "teacher": {"file": FILES["teacher"], "params": n_params(teacher), "held_out_ce": round(teacher_held_ce, 5),
                    "train_seconds": round(teacher_seconds, 1), "test": ev.two_tower_ranker(two_tower, teacher)},
        "student": {"file": FILES["student"], "params": n_params(student), **s_info,
                    "train_seconds": round(student_seconds, 1), "test": ev.two_tower_ranker(two_tower, student)},
    }
    timed: tuple[str, ...] = ("teacher", "student")
    if compare_current and (artifacts / FILES["current"]).exists():
        current, _ = checkpoint.load(artifacts / FILES["current"], ds.fingerprint)
        models["current"] = {"file": FILES["current"], "params": n_params(current),
                             "test": ev.two_tower_ranker(two_tower, current)}
        timed += ("current",)
    _log("timing per-request latency ...")
    latency = measure_latency(artifacts, timed, candidates=candidates, runs=latency_runs, seed=cfg.seed)

    keeps = models["student"]["test"]["ndcg@10"] / max(models["teacher"]["test"]["ndcg@10"], 1e-12)
    ratios = {s: round(v["student"]["median_ms"] / v["teacher"]["median_ms"], 4)
              for s, v in latency["settings"].items()}
    worth = bool(keeps >= KEEP_AT_LEAST and ratios[LATENCY_BASIS] < MAX_LATENCY_RATIO)
    report = {
        "data": {"source": ds.source, "fingerprint": ds.fingerprint, "groups": int(len(data["user_idx"])),
                 "negatives_per_group": cfg.ranker_negatives},
        "config": {"train": dataclasses.asdict(cfg), "alpha": alpha, "temperature": temperature,
                   "teacher": _arch(t_cfg), "student": _arch(s_cfg)},
        "models": models,
        "baseline_two_tower_only": ev.two_tower(two_tower),
        "latency": latency,
        "student_keeps": round(keeps, 5),
        "latency_ratio": ratios[LATENCY_BASIS],
        "latency_ratios": ratios,
        "gate": {"keep_at_least": KEEP_AT_LEAST, "latency_ratio_below": MAX_LATENCY_RATIO,
                 "latency_basis": f"{LATENCY_BASIS} median"},
        "worth_shipping": worth,
    }
    report["promotion"] = _promote(artifacts, promote, worth)
    report["seconds"] = round(time.time() - t0, 1)
    (artifacts / "distill.json").write_text(json.dumps(report, indent=2))
    return report


def _arch(rc: RankerConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(rc).items() if k not in _DATA_FIELDS}


def format_distill(report: dict) -> str:
    """A table of the teacher, student and current ranker, then the verdict, for the CLI."""
    settings = list(report["latency"]["settings"])
    short = {"onnxruntime_1_thread": "ort 1thr", "onnxruntime_default_threads": "ort dflt",
             "torch_eager_1_thread": "torch 1thr", "torch_eager_default_threads": "torch dflt"}
    head = f"{'model':<9}{'params':>10}{'ndcg@10':>9}{'rec@50':>8}" + "".join(
        f"{short.get(s, s) + ' ms p50/p90':>22}" for s in settings)
    lines = [f"{report['data']['source']}: {report['latency']['candidates']} candidates per request, "
             f"{report['latency']['runs']} timed runs per setting", head]
    for name, m in report["models"].items():
        lat = report["latency"]["settings"]
        cells = "".join(f"{lat[s][name]['median_ms']:>13.3f}/{lat[s][name]['p90_ms']:<8.3f}"
                        if name in lat[s] else f"{'-':>22}" for s in settings)
        lines.append(f"{name:<9}{m['params']:>10,}{m['test']['ndcg@10']:>9.4f}{m['test']['recall@50']:>8.4f}{cells}")
    gate = report["gate"]
    verdict = "yes" if report["worth_shipping"] else "no"
    lines.append(f"student keeps {report['student_keeps']:.1%} of the teacher's ndcg@10 (needs >= "
                 f"{gate['keep_at_least']:.0%}); latency ratio {report['latency_ratio']:.2f} ({gate['latency_basis']}, "
                 f"needs < {gate['latency_ratio_below']}) -> worth shipping: {verdict}")
    lines.append(report["promotion"]["note"])
    return "\n".join(lines)


__all__ = ["distill", "distill_loss", "format_distill", "measure_latency", "TEACHER", "STUDENT"]
