"""Write a perf_analyzer ``--input-data`` JSON file from real user ids.

perf_analyzer's own ``random`` data would ask for users that do not exist (every request an error), so
the requests are built from the ids the repository serves. The file holds ``--n`` requests; perf_analyzer
cycles through them::

    {"data": [{"user_id": {"content": [ID], "shape": [1]}, "k": {"content": [10], "shape": [1]},
               "hour": {"content": [H], "shape": [1]}, "weekday": {"content": [W], "shape": [1]}}, ...]}

Shapes leave out the batch dimension, as perf_analyzer expects for models with ``max_batch_size > 0``.
Models: ``recommend`` and ``retrieval`` (the first step of the path), which take the request's tensors as
the serving spec names them (``recserve/serving/spec.py``, ``model_repository/README.md``).

Usage::

    python loadtest/make_perf_input.py --users-from ARTIFACTS/onnx/user_features.npz --out work/perf_input.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MODELS = ("recommend", "retrieval")


def _tensor(values: np.ndarray) -> dict:
    values = np.asarray(values)
    return {"content": values.reshape(-1).tolist(), "shape": list(values.shape)}


def _load(users_from: Path | None, user_ids_file: Path | None) -> dict[str, np.ndarray]:
    if users_from is not None:
        with np.load(users_from, allow_pickle=False) as z:
            if "user_ids" not in z.files:
                raise ValueError(f"{users_from} has no `user_ids` array (it has {', '.join(z.files)})")
            return {name: z[name] for name in z.files}
    if user_ids_file is not None:
        return {"user_ids": np.array([int(x) for x in user_ids_file.read_text(encoding="utf-8").split()], np.int64)}
    raise ValueError("pass --users-from ARTIFACTS/onnx/user_features.npz or --user-ids-file FILE")


def build(
    tables: dict[str, np.ndarray], model: str = "recommend", n: int = 256, k: int = 10, seed: int = 0
) -> dict:
    """The input-data document for ``n`` requests to ``model``, users drawn (with replacement) by ``seed``.

    Raises:
        ValueError: unknown model, or no users.
    """
    if model not in MODELS:
        raise ValueError(f"model={model!r}: input data can be built for {', '.join(MODELS)}; "
                         "for other models pass perf_analyzer `--input-data random` yourself")
    if n < 1 or k < 1:
        raise ValueError(f"--n and --k must be at least 1, got n={n}, k={k}")
    user_ids = np.asarray(tables["user_ids"], dtype=np.int64).reshape(-1)
    if user_ids.size == 0:
        raise ValueError("no user ids to build requests from")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, user_ids.size, size=n)
    data = []
    for row in rows:
        data.append({"user_id": _tensor(np.array([user_ids[row]], np.int64)), "k": _tensor(np.array([k], np.int32)),
                     "hour": _tensor(np.array([rng.integers(0, 24)], np.int64)),
                     "weekday": _tensor(np.array([rng.integers(0, 7)], np.int64))})
    return {"data": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--users-from", type=Path, help="an .npz with `user_ids` (ARTIFACTS/onnx/user_features.npz)")
    source.add_argument("--user-ids-file", type=Path, help="text file, one raw user id a line")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--model", default="recommend", choices=MODELS)
    parser.add_argument("--n", type=int, default=256, help="requests in the file (perf_analyzer cycles them)")
    parser.add_argument("--k", type=int, default=10, help="items per recommendation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in (args.users_from, args.user_ids_file):
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist")
    try:
        doc = build(_load(args.users_from, args.user_ids_file), args.model, args.n, args.k, args.seed)
    except ValueError as exc:
        print(f"make_perf_input: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc), encoding="utf-8")
    print(f"wrote {args.out}: {len(doc['data'])} {args.model} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
