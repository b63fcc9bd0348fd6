"""Does what we serve generalise? `recserve train` + `evaluate` on cuts of one MovieLens set and on synthetic data.

    python -m recserve.bench_quality --data ../shared/datasets/ml-100k --work work/quality [--cuts users50,...]

Each cut is trained with the default TrainConfig (every setting chosen on its own validation split) and one line
is printed per cut: the served row's ndcg@10 and recall@50 against the best of EASE^R and ALS (ndcg@10) and the
best classic baseline (recall@50), both refit on train + valid. The cuts:
  full           the data as it is
  users50        a seeded half of the users
  items70        a seeded 70% of the items
  time60-noattr  the first 60% of the time span, without the user file
  nocontent      no user attributes, no genres, no years
  sparse35-noattr  a seeded 35% of the ratings, without the user file: 2.2% dense, a long tail of items with
                 a rating or two and more cold test items, nearer a catalogue like MovieLens' "latest-small"
  synth          `recserve data synth` style data: 2,000 users, 1,500 items, 80,000 interactions
  synth-longtail synthetic data shaped like "latest-small": 670 users, 9,000 Zipf-popular items (most with a
                 handful of interactions), 100,000 interactions, no user file
  synth-drift    `synth` with a clock that means something (`generate(drift=8)`): users active for years, each
                 pick leaning to what was released around its time, as on a MovieLens set spanning decades; no
                 user file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

CUTS = ("full", "users50", "items70", "time60-noattr", "nocontent", "sparse35-noattr", "synth", "synth-longtail",
        "synth-drift")


def cut(raw, name: str, seed: int = 1):
    """The RawData of one cut (the synthetic ones ignore `raw`)."""
    from recserve.data import generate

    if name == "synth":
        return generate(n_users=2000, n_items=1500, n_interactions=80000, seed=3)
    if name == "synth-drift":
        return dataclasses.replace(generate(n_users=2000, n_items=1500, n_interactions=80000, seed=3, drift=8.0),
                                   users=None)
    if name == "synth-longtail":
        return dataclasses.replace(generate(n_users=670, n_items=9000, n_interactions=100000, seed=5), users=None)
    r, rng = raw.ratings, np.random.default_rng(seed)
    keep = lambda mask, **kw: dataclasses.replace(raw, ratings=r[mask].reset_index(drop=True),  # noqa: E731
                                                  source=name, **kw)
    if name == "full":
        return raw
    if name == "users50":
        users = r.user_id.unique()
        return keep(r.user_id.isin(rng.choice(users, len(users) // 2, replace=False)))
    if name == "items70":
        items = r.item_id.unique()
        return keep(r.item_id.isin(rng.choice(items, int(len(items) * 0.7), replace=False)))
    if name == "time60-noattr":
        ts = r.timestamp.to_numpy()
        return keep(ts <= np.quantile(ts, 0.6), users=None)
    if name == "sparse35-noattr":
        return keep(rng.random(len(r)) < 0.35, users=None)
    if name == "nocontent":
        items = raw.items.assign(genres=[[] for _ in range(len(raw.items))], year=-1)
        return dataclasses.replace(raw, users=None, items=items, source=name)
    raise ValueError(f"unknown cut {name!r}: choose from {', '.join(CUTS)}")


def run(data: Path, work: Path, cuts: list[str]) -> list[dict]:
    from recserve.data import load_movielens
    from recserve.evaluate import evaluate_artifacts
    from recserve.train import TrainConfig, train_all

    raw = load_movielens(data)
    rows = []
    for name in cuts:
        t0 = time.time()
        out = Path(work) / name
        train_all(cut(raw, name), out, TrainConfig(), progress=False)
        result = evaluate_artifacts(out)
        m, served = result["models"], result["served"]
        best = max(m["ease"]["ndcg@10"], m["als"]["ndcg@10"]) if "ease" in m else m["als"]["ndcg@10"]
        best_recall = max(m[b]["recall@50"] for b in ("ease", "als", "itemknn") if b in m)
        row = {"cut": name, "served": served, "ndcg@10": m[served]["ndcg@10"], "best_ease_als_ndcg@10": best,
               "ratio": round(m[served]["ndcg@10"] / best, 3), "recall@50": m[served]["recall@50"],
               "best_baseline_recall@50": best_recall, "cold_recall@50": m[served]["cold_recall@50"],
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a MovieLens directory the loaders read")
    parser.add_argument("--work", type=Path, default=Path("work/quality"))
    parser.add_argument("--cuts", default=",".join(CUTS))
    args = parser.parse_args()
    run(args.data, args.work, [c for c in args.cuts.split(",") if c])


if __name__ == "__main__":
    main()
