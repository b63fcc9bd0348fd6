"""The feedback loop on a time-split replay: does `recserve update` (no retraining) beat the stale model?

    python loadtest/bench_feedback.py --data ../shared/datasets/ml-100k [--json work/bench_feedback.json]

1. Cut a MovieLens-100K directory at two moments of its global clock, T1 and T2 (by default the 80% and 90%
   quantiles of its timestamps): the past (before T1), the feedback period [T1, T2) and the future (from T2).
2. `recserve train` and `export onnx` on the past only (a copy of the directory with `u.data` cut at T1).
3. The feedback period, replayed as clicks of the event log a `RecClient(event_log=...)` writes (one click per
   rating, at its timestamp), folded into a copy of the artifacts by `recserve update`.
4. A repository of each (`export repository`), both run by the served code (`LocalPipeline`, what `recommend`
   runs), and both scored on the future: each user the model knows and who rates something from T2 on gets 10
   items, against the items they rate then (recall@10, ndcg@10), and the share of the 10 that the user had
   already rated in the feedback period (slots a stale model wastes on what was just consumed).
5. With `--retrain`: also `recserve train --resume` (the stale towers' weights as the start) and a training from
   scratch, both on the ratings before T2, scored the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cut(src: Path, dst: Path, until: int) -> None:
    """A copy of an ML-100K directory whose u.data keeps the ratings before `until`."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "u.data":
            shutil.copy(f, dst / f.name)
    with open(src / "u.data") as fin, open(dst / "u.data", "w") as fout:
        for line in fin:
            if int(line.split("\t")[3]) < until:
                fout.write(line)


