"""The towers, the ranker and MF: shapes, the in-batch loss, broadcasting along K, and checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recserve import checkpoint
from recserve.errors import ArtifactError
from recserve.models import MatrixFactorization, MFConfig, Ranker, RankerConfig, TowerConfig, TwoTower

pytestmark = pytest.mark.unit

U, N_ITEMS, G, CARDS, D, H = 7, 11, 4, [3, 5], 8, 5
PAD = N_ITEMS  # the padding id in histories


def _tower(seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(TowerConfig(U, N_ITEMS, G, CARDS, history_len=H, dim=D, id_dim=8, hidden=16)).eval()


def _ranker(seed: int = 0) -> Ranker:
    torch.manual_seed(seed)
    return Ranker(RankerConfig(U, N_ITEMS, G, CARDS, tower_dim=D, cross_layers=2, hidden=[16, 8])).eval()


def _user_inputs(b: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cats = torch.stack([torch.randint(0, c, (b,), generator=g) for c in CARDS], 1)
    return torch.randint(0, U, (b,), generator=g), cats, torch.randint(0, N_ITEMS + 1, (b, H), generator=g)


def _item_inputs(b: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, N_ITEMS, (b,), generator=g), (torch.rand(b, G, generator=g) < 0.3).float(),
            torch.randint(0, 32, (b,), generator=g))


def _ranker_inputs(b: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    user_idx, cats, _ = _user_inputs(b, seed)
    return [user_idx, cats, F.normalize(torch.randn(b, D, generator=g), dim=-1),
            torch.randint(0, 24, (b,), generator=g), torch.randint(0, 7, (b,), generator=g),
            torch.randint(0, N_ITEMS, (b, k), generator=g), (torch.rand(b, k, G, generator=g) < 0.3).float(),
            torch.randint(0, 32, (b, k), generator=g), torch.rand(b, k, generator=g) * 5,
            F.normalize(torch.randn(b, k, D, generator=g), dim=-1), torch.randn(b, k, 3, generator=g)]


USER_SIDE = 5  # the first five ranker inputs are per user (B, ...); the rest per candidate (B, K, ...)


def _take_candidates(inputs: list[torch.Tensor], idx) -> list[torch.Tensor]:
    return inputs[:USER_SIDE] + [x[:, idx] for x in inputs[USER_SIDE:]]


# ---- towers -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_tower_outputs_are_unit_vectors():
    model = _tower()
    uv, iv = model.user_tower(*_user_inputs(9)), model.item_tower(*_item_inputs(13))
    assert uv.shape == (9, D) and iv.shape == (13, D)
    torch.testing.assert_close(uv.norm(dim=-1), torch.ones(9))
    torch.testing.assert_close(iv.norm(dim=-1), torch.ones(13))


@torch.no_grad()
def test_user_tower_ignores_padding_and_history_order():
    model = _tower()
    with torch.no_grad():     # id tables start at zero (models._zero_ids): give the history rows what training would
        model.user_tower.hist_emb.weight.normal_()
        model.user_tower.hist_emb.weight[PAD] = 0.0
    user, cats = torch.tensor([2, 2, 2]), torch.tensor([[1, 4]] * 3)
    history = torch.tensor([[3, 9, PAD, PAD, PAD], [9, 3, PAD, PAD, PAD], [PAD, 3, PAD, 9, PAD]])
    out = model.user_tower(user, cats, history)
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(out[2], out[0])
    torch.testing.assert_close(model.user_tower(user[:1], cats[:1], history[:1, :2]), out[:1])  # shorter H
    empty = model.user_tower(user[:1], cats[:1], torch.full((1, H), PAD))
    assert torch.isfinite(empty).all()                                     # a user with no history yet
    assert not torch.allclose(empty, out[:1])


def _expected_loss(u, v, items, log_q, temperature):
    """The sampled softmax written out row by row: the other rows holding the same item are not negatives."""
    losses = []
    for r in range(len(items)):
        cols = [c for c in range(len(items)) if c == r or items[c] != items[r]]
        logits = torch.stack([u[r] @ v[c] / temperature - log_q[items[c]] for c in cols])
        losses.append(-torch.log_softmax(logits, 0)[cols.index(r)])
    return torch.stack(losses).mean()


def test_in_batch_loss_masks_accidental_hits():
    model = _tower()
    g = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(5, D, generator=g), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    items = torch.tensor([2, 5, 2, 7, 2])                                   # item 2 three times
    log_q = torch.log_softmax(torch.randn(N_ITEMS, generator=g), 0)
    loss = model.sampled_softmax_loss(u, v, items, log_q)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, _expected_loss(u, v, items, log_q, model.cfg.temperature))
    unmasked = F.cross_entropy(u @ v.T / model.cfg.temperature - log_q[items].unsqueeze(0), torch.arange(5))
    assert abs(unmasked.item() - loss.item()) > 1e-3                     # the masking changes the answer
    loss.backward()
    assert torch.isfinite(u.grad).all()


def test_in_batch_loss_of_one_item_repeated_is_zero():
    model = _tower()
    v = F.normalize(torch.randn(4, D), dim=-1)
    loss = model.sampled_softmax_loss(v, v, torch.tensor([1, 1, 1, 1]), torch.zeros(N_ITEMS))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # every other column is the same item: nothing to push away


# ---- ranker -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_ranker_scores_a_b_by_k_block():
    model = _ranker()
    out = model(*_ranker_inputs(3, 6))
    assert out.shape == (3, 6) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model(*_ranker_inputs(1, 1)).shape == (1, 1)


@torch.no_grad()
def test_ranker_block_equals_candidates_scored_k_at_a_time():
    model = _ranker()
    inputs = _ranker_inputs(4, 10, seed=5)
    block = model(*inputs)
    one_by_one = torch.cat([model(*_take_candidates(inputs, slice(j, j + 1))) for j in range(10)], dim=1)
    torch.testing.assert_close(one_by_one, block, rtol=1e-5, atol=1e-5)
    chunks = torch.cat([model(*_take_candidates(inputs, slice(j, j + 3))) for j in range(0, 10, 3)], dim=1)
    torch.testing.assert_close(chunks, block, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ranker_is_permutation_equivariant_along_k_and_rows_are_independent():
    model = _ranker()
    inputs = _ranker_inputs(4, 10, seed=6)
    block = model(*inputs)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(*_take_candidates(inputs, perm)), block[:, perm], rtol=1e-5, atol=1e-5)
    rows = torch.cat([model(*[x[b:b + 1] for x in inputs]) for b in range(4)])
    torch.testing.assert_close(rows, block, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ranker_user_side_is_broadcast_not_shared_across_rows():
    model = _ranker()
    inputs = _ranker_inputs(2, 5, seed=7)
    same_cands = [x if i < USER_SIDE else x[:1].expand_as(x).clone() for i, x in enumerate(inputs)]
    out = model(*same_cands)
    assert not torch.allclose(out[0], out[1])   # same candidates, different users: different scores


# ---- checkpoints ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_checkpoint_round_trip_reproduces_outputs(tmp_path: Path):
    tower, ranker = _tower(1), _ranker(1)
    torch.manual_seed(1)
    mf = MatrixFactorization(MFConfig(U, N_ITEMS, dim=D)).eval()
    ranker.train()  # saved while training: the loaded model must still come back in eval mode
    for model, kind in ((tower, "two_tower"), (ranker, "ranker"), (mf, "mf")):
        checkpoint.save(model, kind, tmp_path / f"{kind}.pt", "fp-1", train_config={"seed": 0})
    ranker.eval()

    ckpt = torch.load(tmp_path / "ranker.pt", weights_only=True)
    assert {"kind", "model_args", "state_dict", "fingerprint", "created", "train_config"} <= set(ckpt)
    assert ckpt["kind"] == "ranker" and ckpt["fingerprint"] == "fp-1" and ckpt["model_args"]["hidden"] == [16, 8]

    tower2, meta = checkpoint.load(tmp_path / "two_tower.pt", "fp-1")
    assert meta["train_config"] == {"seed": 0} and tower2.cfg == tower.cfg
    users, items = _user_inputs(6, seed=2), _item_inputs(6, seed=2)
    torch.testing.assert_close(tower2.user_tower(*users), tower.user_tower(*users), rtol=0, atol=0)
    torch.testing.assert_close(tower2.item_tower(*items), tower.item_tower(*items), rtol=0, atol=0)

    ranker2, _ = checkpoint.load(tmp_path / "ranker.pt", "fp-1")
    assert not ranker2.training
    inputs = _ranker_inputs(3, 7, seed=2)
    torch.testing.assert_close(ranker2(*inputs), ranker(*inputs), rtol=0, atol=0)

    mf2, _ = checkpoint.load(tmp_path / "mf.pt")  # no expectation: any fingerprint is accepted
    torch.testing.assert_close(mf2.score_all(torch.arange(U)), mf.score_all(torch.arange(U)), rtol=0, atol=0)
    np.testing.assert_allclose(mf.score_all(torch.tensor([3]))[0, 4].item(),
                               mf.score(torch.tensor([3]), torch.tensor([4])).item(), rtol=1e-6)


def test_checkpoint_refuses_other_data_and_missing_files(tmp_path: Path):
    checkpoint.save(_tower(), "two_tower", tmp_path / "two_tower.pt", "fp-1")
    with pytest.raises(ArtifactError, match="trained on data fp-1 but the artifacts hold data fp-2"):
        checkpoint.load(tmp_path / "two_tower.pt", "fp-2")
    with pytest.raises(ArtifactError, match="missing"):
        checkpoint.load(tmp_path / "ranker.pt", "fp-1")


@torch.no_grad()
def test_dropping_the_item_id_is_the_tower_with_that_id_embedding_zeroed():
    model = _tower()
    _, genres, year = _item_inputs(6)
    idx = torch.arange(6)                         # distinct ids: zeroing one row touches one example
    keep = torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0], [1.0]])
    dropped = model.item_tower(idx, genres, year, keep)
    torch.testing.assert_close(dropped[keep[:, 0] == 1], model.item_tower(idx, genres, year)[keep[:, 0] == 1])
    model.item_tower.item_emb.weight[idx[keep[:, 0] == 0]] = 0.0
    torch.testing.assert_close(dropped, model.item_tower(idx, genres, year))


def test_title_words_are_read_from_the_towers_own_table_and_exported_to_onnx(tmp_path: Path):
    import onnxruntime as ort

    from recserve.data.dataset import title_tokens
    from recserve.export.onnx import export_model

    words = title_tokens(["The Story of Toy (1995)", "Toy Story 2", "Heat", "the of a (1999)"], length=4, vocab=64)
    assert (words[0] > 0).sum() == 2                                          # "story", "toy"; no stop words
    assert set(words[0][:2]) == set(words[1][:2]) and (words[3] == 0).all()   # no words at all: padding
    torch.manual_seed(0)
    tower = TwoTower(TowerConfig(U, N_ITEMS, G, CARDS, history_len=H, dim=D, id_dim=8, hidden=16, title_vocab=64,
                                 title_len=4)).item_tower.eval()
    assert float(tower.word_emb.weight.abs().sum()) == 0.0                    # an untrained word is 0, not noise
    torch.nn.init.normal_(tower.word_emb.weight)
    table = np.zeros((N_ITEMS, 4), np.int64)
    table[:4] = words
    tower.title_tokens.copy_(torch.as_tensor(table))
    idx, genres, year = _item_inputs(6)
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        before = tower(idx, genres, year)
        tower.title_tokens[2] = tower.title_tokens[0]                         # another title: another vector
        after = tower(idx, genres, year)
    assert not torch.allclose(before[2], after[2]) and torch.allclose(before[[0, 1, 3]], after[[0, 1, 3]])
    path = tmp_path / "item_tower.onnx"
    example = {"item_idx": idx.numpy(), "item_genres": genres.numpy(), "item_year": year.numpy()}
    export_model(tower, "item_tower", example, path)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, example)[0]
    np.testing.assert_allclose(got, after.numpy(), atol=1e-5)
