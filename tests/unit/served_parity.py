"""Served = evaluated, for unit tests that train their own artifacts: evaluate them, export a repository with the
test view, and rank the test users through it as the server would (`LocalPipeline`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def served_and_evaluated(art: Path, repo: Path) -> tuple[dict, dict, np.ndarray]:
    """(the served lists' metrics, the served row of `evaluate`, the served raw ids (test users, 50))."""
    from recserve.data.dataset import TEST, Dataset
    from recserve.evaluate import Evaluator, evaluate_artifacts, ranking_metrics
    from recserve.export.onnx import export_onnx
    from recserve.serving.local import LocalPipeline
    from recserve.serving.repository import RepoOptions, write_repository

    metrics = evaluate_artifacts(art)
    export_onnx(art)
    write_repository(art, repo, RepoOptions(view="test"))
    ds = Dataset.load(art / "dataset.npz")
    ev = Evaluator(ds, TEST)
    raw_ids = LocalPipeline(repo).recommend(ds.user_ids[ev.users], 50, ev.hour, ev.weekday)
    served = ranking_metrics(np.where(raw_ids >= 0, np.searchsorted(ds.item_ids, raw_ids), -1), ev.truth, ds.n_items)
    return served, metrics["models"][metrics["served"]], raw_ids
