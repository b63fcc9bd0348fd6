"""GPU latency of the ranker and towers in PyTorch: FP32 vs FP16 (autocast), per request.

Run on a CUDA machine: `python -m recserve.bench_gpu [--artifacts DIR]`. Without artifacts it trains
nothing and times randomly initialised models of the shipped sizes (latency does not depend on weights).
Times with CUDA events after warm-up; prints the median and p90 of each.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from recserve.models import Ranker, RankerConfig, TowerConfig, TwoTower
from recserve.reference import RANKER_INPUTS

SIZES = {"n_users": 6040, "n_items": 3706, "n_genres": 18, "user_cat_cards": [8, 3, 22]}   # ML-1M-like


def _inputs(cfg: TowerConfig, batch: int, k: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def ints(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(device)

    vec = torch.nn.functional.normalize(torch.randn(batch, cfg.dim, generator=g), dim=-1).to(device)
    cvec = torch.nn.functional.normalize(torch.randn(batch, k, cfg.dim, generator=g), dim=-1).to(device)
    return {"user_idx": ints(cfg.n_users, batch),
            "user_cats": torch.stack([ints(c, batch) for c in cfg.user_cat_cards], 1),
            "history": ints(cfg.n_items + 1, batch, cfg.history_len), "user_vec": vec,
            "hour": ints(24, batch), "weekday": ints(7, batch), "cand_idx": ints(cfg.n_items, batch, k),
            "cand_genres": (torch.rand(batch, k, cfg.n_genres, generator=g) < 0.2).float().to(device),
            "cand_year": ints(32, batch, k), "cand_pop": (torch.rand(batch, k, generator=g) * 6).to(device),
            "cand_vec": cvec, "cand_src": torch.randn(batch, k, 3, generator=g).to(device)}


def _time(fn, repeats: int = 200, warmup: int = 20) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times)), float(np.percentile(times, 90))


@torch.no_grad()
def bench(candidates: int = 500, users_per_batch: tuple[int, ...] = (1, 8), tower_batch: int = 256) -> list[dict]:
    device = "cuda"
    tcfg = TowerConfig(**SIZES)
    rcfg = RankerConfig(**SIZES, tower_dim=tcfg.dim)
    two_tower, ranker = TwoTower(tcfg).to(device).eval(), Ranker(rcfg).to(device).eval()
    names = RANKER_INPUTS
    rows = []
    for b in users_per_batch:
        x = _inputs(tcfg, b, candidates, device)
        args = [x[n] for n in names]
        ref = ranker(*args).float()
        for precision in ("fp32", "fp16"):
            def run(args=args, precision=precision):
                with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                    return ranker(*args)
            med, p90 = _time(run)
            err = float((run().float() - ref).abs().max() / ref.abs().max())
            rows.append({"model": "ranker", "precision": precision, "users": b, "rows": b * candidates,
                         "median_ms": round(med, 4), "p90_ms": round(p90, 4),
                         "rows_per_s": round(b * candidates / med * 1e3), "max_rel_err_vs_fp32": err})
    x = _inputs(tcfg, tower_batch, 1, device)
    for precision in ("fp32", "fp16"):
        def run_tower(precision=precision):
            with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                return two_tower.user_tower(x["user_idx"], x["user_cats"], x["history"])
        med, p90 = _time(run_tower)
        rows.append({"model": "user_tower", "precision": precision, "users": tower_batch, "rows": tower_batch,
                     "median_ms": round(med, 4), "p90_ms": round(p90, 4),
                     "rows_per_s": round(tower_batch / med * 1e3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark only runs on a GPU machine")
    rows = bench(a.candidates)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| model | precision | users | rows | median ms | p90 ms | rows/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['users']} | {r['rows']} | {r['median_ms']} | {r['p90_ms']} "
              f"| {r['rows_per_s']:,} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
