"""The context term ("popular and trending in the user's time") is served as it is evaluated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from served_parity import served_and_evaluated

pytestmark = pytest.mark.unit


def test_a_blend_with_the_context_term_serves_what_evaluate_and_the_reference_report(tmp_path):
    import torch

    from recserve.data import generate
    from recserve.data.dataset import TEST, Dataset
    from recserve.evaluate import Evaluator, ranking_metrics
    from recserve.reference import Reference
    from recserve.serving.local import LocalPipeline
    from recserve.serving.repository import RepoOptions, write_repository
    from recserve.train import TrainConfig, train_all

    art = tmp_path / "artifacts"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_all(generate(n_users=200, n_items=150, n_interactions=5000, seed=5, drift=8.0), art,
                  TrainConfig(tower_epochs=3, mf_epochs=1, ranker_epochs=1, candidates=40, baselines_budget=2.0,
                              blend_budget=2.0, titles_trial=False), progress=False)
    finally:
        torch.set_num_threads(before)
    # whatever validation chose, serve a blend in which the context term decides a good part of the order
    path = art / "blend.json"
    blend = json.loads(path.read_text())
    blend["coef"] = {**blend["coef"], "context": 2.0 * max(abs(v) for v in blend["coef"].values())}
    path.write_text(json.dumps(blend))
    served, offline, raw_ids = served_and_evaluated(art, tmp_path / "repo")
    ds = Dataset.load(art / "dataset.npz")
    ev = Evaluator(ds, TEST)
    k = json.loads((tmp_path / "repo" / "manifest.json").read_text())["candidates"]
    ref = Reference(art, target=TEST, candidates=k)
    lists = ref.recommend(ev.users, ev.hour, ev.weekday, 50)
    top = np.full((len(ev.users), 50), -1, np.int64)
    for r, (items, _) in enumerate(lists):
        top[r, :len(items)] = items
    exact = ranking_metrics(top, ev.truth, ds.n_items)
    for metric in ("ndcg@10", "recall@50"):
        assert served[metric] == pytest.approx(offline[metric], abs=1e-3), metric
        assert exact[metric] == pytest.approx(offline[metric], abs=1e-3), metric
    # and the term is really on the path: without it the served lists change
    blend["coef"]["context"] = 0.0
    path.write_text(json.dumps(blend))
    write_repository(art, tmp_path / "repo0", RepoOptions(view="test"))
    plain = LocalPipeline(tmp_path / "repo0").recommend(ds.user_ids[ev.users], 50, ev.hour, ev.weekday)
    assert (plain[:, :10] != raw_ids[:, :10]).any(axis=1).mean() > 0.2
