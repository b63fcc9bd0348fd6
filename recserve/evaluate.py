"""Full-ranking offline evaluation: every item is a candidate, the user's known items are excluded.

Protocol: per-user temporal holdout (most recent 20% of each user's interactions, at least one, is the
test set; the 10% before it validation). Models are trained on the training split; when scoring the test
set a user's history and exclusions are their training + validation interactions. No sampled negatives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recserve import checkpoint
from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
from recserve.ranking import Seen, candidates, new_item_order, top_k
from recserve.reference import Tables, context_of, item_vectors, known_splits, rank, ranker_batch, user_vectors

KS = (10, 20, 50)
METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "hr@10", "coverage@10", "cold_recall@50")
MODELS = ("popularity", "mf", "two_tower", "blend", "blend+ranker")
SERVED = "blend+ranker"        # the row `export repository` serves (metrics.json "served") when the ranker ships
RETRIEVAL_ORDER = "blend"      # ... and when it does not
# What each row knows of a user when ranking the test period (baselines: `recserve.baselines.refit_test`).
TEST_TIME_DATA = {
    "popularity": "refit on train+valid",
    "mf": "fitted on train, not refit",
    "two_tower": "refit on train+valid (the epochs validation chose); train+valid history as input",
    "blend": "towers as two_tower; ALS, neighbours, popularity refit on train+valid; weights chosen on valid",
    "blend+ranker": "as blend; ranker trained on valid (sources fitted on train)",
}
RERANK_CANDIDATES = 500   # K, as served (`export repository --candidates`)
# Full ranking scores every item for every user. Two bounds keep that inside one machine at a million items:
SCORE_CELLS = 250_000_000     # (users x items) score cells one batch holds: 1 GB of float32
EVAL_CELLS = 5_000_000_000    # cells one test evaluation scores; past it a seeded sample of the test users


def batch_for(n_items: int, most: int) -> int:
    """Users per scoring batch: `most`, or fewer when a batch's full score rows would pass SCORE_CELLS."""
    return max(1, min(most, SCORE_CELLS // max(n_items, 1)))


def users_for(n_items: int, cells: float = EVAL_CELLS) -> int:
    """How many users a full-ranking evaluation over `n_items` items scores within `cells` (at least 1,000):
    every user on MovieLens-sized catalogues, a sample at a million items."""
    return max(1000, int(cells // max(n_items, 1)))


def ranking_metrics(top: np.ndarray, truth: list[np.ndarray], n_items: int, cold: np.ndarray | None = None
                    ) -> dict[str, float | None]:
    """Metrics of ranked lists `top` (B, >=50) against each user's held-out items.

    recall@k = hits in the top k / number of held-out items; ndcg@10 with binary gains, ideal DCG over
    min(10, held-out); hr@10 = share of users with a hit in the top 10; coverage@10 = distinct items
    recommended in anyone's top 10 / catalogue size; cold_recall@50 = of all held-out rows whose item is `cold`
    (bool per item: no training interaction), the share found in the top 50 (None without such rows).
    """
    out = {f"recall@{k}": 0.0 for k in KS} | {"ndcg@10": 0.0, "hr@10": 0.0}
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for row, t in zip(top, truth):
        hit = np.isin(row, t)
        for k in KS:
            out[f"recall@{k}"] += hit[:k].sum() / len(t)
        # a catalogue under 10 items gives shorter lists
        out["ndcg@10"] += (hit[:10] * discounts[:len(hit[:10])]).sum() / discounts[:min(10, len(t))].sum()
        out["hr@10"] += float(hit[:10].any())
    n = max(len(truth), 1)
    out = {k: v / n for k, v in out.items()}
    shown = top[:, :10]
    out["coverage@10"] = len(np.unique(shown[shown >= 0])) / n_items
    result: dict[str, float | None] = {m: round(float(out[m]), 5) for m in METRICS if m in out}
    cold_rows = [(row, t[cold[t]]) for row, t in zip(top, truth)] if cold is not None else []
    n_cold = sum(len(t) for _, t in cold_rows)
    result["cold_recall@50"] = (round(sum(int(np.isin(t, row[:50]).sum()) for row, t in cold_rows) / n_cold, 5)
                                if n_cold else None)
    return result


def heldout(ds: Dataset, target: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(users, their held-out item arrays, time of their first held-out interaction)."""
    m = ds.split == target
    users, starts = np.unique(ds.users[m], return_index=True)
    items = np.split(ds.items[m], starts[1:])
    first_ts = ds.timestamps[m][starts]
    return users, items, first_ts


class Evaluator:
    """Scores every model on one split; `target` is VALID (model selection) or TEST (the reported table)."""

    def __init__(self, ds: Dataset, target: int = TEST, history_len: int = 20, sources=None,
                 max_users: int | None = None, seed: int = 0):
        """`sources`: (Blend, ViewSources) of the view that predicts `target` (`recserve.sources`); with them the
        re-ranked rows use the served candidate rule (several sources merged), without, the towers' alone.
        `max_users`: score a sample of that many of the target's users (seeded, so equal arguments give equal
        users); None scores them all. `heldout_users` says how many there were."""
        self.ds = ds
        self.sources = sources
        self.target = target
        self.tables = Tables(ds, known_splits(target), history_len)
        self.users, self.truth, first_ts = heldout(ds, target)
        self.heldout_users = len(self.users)
        if max_users is not None and len(self.users) > max_users:
            keep = np.sort(np.random.default_rng(seed).choice(len(self.users), max_users, replace=False))
            self.users, first_ts = self.users[keep], first_ts[keep]
            self.truth = [self.truth[i] for i in keep]
        self.hour, self.weekday = context_of(first_ts)
        self.cold = np.bincount(ds.items[ds.mask(TRAIN)], minlength=ds.n_items) == 0   # no training interaction

    def _metrics(self, scores_fn, batch: int = 1024) -> tuple[dict[str, float], np.ndarray]:
        tops = []
        batch = batch_for(self.ds.n_items, batch)
        for s in range(0, len(self.users), batch):
            u = self.users[s:s + batch]
            tops.append(candidates(scores_fn(u), u, self.seen, max(KS)))
        top = np.concatenate(tops)
        return ranking_metrics(top, self.truth, self.ds.n_items, self.cold), top

    @property
    def seen(self) -> Seen:
        return Seen(self.tables.seen_indptr, self.tables.seen)

    def popularity(self, counts: np.ndarray) -> dict[str, float]:
        return self._metrics(lambda u: np.broadcast_to(counts.astype(np.float32), (len(u), len(counts))))[0]

    @torch.no_grad()
    def mf(self, model) -> dict[str, float]:
        return self._metrics(lambda u: model.score_all(torch.as_tensor(u)).numpy())[0]

    def two_tower(self, model) -> dict[str, float]:
        iv = item_vectors(model, self.ds)
        return self._metrics(lambda u: user_vectors(model, self.tables.users(u)) @ iv.T)[0]

    def two_tower_ranker(self, two_tower, ranker, candidates: int = RERANK_CANDIDATES, batch: int = 256):
        """Retrieve `candidates` by the candidate rule, re-order them with the ranker (None: retrieval order)."""
        return ranking_metrics(self.served_lists(two_tower, ranker, candidates, batch), self.truth, self.ds.n_items,
                               self.cold)

    def candidate_batches(self, two_tower, k: int = RERANK_CANDIDATES, batch: int = 256):
        """Per batch of users: (slice, features, user vectors, item vectors, cand (B, K), cand_src or None)."""
        from recserve.sources import Blend, offline_candidates

        iv = item_vectors(two_tower, self.ds)
        items = Blend.item_matrix(iv, self.sources[1]) if self.sources is not None else None
        batch = batch_for(self.ds.n_items, batch)
        for s in range(0, len(self.users), batch):
            u = self.users[s:s + batch]
            f = self.tables.users(u)
            uv = user_vectors(two_tower, f)
            if self.sources is None:
                cand, src = candidates(uv @ iv.T, u, self.seen, k), None
            else:
                cand, src = offline_candidates(self.sources[0], uv, items, self.sources[1], u, self.seen, k)
            yield slice(s, s + batch), f, uv, iv, cand, src

    def served_lists(self, two_tower, ranker, k: int = RERANK_CANDIDATES, batch: int = 256) -> np.ndarray:
        """(users, 50) what the served path answers: the candidate rule, the ranker (or, when None, the retrieval
        order: the blend score, or the towers' dot without sources), top-k (`recserve.ranking`). Over the sources,
        items the view has no interaction with keep their retrieval rank (`ranking.new_item_order`)."""
        tops = []
        for sl, f, uv, iv, cand, src in self.candidate_batches(two_tower, k, batch):
            if ranker is not None:
                scores = rank(ranker, ranker_batch(self.tables, f, uv, self.hour[sl], self.weekday[sl],
                                                   np.maximum(cand, 0), iv, src))
                if src is not None:
                    new = self.sources[1].is_new[np.maximum(cand, 0)] & (cand >= 0)
                    tops.append(new_item_order(scores, src[..., 0], cand, new, max(KS))[0])
                    continue
            elif src is not None:
                scores = src[..., 0]
            else:
                scores = np.einsum("bd,bkd->bk", uv, iv[np.maximum(cand, 0)])
            tops.append(top_k(scores, cand, max(KS))[0])
        return np.concatenate(tops)


def sources_for(artifacts: Path, target: int):
    """(Blend, ViewSources) that predict `target` (VALID: fitted on train; TEST: train + valid) from `recserve
    train`'s artifacts."""
    from recserve.sources import load_blend, load_view

    view = {VALID: "valid", TEST: "test"}.get(target, "serve")
    return load_blend(artifacts), load_view(artifacts, view)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_artifacts(artifacts: Path) -> dict:
    """Evaluate every trained model on the test split; write ARTIFACTS/metrics.json and return it."""
    artifacts = Path(artifacts)
    ds = Dataset.load(artifacts / "dataset.npz")
    two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", ds.fingerprint)
    ranker, _ = checkpoint.load(artifacts / "ranker.pt", ds.fingerprint)
    mf, _ = checkpoint.load(artifacts / "mf.pt", ds.fingerprint)
    max_users = users_for(ds.n_items)
    ev = Evaluator(ds, TEST, two_tower.cfg.history_len, sources=sources_for(artifacts, TEST), max_users=max_users)
    models = {
        "popularity": ev.popularity(np.bincount(ds.items[ds.mask(TRAIN, VALID)], minlength=ds.n_items)),
        "mf": ev.mf(mf),
        "two_tower": ev.two_tower(two_tower),
        "blend": ev.two_tower_ranker(two_tower, None),
        "blend+ranker": ev.two_tower_ranker(two_tower, ranker),
    }
    test_time = dict(TEST_TIME_DATA)
    trained = _read_json(artifacts / "train.json") or {}
    if "refit" not in (trained.get("two_tower") or {}):      # `TrainConfig(refit_towers=False)`, or an older run
        test_time["two_tower"] = "train weights; train+valid history as input"
    gate_path = artifacts / "ranker_gate.json"
    gate = json.loads(gate_path.read_text()) if gate_path.exists() else {"shipped": True, "note": "no gate run"}
    baselines_path = artifacts / "baselines.json"
    if baselines_path.exists():       # tuned on validation by `recserve train`; refit on train+valid here
        from recserve.baselines import refit_test

        for name, row in json.loads(baselines_path.read_text())["models"].items():
            if "skipped" in row:
                continue
            fitted = refit_test(ds, name, row["params"], max_users=max_users)
            models[name], test_time[name] = fitted["test"], fitted["test_time_data"]
    metrics_path = artifacts / "metrics.json"
    previous = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    result = {
        "protocol": {
            "split": "per-user temporal holdout: newest 20% (>=1) test, the 10% before it validation",
            "ranking": "full ranking over all items, the user's train+validation items excluded",
            "negatives": "none sampled",
            "rerank_candidates": RERANK_CANDIDATES,
            "test_time_data": test_time,
            "data": {"source": ds.source, "fingerprint": ds.fingerprint, "users": ds.n_users, "items": ds.n_items,
                     "interactions": int(len(ds.users)), "test_users": int(len(ev.users)),
                     "test_users_of": ev.heldout_users,
                     "users_sampled": (f"a seeded sample of {len(ev.users)} of the {ev.heldout_users} test users "
                                       f"(full ranking over {ds.n_items} items scores at most {EVAL_CELLS:.0e} "
                                       "user x item cells)") if len(ev.users) < ev.heldout_users else "none"},
        },
        "models": models,
        "served": SERVED if gate.get("shipped", True) else RETRIEVAL_ORDER,
        "blend": _read_json(artifacts / "blend.json"),
        "ranker_gate": gate,
    }
    for key in previous:          # keep sections other stages added (e.g. int8 gate figures)
        result.setdefault(key, previous[key])
    metrics_path.write_text(json.dumps(result, indent=2))
    return result


COL = 15   # table column width: the longest metric name and a space


def format_table(models: dict[str, dict[str, float]], test_time: dict[str, str] | None = None,
                 served: str | None = None) -> str:
    """The metrics table; with `test_time`, a last column says what each row knew at test time."""
    width = max(len(m) for m in models) + 4
    lines = ["model".ljust(width) + "".join(m.rjust(COL) for m in METRICS) + ("   test-time data" if test_time else "")]
    for name, vals in models.items():
        label = f"{name} *" if name == served else name
        lines.append(label.ljust(width) + "".join(f"{vals[m]:{COL}.4f}" if vals.get(m) is not None else "n/a".rjust(COL)
                                                  for m in METRICS)
                     + (f"   {test_time.get(name, '')}" if test_time else ""))
    if served:
        lines.append("* served by `export repository`")
    return "\n".join(lines)


__all__ = ["Evaluator", "evaluate_artifacts", "format_table", "ranking_metrics", "TRAIN", "VALID", "TEST"]
