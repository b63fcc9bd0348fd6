"""The serving spec: every served model, its tensors, files and batching, written once. Torch-free.

Generated from it: every `config.pbtxt` and the ensemble's wiring (`serving/repository.py`), the python
steps' input and output names (`serving/steps/`), the client's pipeline mode, the fake repository of the
client tests, and the table in `model_repository/README.md` (`python -m recserve.serving.spec`).

A request crosses two models (the `recommend` ensemble):

    user_id, k, [hour, weekday] ─► retrieval (python: validate; raw id -> index; user tower graph -> user_vec;
                                              blend vector -> FAISS; item-to-item neighbours; popular; merged by
                                              the candidate rule -> K unseen cand_idx and their cand_src scores)
                                ─► ranker    (graph: gather features, score, mask padding, TopK, raw ids)
                                             ─► item_ids, scores

Each arrow is a process boundary in the embedded flavor, and one costs 0.3-0.5 ms of IPC even for a step
that only looks things up (perf_analyzer's per-model compute at concurrency 1), so the user tower runs
inside `retrieval` rather than as a step of its own (measured: README "Serving").

Wiring is by name: a step's input comes from the ensemble input or the earlier step output of the same
name, so names are unique across the path. Dims are per request row (Triton adds the batch dimension);
symbols are filled in by `resolve`: D (embedding size), K (candidates per user), KMAX (most items per
response), S (source scores per candidate, recserve.sources.SRC_FEATURES), G (genres).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

ENSEMBLE = "recommend"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                      # Triton data type without "TYPE_": INT64, INT32, FP32, BYTES
    dims: tuple[int | str, ...]     # per request row
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Step:
    name: str
    backend: str                    # "python" (recserve/serving/steps/<name>.py) or "onnx" (a graph)
    level: str                      # "user": batches many users; "candidate": a row is K candidates wide
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    files: tuple[str, ...]          # in the model's version directory
    params: tuple[str, ...] = ()    # config parameters the step reads
    on_path: bool = True            # a step of the `recommend` ensemble
    doc: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs if not t.optional)

    @property
    def optional(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs if t.optional)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


# Dynamic batching per level. The queue delay is paid in full by a lone request at every step, so it is
# small; under load the batcher merges whatever queued while an instance was busy. A ranker row is already
# K candidates wide, so a few users fill its GEMMs.
BATCHING = {
    "user": {"max_batch_size": 64, "preferred": [8, 16], "delay_us": 50},
    "candidate": {"max_batch_size": 16, "preferred": [4, 8], "delay_us": 50},
}
# Load shedding happens at the front door (recserve/serving/frontdoor.py: a bound on requests in flight, 503
# beyond it), not in Triton's queues: any `default_queue_policy` (max_queue_size, with or without a timeout)
# degrades Triton 2.51's dynamic batcher under load. Measured on `recommend`, wrk at 32 connections straight to
# Triton, two 8 s runs each: with `max_queue_size: 64` 1,298 then 573 req/s (p99 55 ms, then 945 ms, stalls of
# 0.5-1 s); without a queue policy 1,656 and 1,695 req/s (p99 31 and 30 ms). With a timeout as well, requests
# were held 250-500 ms and failed "Request timeout expired" (see triton-inference-server/server#8870).
# The widest a variable dimension (-1) of a request may be: titles for a page of results, not the catalogue.
MAX_WIDTH = 1_000

_HOUR = Tensor("hour", "INT64", (1,), optional=True, doc="0-23; default: now, UTC")
_WEEKDAY = Tensor("weekday", "INT64", (1,), optional=True, doc="0 = Monday; default: today, UTC")

REQUEST = (
    Tensor("user_id", "INT64", (1,), doc="raw id, as in the data set"),
    Tensor("k", "INT32", (1,), doc="items wanted, 1..KMAX"),
    _HOUR,
    _WEEKDAY,
)
RESPONSE = (
    Tensor("item_ids", "INT64", (-1,), doc="raw ids, best first, at most k"),
    Tensor("scores", "FP32", (-1,), doc="ranker scores of those items"),
)

# Request-time behaviours of `recommend` (embedded flavor), all optional and off by default (recserve/rules.py,
# recserve/coldstart.py): cold start, business rules applied after ranking, exploration with propensities.
OPTIONS = (
    Tensor("history", "INT64", (-1,), optional=True,
           doc="the user's recent raw item ids, newest last: personalises a user the model has never seen"),
    Tensor("segment", "INT64", (-1,), optional=True,
           doc="an unknown user's attribute codes, in the data set's order (0 / -1: not given): popular there"),
    Tensor("exclude", "INT64", (-1,), optional=True, doc="raw item ids never returned"),
    Tensor("max_per_genre", "INT32", (1,), optional=True, doc="at most this many items per genre; 0 = off"),
    Tensor("mmr_lambda", "FP32", (1,), optional=True, doc="diversity by MMR, 0..1; 1 = off"),
    Tensor("freshness", "FP32", (1,), optional=True, doc="boost for newer items, in score units; 0 = off"),
    Tensor("explore", "INT32", (1,), optional=True, doc="0 off, 1 epsilon-greedy, 2 softmax"),
    Tensor("explore_param", "FP32", (1,), optional=True, doc="epsilon (0..1) or temperature (> 0)"),
    Tensor("seed", "INT64", (1,), optional=True, doc="required when exploring: the draw is reproducible"),
)
OPTION_RESPONSE = (
    Tensor("source", "BYTES", (1,), doc="personalized | history | segment | popular | fallback"),
    Tensor("propensity", "FP32", (-1,), doc="per item: the policy's probability of it at its position"),
    Tensor("version", "BYTES", (1,), doc="the model version that answered: an A/B split's arm (`recserve ab`)"),
)
SOURCES = ("personalized", "history", "segment", "popular", "fallback")

STEPS = (
    Step("retrieval", "python", "user",
         inputs=REQUEST,
         outputs=(Tensor("user_idx", "INT64", (1,), doc="dense user index"),
                  Tensor("user_vec", "FP32", ("D",), doc="unit length"),
                  Tensor("context_hour", "INT64", (1,), doc="the request's hour, or now"),
                  Tensor("context_weekday", "INT64", (1,), doc="the request's weekday, or today"),
                  Tensor("cand_idx", "INT64", ("K",), doc="K distinct unseen item indices; -1 pads"),
                  Tensor("cand_src", "FP32", ("K", "S"), doc="per candidate: blend score, ALS term, neighbour term")),
         files=("user_tower.onnx", "users.npz", "index.faiss (or index.S.faiss, --shards)", "index.json", "seen.npz",
                "sources.npz",
                "blend.json", "blend_items.npy", "cold.npz", "user_tower_raw.onnx", "items.npz"),
         params=("k_max", "intra_op_threads", "omp_threads", "nprobe"),
         doc="validates the request (unknown user, k, hour, weekday: INVALID_ARG naming the value); maps the raw "
             "id to its index; runs the user tower graph, which gathers the user's attributes and recent items from "
             "its own tables; searches FAISS with the user's blend vector (towers, ALS, popularity, popularity in "
             "the user's time) for K + |seen| "
             "items, adds the item-to-item neighbours of the user's recent items and the popular items, and keeps K "
             "distinct unseen ones with their source scores (the candidate rule of recserve/sources.py)"),
    Step("ranker", "onnx", "candidate",
         inputs=(Tensor("user_idx", "INT64", (1,)), Tensor("user_vec", "FP32", ("D",)),
                 Tensor("context_hour", "INT64", (1,)), Tensor("context_weekday", "INT64", (1,)),
                 Tensor("cand_idx", "INT64", ("K",)), Tensor("cand_src", "FP32", ("K", "S")),
                 Tensor("k", "INT32", (1,))),
         outputs=RESPONSE,
         files=("model.onnx",), params=("intra_op_threads", "n_users", "n_items", "k_max"),
         doc="one graph: gathers each candidate's features from its tables, scores them (or, when the ranker did "
             "not beat the retrieval order on validation, takes the blend score), masks padding, keeps the best "
             "KMAX with ONNX TopK and maps them to raw ids; items past k are -1"),
    Step("item_tower", "onnx", "user",
         inputs=(Tensor("item_idx", "INT64", (1,)), Tensor("item_genres", "FP32", ("G",)),
                 Tensor("item_year", "INT64", (1,))),
         outputs=(Tensor("item_vec", "FP32", ("D",)),),
         files=("model.onnx",), params=("intra_op_threads", "n_items", "n_year_buckets"), on_path=False,
         doc="embeds items (new ones too); the index must come from this tower"),
    Step("catalogue", "python", "user",
         inputs=(Tensor("item_ids", "INT64", (-1,), optional=True, doc="raw ids"),
                 Tensor("item_idx", "INT64", (-1,), optional=True, doc="or dense indices (as cand_idx)")),
         outputs=(Tensor("titles", "BYTES", (-1,), doc="\"\" for an unknown id"),
                  Tensor("raw_item_ids", "INT64", (-1,), doc="-1 for an unknown id"),
                  Tensor("item_genres", "FP32", (-1, "G"), doc="multi-hot"),
                  Tensor("item_year", "INT64", (-1,), doc="year bucket, 0 = unknown"),
                  Tensor("item_vec", "FP32", (-1, "D"), doc="the item tower's vector")),
         files=("items.npz",), params=("year_min", "year_max"), on_path=False,
         doc="items for display and for rules a client applies (pipeline mode), off the hot path: by raw id or "
             "by dense index; `year_min` / `year_max` (config) are the catalogue's year range"),
)


# The embedded flavor serves `recommend` as this one python model instead of the ensemble: the path's step
# code in one process (`recserve/serving/local.py`, `steps/fused.py`), one instance per core. On the pip
# server every step is a python-backend process, and a hop between two costs more than the work of either
# (measured: README "Serving"). The step models stay served for the client's pipeline mode. The native flavor
# serves it too by default, with the ranker asked as the `ranker` model (onnxruntime / TensorRT) through BLS.
FUSED = Step(ENSEMBLE, "python", "candidate", inputs=REQUEST + OPTIONS, outputs=RESPONSE + OPTION_RESPONSE,
             files=(), params=("threads", "ranker_timeout_ms"), on_path=False,
             doc="embedded flavor: the steps of the path run in one process (reads the step models' files); also "
                 "answers unknown users (history, segment, popular), applies the rules and exploration, and falls "
                 "back to the retrieval order or popular items when a step fails")


def path() -> tuple[Step, ...]:
    """The steps of the `recommend` ensemble, in order."""
    return tuple(s for s in STEPS if s.on_path)


def step(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise KeyError(f"no served model named {name!r}: the spec has {', '.join(s.name for s in STEPS)}")


def wiring() -> list[tuple[Step, dict[str, str]]]:
    """Each path step with {its input: the ensemble tensor feeding it}; checks every input has one producer."""
    produced = {t.name: ENSEMBLE for t in REQUEST}
    out = []
    for s in path():
        missing = [n for n in s.input_names if n not in produced]
        if missing:
            raise ValueError(f"step {s.name!r} needs {missing}, which no request input or earlier step provides")
        for n in s.output_names:
            if n in produced:
                raise ValueError(f"step {s.name!r} outputs {n!r}, already produced by {produced[n]!r}")
            produced[n] = s.name
        out.append((s, {n: n for n in s.input_names}))
    return out


def resolve(dims: tuple[int | str, ...], sizes: dict[str, int]) -> list[int]:
    """Symbols (D, K, KMAX, G, S) -> numbers."""
    return [int(sizes[d]) if isinstance(d, str) else int(d) for d in dims]


def resolved_step(name: str, sizes: dict[str, int]) -> Step:
    s = step(name)
    fix = lambda ts: tuple(replace(t, dims=tuple(resolve(t.dims, sizes))) for t in ts)  # noqa: E731
    return replace(s, inputs=fix(s.inputs), outputs=fix(s.outputs))


def markdown_table() -> str:
    """The table of `model_repository/README.md`."""
    def fmt(ts: tuple[Tensor, ...]) -> str:
        parts = []
        for t in ts:
            dims = ", ".join(str(d) for d in t.dims)
            parts.append(f"`{t.name}` {t.dtype} [{dims}]" + (" (optional)" if t.optional else "")
                         + (f": {t.doc}" if t.doc else ""))
        return "<br>".join(parts)

    rows = ["| model | kind | on the request path | inputs | outputs | what it does |", "|---|---|---|---|---|---|",
            f"| `{ENSEMBLE}` | python (embedded flavor; native flavor by default, the ranker asked as the `ranker` "
            f"model through BLS) | (the path) | {fmt(REQUEST)}, and {fmt(OPTIONS)} | {fmt(RESPONSE)}, and "
            f"{fmt(OPTION_RESPONSE)} | {FUSED.doc} |",
            f"| `{ENSEMBLE}` | ensemble (native flavor, `--native-recommend ensemble`) | (the path) | {fmt(REQUEST)} | "
            f"{fmt(RESPONSE)} | {' -> '.join(s.name for s in path())} |"]
    for s in STEPS:
        rows.append(f"| `{s.name}` | {s.backend} | {'yes' if s.on_path else 'no'} | {fmt(s.inputs)} | "
                    f"{fmt(s.outputs)} | {s.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