def score(repository: Path, future: dict[int, set[int]], feedback: dict[int, set[int]], k: int = 10,
          only: set[int] | None = None) -> dict:
    """Scored on every future user the repository knows, or on `only` (users every compared model knows)."""
    from recserve.serving.local import LocalPipeline

    pipe = LocalPipeline(repository, threads=2)
    known = set(int(u) for u in pipe.retriever.user_ids) if only is None else only
    users = np.array(sorted(u for u in future if u in known), np.int64)
    recs = pipe.recommend(users, k, np.zeros(len(users)), np.zeros(len(users)))
    recall, ndcg, wasted = [], [], []
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    for u, row in zip(users, recs):
        want, got = future[int(u)], [int(i) for i in row if i >= 0]
        hits = np.array([i in want for i in got] + [False] * (k - len(got)), bool)
        recall.append(hits.sum() / min(len(want), k))
        ndcg.append(float((hits * disc).sum() / disc[:min(len(want), k)].sum()))
        wasted.append(sum(i in feedback.get(int(u), ()) for i in got) / k)
    return {"users": int(len(users)), "recall@10": float(np.mean(recall)), "ndcg@10": float(np.mean(ndcg)),
            "already_rated_share": float(np.mean(wasted))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="an ML-100K directory (u.data, u.item, u.user)")
    ap.add_argument("--t1", type=float, default=0.8, help="quantile of the timestamps where the past ends")
    ap.add_argument("--t2", type=float, default=0.9, help="quantile where the feedback period ends")
    ap.add_argument("--budget-minutes", type=float, default=1.5)
    ap.add_argument("--work", type=Path, default=None, help="keep the artifacts here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--retrain", action="store_true", help="also train --resume and from scratch on data up to T2")
    args = ap.parse_args()

    from recserve.data import load_movielens
    from recserve.events import EventLog
    from recserve.export.index import IndexSpec
    from recserve.export.onnx import export_onnx
    from recserve.serving.repository import RepoOptions, write_repository
    from recserve.train import TrainConfig, search_budget, train_all
    from recserve.update import update

    rows = np.loadtxt(args.data / "u.data", dtype=np.int64)          # user, item, rating, ts
    t1, t2 = (int(np.quantile(rows[:, 3], q)) for q in (args.t1, args.t2))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    past_dir, stale, updated = work / "past", work / "stale", work / "updated"
    for d in (past_dir, stale, updated):
        shutil.rmtree(d, ignore_errors=True)
    cut(args.data, past_dir, t1)
    t0 = time.monotonic()
    train_all(load_movielens(past_dir), stale, TrainConfig(**search_budget(args.budget_minutes)), progress=False)
    export_onnx(stale)
    trained_s = time.monotonic() - t0
    shutil.copytree(stale, updated)

    fb = rows[(rows[:, 3] >= t1) & (rows[:, 3] < t2)]
    fut = rows[rows[:, 3] >= t2]
    (work / "events.jsonl").unlink(missing_ok=True)          # EventLog appends
    log = EventLog(work / "events.jsonl")
    for n, (u, i, _, ts) in enumerate(fb):
        log.write({"type": "click", "request_id": f"replay{n}", "user": int(u), "item": int(i), "ts": int(ts)})
    log.close()
    t0 = time.monotonic()
    folded = update(updated, work / "events.jsonl")
    update_s = time.monotonic() - t0

    future: dict[int, set[int]] = {}
    for u, i, _, _ in fut:
        future.setdefault(int(u), set()).add(int(i))
    feedback: dict[int, set[int]] = {}
    for u, i, _, _ in fb:
        feedback.setdefault(int(u), set()).add(int(i))
    out = {"t1": t1, "t2": t2, "past": int((rows[:, 3] < t1).sum()), "feedback": int(len(fb)),
           "future": int(len(fut)), "train_s": round(trained_s, 1), "update_s": round(update_s, 2), "folded": folded}
    models = [("stale", stale), ("updated", updated)]
    if args.retrain:
        upto = work / "upto_t2"
        shutil.rmtree(upto, ignore_errors=True)
        cut(args.data, upto, t2)
        for name, resume in (("resumed", str(stale)), ("retrained", "")):
            arts = work / name
            shutil.rmtree(arts, ignore_errors=True)
            t0 = time.monotonic()
            train_all(load_movielens(upto), arts, TrainConfig(resume=resume, **search_budget(args.budget_minutes)),
                      progress=False)
            export_onnx(arts)
            out[f"{name}_train_s"] = round(time.monotonic() - t0, 1)
            models.append((name, arts))
    common = {int(u) for u in np.load(stale / "dataset.npz")["user_ids"]}     # the users the stale model knows
    for name, arts in models:
        repo = work / f"repo_{name}"
        write_repository(arts, repo, RepoOptions(index=IndexSpec("flat")))
        out[name] = score(repo, future, feedback, only=common)
        if name in ("resumed", "retrained"):
            out[f"{name}_all_known"] = score(repo, future, feedback)
    out["ndcg_ratio"] = out["updated"]["ndcg@10"] / out["stale"]["ndcg@10"]
    print(f"past {out['past']:,} ratings (before T1), feedback {out['feedback']:,} [T1, T2), future {out['future']:,}"
          f" (from T2); trained in {out['train_s']} s; update folded {folded['folded']:,} clicks of {folded['users']}"
          f" users in {out['update_s']} s ({folded['unknown_user']:,} of unknown users, {folded['unknown_item']:,} of"
          " unknown items)")
    print("model     users  recall@10  ndcg@10  share of the 10 already rated in the feedback period")
    for name, _ in models:
        r = out[name]
        print(f"{name:<8} {r['users']:>6}  {r['recall@10']:.4f}     {r['ndcg@10']:.4f}   "
              f"{r['already_rated_share']:.4f}")
    for name, _ in models[2:]:
        r = out[f"{name}_all_known"]
        print(f"{name:<8} {r['users']:>6}  {r['recall@10']:.4f}     {r['ndcg@10']:.4f}   (every future user it knows)")
    print(f"updated / stale ndcg@10: {out['ndcg_ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
