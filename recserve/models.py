"""The models, small enough to read in one sitting: two towers, a DCN-v2 ranker, and the baselines.

Conventions (shared with the index and the server):
- Tower outputs are L2-normalised, so inner product == cosine; the FAISS index is an inner-product index.
- Item index `n_items` is the padding id inside history tensors.
- The ranker scores a [B, K] block of candidates per user: the user side is broadcast over K
  inside the model, which is how one request fans out to hundreds of candidates without
  copying user features K times on the wire.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TowerConfig:
    n_users: int
    n_items: int
    n_genres: int
    user_cat_cards: list[int]
    n_year_buckets: int = 32
    history_len: int = 20
    dim: int = 64          # output embedding size (index dimension)
    id_dim: int = 64
    hidden: int = 256
    temperature: float = 0.05
    title_vocab: int = 0   # > 0: the item tower also reads its title's words (hashed; recserve.data.title_tokens)
    title_len: int = 8


def _mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def _zero_ids(*tables: nn.Embedding) -> None:
    """Id tables start at zero, not at nn.Embedding's N(0, 1): a row then holds only what its id's interactions
    taught it. From N(0, 1) a user or item with a handful of interactions kept a random vector of norm ~8, as
    large as a popular one's learned vector, so the towers placed it at random rather than by its content and
    history. Measured on validation (README, "Recommendation quality"): the towers' recall@50 +12% on ML-100K,
    +27% on a sparse cut. Each row still gets its own gradient, so nothing is symmetric."""
    for table in tables:
        nn.init.zeros_(table.weight)


class UserTower(nn.Module):
    """user id + user attributes + mean-pooled recent history -> unit vector (B, dim)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.n_items = cfg.n_items
        self.user_emb = nn.Embedding(cfg.n_users, cfg.id_dim)
        self.cat_embs = nn.ModuleList(nn.Embedding(c, 16) for c in cfg.user_cat_cards)
        self.hist_emb = nn.Embedding(cfg.n_items + 1, cfg.id_dim, padding_idx=cfg.n_items)
        _zero_ids(self.user_emb, self.hist_emb)
        in_dim = 2 * cfg.id_dim + 16 * len(cfg.user_cat_cards)
        self.mlp = _mlp([in_dim, cfg.hidden, cfg.dim])

    def forward(self, user_idx: torch.Tensor, user_cats: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        mask = (history != self.n_items).float().unsqueeze(-1)           # (B, H, 1)
        pooled = (self.hist_emb(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, id_dim)
        cats = [emb(user_cats[:, j]) for j, emb in enumerate(self.cat_embs)]
        x = torch.cat([self.user_emb(user_idx), pooled, *cats], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """item id + genres + year bucket -> unit vector (B, dim)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.item_emb = nn.Embedding(cfg.n_items, cfg.id_dim)
        _zero_ids(self.item_emb)
        self.genre_proj = nn.Linear(cfg.n_genres, 16, bias=False)
        self.year_emb = nn.Embedding(cfg.n_year_buckets, 8)
        self.titles = cfg.title_vocab > 0
        if self.titles:   # each item's title words, a table like the id embedding's (filled by training)
            self.word_emb = nn.Embedding(cfg.title_vocab, 16, padding_idx=0)
            nn.init.zeros_(self.word_emb.weight)   # a word no trained item has stays 0, not random noise
            self.register_buffer("title_tokens", torch.zeros((cfg.n_items, cfg.title_len), dtype=torch.long))
        self.mlp = _mlp([cfg.id_dim + 16 + 8 + (16 if self.titles else 0), cfg.hidden, cfg.dim])

    def forward(self, item_idx: torch.Tensor, genres: torch.Tensor, year: torch.Tensor,
                id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`id_keep` (B, 1) in {0, 1}, training only: 0 drops the item's id embedding, so the tower also learns to
        place an item from its content alone, which is all it has for an item nobody has interacted with."""
        ids = self.item_emb(item_idx)
        if id_keep is not None:
            ids = ids * id_keep
        parts = [ids, self.genre_proj(genres), self.year_emb(year)]
        if self.titles:
            words = self.title_tokens[item_idx]                                     # (B, T)
            mask = (words > 0).float().unsqueeze(-1)
            parts.append((self.word_emb(words) * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg)
        self.item_tower = ItemTower(cfg)

    def sampled_softmax_loss(self, u: torch.Tensor, v: torch.Tensor, item_idx: torch.Tensor,
                             log_q: torch.Tensor) -> torch.Tensor:
        """In-batch softmax with the logQ correction (Yi et al. 2019) and accidental hits masked.

        u, v: (B, D) unit vectors of each positive pair; log_q: (I,) log sampling probability of each item.
        """
        logits = u @ v.T / self.cfg.temperature - log_q[item_idx].unsqueeze(0)   # (B, B)
        same = item_idx.unsqueeze(0) == item_idx.unsqueeze(1)
        logits = logits.masked_fill(same & ~torch.eye(len(item_idx), dtype=torch.bool), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(item_idx)))


@dataclass
class RankerConfig:
    n_users: int
    n_items: int
    n_genres: int
    user_cat_cards: list[int]
    tower_dim: int
    n_year_buckets: int = 32
    emb_dim: int = 16
    cross_layers: int = 1
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.3
    retrieval_temperature: float = 0.05   # the ranker starts from the towers' logit, dot / temperature
    n_src: int = 3                        # source-score features per candidate (recserve.sources.SRC_FEATURES)
    blend_scale: float = 0.0              # > 0: start from the blend score (cand_src[..., 0]) times this instead


class CrossLayer(nn.Module):
    """DCN-v2 cross: x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.lin(x) + x


class Ranker(nn.Module):
    """DCN-v2 (stacked cross + deep) over user, item, context features and both tower embeddings."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.emb_dim
        self.user_emb = nn.Embedding(cfg.n_users, e)
        self.cat_embs = nn.ModuleList(nn.Embedding(c, 8) for c in cfg.user_cat_cards)
        self.hour_emb = nn.Embedding(24, 4)
        self.weekday_emb = nn.Embedding(7, 4)
        self.item_emb = nn.Embedding(cfg.n_items, e)
        self.genre_proj = nn.Linear(cfg.n_genres, 8, bias=False)
        self.year_emb = nn.Embedding(cfg.n_year_buckets, 4)
        d = cfg.tower_dim
        self.in_dim = e + 8 * len(cfg.user_cat_cards) + 4 + 4 + e + 8 + 4 + 1 + 1 + 3 * d + cfg.n_src
        self.cross = nn.ModuleList(CrossLayer(self.in_dim) for _ in range(cfg.cross_layers))
        self.deep = _mlp([self.in_dim, *cfg.hidden, cfg.hidden[-1]], cfg.dropout)
        self.head = nn.Linear(self.in_dim + cfg.hidden[-1], 1)
        # Residual on the retrieval order: an untrained ranker orders like retrieval (the blend of the sources
        # when blend_scale > 0, else the towers' logit), and training (on few, hard examples) only has to learn
        # the corrections.
        blend = cfg.blend_scale > 0
        self.retrieval_scale = nn.Parameter(torch.tensor(0.0 if blend else 1.0 / cfg.retrieval_temperature))
        init = torch.zeros(cfg.n_src)
        if blend and cfg.n_src:
            init[0] = cfg.blend_scale
        self.src_weight = nn.Parameter(init)

    def forward(self, user_idx, user_cats, user_vec, hour, weekday,
                cand_idx, cand_genres, cand_year, cand_pop, cand_vec, cand_src) -> torch.Tensor:
        """user_*: (B, ...), cand_*: (B, K, ...) -> scores (B, K). cand_src: (B, K, n_src) source scores."""
        B, K = cand_idx.shape
        user_side = torch.cat(
            [self.user_emb(user_idx), *[emb(user_cats[:, j]) for j, emb in enumerate(self.cat_embs)],
             self.hour_emb(hour), self.weekday_emb(weekday)], dim=-1)                   # (B, Fu)
        user_side = user_side.unsqueeze(1).expand(B, K, user_side.shape[-1])             # (B, K, Fu)
        uv = user_vec.unsqueeze(1).expand(B, K, user_vec.shape[-1])                      # (B, K, D)
        dot = (uv * cand_vec).sum(-1, keepdim=True)                                       # (B, K, 1)
        x0 = torch.cat([user_side, self.item_emb(cand_idx), self.genre_proj(cand_genres),
                        self.year_emb(cand_year), cand_pop.unsqueeze(-1), dot, uv, cand_vec, uv * cand_vec,
                        cand_src], dim=-1).reshape(B * K, self.in_dim)                    # (B*K, F)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out = self.head(torch.cat([x, self.deep(x0)], dim=-1))                            # (B*K, 1)
        return out.reshape(B, K) + self.retrieval_scale * dot.squeeze(-1) + cand_src @ self.src_weight


@dataclass
class MFConfig:
    n_users: int
    n_items: int
    dim: int = 64


class MatrixFactorization(nn.Module):
    """BPR matrix factorisation: score(u, i) = p_u . q_i + b_i."""

    def __init__(self, cfg: MFConfig):
        super().__init__()
        self.cfg = cfg
        self.P = nn.Embedding(cfg.n_users, cfg.dim)
        self.Q = nn.Embedding(cfg.n_items, cfg.dim)
        self.b = nn.Embedding(cfg.n_items, 1)
        for emb in (self.P, self.Q):
            nn.init.normal_(emb.weight, std=0.05)
        nn.init.zeros_(self.b.weight)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.P(users) * self.Q(items)).sum(-1) + self.b(items).squeeze(-1)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.P(users) @ self.Q.weight.T + self.b.weight.T                         # (B, I)


MODEL_CLASSES = {"two_tower": (TwoTower, TowerConfig), "ranker": (Ranker, RankerConfig),
                 "mf": (MatrixFactorization, MFConfig)}


def model_args(model: nn.Module) -> dict:
    return asdict(model.cfg)


class ServingRanker(nn.Module):
    """The same function as a trained `Ranker`, arranged for serving: item-side work done once per item.

    The first cross layer and the first deep layer are linear in x0 = [user part | item part | interaction part].
    Their item-part products depend only on the item, so they are computed once at export into a table
    gathered by `cand_idx`; the user-part products once per user, not per candidate; only the interaction part
    ([dot, u * v], 1 + D columns) is multiplied per candidate. On ML-100K that is 4x fewer multiply-adds per
    candidate. It needs the candidates' features to be the table rows of `cand_idx`, as they are when served.
    """

    def __init__(self, ranker: Ranker, genres: torch.Tensor, year: torch.Tensor, pop: torch.Tensor):
        super().__init__()
        self.r = ranker.eval()
        d, ns = ranker.cfg.tower_dim, ranker.cfg.n_src
        fu = ranker.in_dim - ranker.cfg.emb_dim - 8 - 4 - 1 - 1 - 3 * d - ns
        # column blocks of x0, in Ranker.forward's order
        cols = {"user": list(range(fu)), "item": list(range(fu, fu + 29)), "dot": [fu + 29],
                "uv": list(range(fu + 30, fu + 30 + d)), "cv": list(range(fu + 30 + d, fu + 30 + 2 * d)),
                "uvcv": list(range(fu + 30 + 2 * d, fu + 30 + 3 * d)),
                "src": list(range(fu + 30 + 3 * d, fu + 30 + 3 * d + ns))}
        self.user_cols = torch.tensor(cols["user"] + cols["uv"])
        self.inter_cols = torch.tensor(cols["dot"] + cols["cv"] + cols["uvcv"] + cols["src"])
        item_cols = torch.tensor(cols["item"])
        layers = [ranker.cross[0].lin, ranker.deep[0]]                       # the two linear maps of x0
        w = torch.cat([m.weight for m in layers])                            # (F + H0, F)
        self.w_user = nn.Parameter(w[:, self.user_cols].clone(), requires_grad=False)
        self.w_inter = nn.Parameter(w[:, self.inter_cols].clone(), requires_grad=False)
        with torch.no_grad():
            items = torch.arange(len(year))
            item_part = torch.cat([ranker.item_emb(items), ranker.genre_proj(genres), ranker.year_emb(year),
                                   pop.unsqueeze(-1)], dim=-1)                # (I, 29)
            table = item_part @ w[:, item_cols].T + torch.cat([m.bias for m in layers])   # (I, F + H0)
        self.register_buffer("item_table", table)
        self.split = ranker.in_dim

    def forward(self, user_idx, user_cats, user_vec, hour, weekday,
                cand_idx, cand_genres, cand_year, cand_pop, cand_vec, cand_src) -> torch.Tensor:
        r = self.r
        B, K = cand_idx.shape
        user_side = torch.cat(
            [r.user_emb(user_idx), *[emb(user_cats[:, j]) for j, emb in enumerate(r.cat_embs)],
             r.hour_emb(hour), r.weekday_emb(weekday)], dim=-1)                                  # (B, Fu)
        uv = user_vec.unsqueeze(1).expand(B, K, user_vec.shape[-1])                              # (B, K, D)
        prod = uv * cand_vec
        dot = prod.sum(-1, keepdim=True)                                                         # (B, K, 1)
        pre = (torch.cat([user_side, user_vec], -1) @ self.w_user.T).unsqueeze(1)               # (B, 1, F + H0)
        pre = pre + self.item_table[cand_idx] + torch.cat([dot, cand_vec, prod, cand_src], -1) @ self.w_inter.T
        x0 = torch.cat([user_side.unsqueeze(1).expand(B, K, user_side.shape[-1]), r.item_emb(cand_idx),
                        r.genre_proj(cand_genres), r.year_emb(cand_year), cand_pop.unsqueeze(-1), dot, uv, cand_vec,
                        prod, cand_src], dim=-1)                                                 # (B, K, F)
        x = x0 * pre[..., :self.split] + x0                                                      # first cross layer
        for layer in r.cross[1:]:
            x = layer(x0, x)
        deep = r.deep[1:](pre[..., self.split:])                                                 # after deep[0]
        out = r.head(torch.cat([x, deep], dim=-1))                                               # (B, K, 1)
        return out.squeeze(-1) + r.retrieval_scale * dot.squeeze(-1) + cand_src @ r.src_weight
