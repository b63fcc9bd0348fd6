"""`recserve train --resume`: the towers start from an earlier run's weights, rows carried over by raw id."""

from __future__ import annotations

import json

import numpy as np
import torch

from recserve import checkpoint
from recserve.data import generate
from recserve.data.dataset import build_dataset
from recserve.models import TowerConfig, TwoTower
from recserve.train import warm_start


def test_ids_are_carried_over_by_raw_id_and_new_ones_start_fresh(tiny_artifacts, tiny_train_config):
    old, meta = checkpoint.load(tiny_artifacts / "two_tower.pt")
    old_users = meta["vocab"]["user_ids"]
    # the same generator with more users and items: the first ones share raw ids with the old run
    ds = build_dataset(generate(n_users=340, n_items=260, n_interactions=10000, seed=7))
    model = TwoTower(TowerConfig(ds.n_users, ds.n_items, ds.n_genres, ds.user_cat_cards,
                                 dim=old.cfg.dim, temperature=old.cfg.temperature))
    fresh_before = model.user_tower.user_emb.weight.detach().clone()
    report = warm_start(model, tiny_artifacts / "two_tower.pt", ds)
    assert report["users_carried"] == len(set(old_users) & set(ds.user_ids.tolist())) > 0
    assert report["users_carried"] < ds.n_users, "some users are new"
    w_new, w_old = model.user_tower.user_emb.weight, old.user_tower.user_emb.weight
    for raw in (int(ds.user_ids[0]), int(ds.user_ids[-1])):
        i = int(np.flatnonzero(ds.user_ids == raw)[0])
        if raw in old_users:
            assert torch.equal(w_new[i], w_old[old_users.index(raw)])
        else:
            assert torch.equal(w_new[i], fresh_before[i]), "a user the old run never saw keeps its fresh init"
    hist_new, hist_old = model.user_tower.hist_emb.weight, old.user_tower.hist_emb.weight
    assert torch.equal(hist_new[-1], hist_old[-1]), "the padding row"
    for key in ("user_tower.mlp.0.weight", "item_tower.mlp.0.weight"):
        assert torch.equal(model.state_dict()[key], old.state_dict()[key])
    assert report["tensors_fresh"] == []


def test_a_resumed_run_keeps_the_earlier_tower_choice_and_beats_a_cold_start_of_the_same_length(
        tiny_artifacts, tiny_train_config, tmp_path):
    from dataclasses import replace

    from recserve.train import train_all

    raw = generate(n_users=300, n_items=240, n_interactions=9000, seed=7)
    short = replace(tiny_train_config, tower_epochs=1, baselines_budget=0.0, blend_budget=0.0)
    cold = train_all(raw, tmp_path / "cold", short, progress=False)
    warm = train_all(raw, tmp_path / "warm", replace(short, resume=str(tiny_artifacts)), progress=False)
    earlier = json.loads((tiny_artifacts / "train.json").read_text())["two_tower"]["id_dropout"]
    assert warm["two_tower"]["id_dropout"] == earlier and len(warm["two_tower"]["tried"]) == 1
    score = {name: t["two_tower"]["tried"][0]["valid_recall@50"] for name, t in (("cold", cold), ("warm", warm))}
    assert score["warm"] > score["cold"], score
