"""Probe: does "trending in context" (item popularity around the user's own time) add to the blend's sources?

    .venv/bin/python docs/experiments/trend_in_context.py work/ml100k      # artifacts of `recserve train`

For each view (valid: fitted on train, scored on validation; test: train+valid, scored on test, a probe only),
the interactions' timestamps are cut into 32 quantile bins; an item's trend score for a user is
log1p(sum over bins of a Gaussian kernel (width h bins) around the bin of the user's last interaction in the
view, times the item's count in that bin). It is added to ALS, the neighbour table and popularity (the towers
left out), and the grid over all weights is searched by ndcg@10. Measured on ML-100K: weight 0 at every width
(h = 1, 2, 4) in both views, so no trend term is served (README "Recommendation quality").
"""

import itertools
import json
import sys
from pathlib import Path

import numpy as np

from recserve.data.dataset import Dataset
from recserve.evaluate import Evaluator
from recserve.sources import VIEWS, fit_view, term_scores

VALID, TEST = 1, 2
BINS = 32
GRID = {"als": (0, .25, .5, 1), "popularity": (0, .1, .2), "neighbours": (0, .25, .5, 1),
        "trend": (0, .1, .2, .4, .8)}


def trend_rows(ds: Dataset, view_splits: tuple, users: np.ndarray, bins: int, h: float) -> np.ndarray:
    """(B, I): log1p(sum_b K(b, b_u) C[i, b]), K a Gaussian of width h bins around the user's last bin."""
    m = np.isin(ds.split, view_splits)
    ts = ds.timestamps[m]
    edges = np.quantile(ts, np.linspace(0, 1, bins + 1)[1:-1])
    counts = np.zeros((ds.n_items, bins))
    np.add.at(counts, (ds.items[m], np.searchsorted(edges, ts, side="right")), 1.0)
    last = np.full(ds.n_users, ts.min())
    np.maximum.at(last, ds.users[m], ts)
    d = np.arange(bins)[:, None] - np.arange(bins)[None, :]
    return np.log1p(counts @ np.exp(-0.5 * (d / h) ** 2))[:, np.searchsorted(edges, last, side="right")[users]].T


def best_blend(ev: Evaluator, rows: dict) -> tuple:
    terms = list(rows)
    scale = {t: float(np.std(rows[t])) or 1.0 for t in terms}
    best = None
    for w in itertools.product(*(GRID[t] for t in terms)):
        if not any(w):
            continue
        total = sum(wt / scale[t] * rows[t] for wt, t in zip(w, terms) if wt)
        m = ev._metrics(lambda u, total=total: total[np.searchsorted(ev.users, u)])[0]
        if best is None or m["ndcg@10"] > best[0]:
            best = (m["ndcg@10"], dict(zip(terms, w)), m["recall@50"])
    return best


def main(artifacts: Path) -> None:
    ds = Dataset.load(artifacts / "dataset.npz")
    params = json.loads((artifacts / "blend.json").read_text())["source_params"]
    for view, target in (("valid", VALID), ("test", TEST)):
        ev = Evaluator(ds, target)
        src = fit_view(ds, view, params)
        none = np.zeros((len(ev.users), 1), np.float32)
        rows = term_scores(none, np.zeros((ds.n_items, 1), np.float32), src, ev.users)
        rows.pop("two_tower")
        print(view, "no trend term:", best_blend(ev, rows), flush=True)
        for h in (1, 2, 4):
            print(view, f"trend width {h} bins:", best_blend(ev, {**rows, "trend": trend_rows(ds, VIEWS[view],
                                                                                       ev.users, BINS, h)}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
