"""Served quality through exact and approximate indexes: the same trained models, repositories written with the
test-time view (as the served = evaluated test does), ndcg@10 and recall@50 of the served path on the test split.

    python loadtest/bench_ann_quality.py --artifacts work/ml100k
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from recserve.data.dataset import TEST, Dataset
from recserve.evaluate import Evaluator, ranking_metrics
from recserve.export.index import IndexSpec
from recserve.serving.local import LocalPipeline
from recserve.serving.repository import RepoOptions, write_repository

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--artifacts", type=Path, required=True)
art = ap.parse_args().artifacts
ds = Dataset.load(art / "dataset.npz")
ev = Evaluator(ds, TEST)
for kind, params in [("flat", {}), ("ivf", {"nprobe": 16}), ("ivf", {"nprobe": 8}), ("hnsw", {"efSearch": 150})]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = IndexSpec.of(kind, params) if params else IndexSpec(kind)
        m = write_repository(art, Path(tmp) / "repo", RepoOptions(view="test", index=spec))
        p = LocalPipeline(Path(tmp) / "repo")
        raw = p.recommend(ds.user_ids[ev.users], 50, ev.hour, ev.weekday)
        r = ranking_metrics(np.where(raw >= 0, np.searchsorted(ds.item_ids, raw), -1), ev.truth, ds.n_items)
        i = m["index"]
        print(f"{kind:<5} {i['spec']}  recall@100 vs exact {i['recall_vs_exact']:.4f}  "
              f"ndcg@10 {r['ndcg@10']:.4f}  recall@50 {r['recall@50']:.4f}", flush=True)
