"""What lets training and evaluation run on a million items: lazy Adam for big id tables, sampled users,
batches sized by the catalogue, the per-model epoch budget."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from recserve import train as train_mod
from recserve.data import generate
from recserve.data.dataset import TEST, VALID, build_dataset
from recserve.evaluate import SCORE_CELLS, Evaluator, batch_for, users_for
from recserve.models import MatrixFactorization, MFConfig

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ds():
    return build_dataset(generate(n_users=300, n_items=200, n_interactions=6000, seed=11))


def test_big_id_tables_train_lazily_and_small_ones_as_before(monkeypatch):
    monkeypatch.setattr(train_mod, "SPARSE_ROWS", 50)
    model = MatrixFactorization(MFConfig(40, 100, 8))        # P: 40 rows (dense Adam), Q and b: 100 (lazy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = train_mod.Optimizer(model, lr=0.1)
    assert [type(o).__name__ for o in opt.opts] == ["Adam", "SparseAdam"]
    assert model.Q.sparse and model.b.sparse and not model.P.sparse
    u, i = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    for _ in range(2):
        opt.zero_grad()
        (-model.score(u, i).sum()).backward()
        opt.step()
    after = model.state_dict()
    touched = np.zeros(100, bool)
    touched[[3, 4, 5]] = True
    assert not torch.equal(after["Q.weight"][touched], before["Q.weight"][touched])
    assert torch.equal(after["Q.weight"][~touched], before["Q.weight"][~touched])   # lazy: untouched rows stay
    assert not torch.equal(after["P.weight"][:3], before["P.weight"][:3])

    monkeypatch.setattr(train_mod, "SPARSE_ROWS", 10_000)
    small = MatrixFactorization(MFConfig(40, 100, 8))
    assert [type(o).__name__ for o in train_mod.Optimizer(small, lr=0.1).opts] == ["Adam"]
    assert not small.Q.sparse
    everything_big = MatrixFactorization(MFConfig(400, 400, 8))
    monkeypatch.setattr(train_mod, "SPARSE_ROWS", 50)
    assert [type(o).__name__ for o in train_mod.Optimizer(everything_big, lr=0.1).opts] == ["SparseAdam"]


def test_a_sampled_evaluator_scores_the_same_users_for_the_same_arguments(ds):
    full = Evaluator(ds, TEST)
    a, b = Evaluator(ds, TEST, max_users=50, seed=3), Evaluator(ds, TEST, max_users=50, seed=3)
    other = Evaluator(ds, TEST, max_users=50, seed=4)
    assert len(a.users) == 50 and a.heldout_users == full.heldout_users == len(full.users) > 50
    assert np.array_equal(a.users, b.users) and not np.array_equal(a.users, other.users)
    assert np.all(np.diff(a.users) > 0) and np.isin(a.users, full.users).all()
    for u, t in zip(a.users, a.truth):                  # each user keeps their own held-out items and context
        j = int(np.searchsorted(full.users, u))
        assert np.array_equal(t, full.truth[j])
    j = np.searchsorted(full.users, a.users)
    assert np.array_equal(a.hour, full.hour[j]) and np.array_equal(a.weekday, full.weekday[j])
    assert len(Evaluator(ds, VALID, max_users=10_000).users) == len(Evaluator(ds, VALID).users)


def test_scoring_batches_and_sampled_users_shrink_only_on_huge_catalogues():
    assert batch_for(1682, 1024) == 1024 and batch_for(1_000_000, 1024) == SCORE_CELLS // 1_000_000
    assert batch_for(10**12, 1024) == 1
    assert users_for(1682) > 1_000_000 and users_for(1_000_000) == 5000 and users_for(10**12) == 1000


def test_the_model_budget_stops_before_the_next_epoch_and_keeps_the_best():
    model = torch.nn.Linear(2, 1)
    stop = train_mod.EarlyStopping(model, patience=10, budget=0.05, max_epochs=100)
    assert stop.step(1.0) is False
    time.sleep(0.06)
    assert stop.step(0.5) is True and stop.out_of_time and "budget" in stop.note()
    assert stop.restore() == 1.0
    done = train_mod.EarlyStopping(model, patience=10, budget=0.01, max_epochs=1)
    time.sleep(0.02)
    done.step(1.0)
    assert done.note() == ""             # the last epoch ran anyway: not the budget's doing
