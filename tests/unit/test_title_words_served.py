"""Towers that read title words (kept by validation's trial, or `--titles`) are served as they are evaluated."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from served_parity import served_and_evaluated

pytestmark = pytest.mark.unit


def test_a_towers_model_with_title_words_serves_what_evaluate_reports(tmp_path):
    import torch

    from recserve import checkpoint
    from recserve.data import generate
    from recserve.train import TrainConfig, train_all

    raw = generate(n_users=200, n_items=150, n_interactions=5000, seed=5)
    words = np.array(["red", "blue", "night", "love", "war", "city", "star", "river", "king", "girl"])
    rng = np.random.default_rng(1)
    titles = [" ".join(rng.choice(words, 2, replace=False)) + f" ({y})" for y in raw.items.year]
    raw = dataclasses.replace(raw, items=raw.items.assign(title=titles))
    art = tmp_path / "artifacts"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_all(raw, art, TrainConfig(tower_epochs=3, mf_epochs=1, ranker_epochs=1, candidates=40,
                                        baselines_budget=2.0, blend_budget=2.0, titles=True), progress=False)
    finally:
        torch.set_num_threads(before)
    assert json.loads((art / "train.json").read_text())["two_tower"]["titles"] is True
    assert checkpoint.load(art / "two_tower.pt")[0].cfg.title_vocab > 0       # the refit towers read them too
    served, offline, _ = served_and_evaluated(art, tmp_path / "repo")
    for metric in ("ndcg@10", "recall@50"):
        assert served[metric] == pytest.approx(offline[metric], abs=1e-3), metric
