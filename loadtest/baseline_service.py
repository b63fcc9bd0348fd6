"""The plain alternative the Triton ensemble must beat: ONNX Runtime + FAISS in-process behind FastAPI.

It serves the repository's own files (the `retrieval` step's graph, index and tables, `ranker/1/model.onnx`)
at Triton's address for the ensemble, ``POST /v2/models/recommend/infer``, with the same KServe v2 JSON in and
out, so one load generator (wrk, `loadtest/wrk_recommend.lua`) drives both. Built as a competent engineer would
for a 2-core box:

- uvicorn with httptools and uvloop (plain h11 shows a 40 ms Nagle / delayed-ACK floor), ``--workers 2``
  processes, one per core, no access log;
- the endpoint is ``async`` and computes inline: CPU-bound work gains nothing from FastAPI's thread pool, a
  worker answers one request at a time and the kernel queues the rest;
- ONNX Runtime sessions with ``cores // workers`` intra-op threads (1 here) and no spinning, one FAISS (OpenMP)
  thread per worker;
- the same graphs, index and tables as the served path, and its candidate step's code
  (`recserve.serving.steps.retrieval.Retriever`: FAISS over the blend vectors, the neighbour and popularity
  sources, the candidate rule), numpy-vectorised over the rows of a request.

    python loadtest/baseline_service.py --repository work/repo_fp32 --port 8080 [--workers 2] [--threads 1]

Errors: 400 ``{"error": MESSAGE}`` for a body that is not a KServe request, an unknown user, k out of
1..k_max, hour / weekday out of range. ``GET /v2/health/ready`` answers 200 once the files are loaded.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ENV_REPOSITORY = "RECSERVE_BASELINE_REPOSITORY"
ENV_THREADS = "RECSERVE_BASELINE_THREADS"
MODEL = "recommend"
INFER_PATH = f"/v2/models/{MODEL}/infer"
INPUTS = ("user_id", "k", "hour", "weekday")
REQUIRED = ("user_id", "k")


class BadRequest(ValueError):
    """The request is unusable; answered with HTTP 400 and this message."""


def parse_request(body: bytes | str) -> tuple[dict[str, np.ndarray], object]:
    """A KServe v2 JSON body -> ({input name: (rows, 1) int64}, the request's ``id`` or None).

    Accepts ``data`` flat or nested, one value per row; every input must have the same number of rows.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadRequest('expected a KServe v2 request: {"inputs": [{"name": ..., "shape": ..., "datatype": ..., '
                         '"data": [...]}, ...]}')
    out: dict[str, np.ndarray] = {}
    for entry in doc["inputs"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in INPUTS:
            raise BadRequest(f"unknown input {name!r}: the inputs are {', '.join(INPUTS)}")
        if name in out:
            raise BadRequest(f"input {name!r} given twice")
        try:
            values = np.asarray(entry.get("data"))
        except ValueError:  # ragged nesting
            values = np.asarray(None)
        if values.dtype.kind not in "iu" or values.size == 0:
            raise BadRequest(f"input {name!r}: data must be a non-empty list of integers")
        out[name] = values.astype(np.int64).reshape(-1, 1)
    missing = [n for n in REQUIRED if n not in out]
    if missing:
        raise BadRequest(f"missing input {', '.join(repr(n) for n in missing)}")
    rows = {len(v) for v in out.values()}
    if len(rows) != 1:
        raise BadRequest(f"inputs have different numbers of rows: {sorted(rows)}")
    return out, doc.get("id")


def render_response(item_ids: np.ndarray, scores: np.ndarray, request_id: object = None) -> bytes:
    """KServe v2 JSON response with outputs ``item_ids`` (INT64) and ``scores`` (FP32), both [rows, n]."""
    doc: dict = {"model_name": MODEL, "model_version": "1"}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = [
        {"name": "item_ids", "datatype": "INT64", "shape": list(item_ids.shape), "data": item_ids.ravel().tolist()},
        {"name": "scores", "datatype": "FP32", "shape": list(scores.shape),
         "data": scores.astype(np.float64).ravel().tolist()},
    ]
    return json.dumps(doc, separators=(",", ":")).encode()


def live(root: Path) -> str:
    """The repository's live model version (`recserve deploy` adds versions): the manifest's, else 1."""
    manifest = root / "manifest.json"
    return str(json.loads(manifest.read_text()).get("model_version", 1)) if manifest.is_file() else "1"


def find_file(root: Path, name: str) -> Path:
    """A repository file of the live version by name: in ``user/V`` or ``retrieval/V`` (the step that holds the
    user tower), else the one version directory that has it."""
    v = live(root)
    for path in (root / "user" / v / name, root / "retrieval" / v / name, *sorted(root.glob(f"*/{v}/{name}"))):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root} has no */{v}/{name}; write it with `recserve export repository`")


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, which sleep rather than spin when idle."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def now_context() -> tuple[int, int]:
    """(hour, weekday) of the current UTC time, Monday = 0."""
    t = time.gmtime()
    return t.tm_hour, t.tm_wday


class Recommender:
    """user tower -> FAISS + candidate rule -> ranker graph, for the rows of one request."""

    def __init__(self, repository: str | os.PathLike[str], threads: int = 1) -> None:
        from recserve.serving.steps.retrieval import Retriever

        root = Path(repository)
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        self.k_max, self.candidates = int(manifest["k_max"]), int(manifest["candidates"])
        step = find_file(root, "index.json").parent
        # the served step's numpy code over its files: user tower graph, FAISS, the candidate sources and rule
        self.retriever = Retriever(step, {"k_max": str(self.k_max), "omp_threads": "1",
                                          "intra_op_threads": str(threads), "device": "cpu"})
        self.user_ids = np.asarray(self.retriever.user_ids, np.int64)
        self.ranker = session(root / "ranker" / live(root) / "model.onnx", threads)
        # a graph input of rank 1 takes the [B] column of a [B, 1] row (as Triton's reshape does)
        self.ranker_ranks = {i.name: len(i.shape) for i in self.ranker.get_inputs()}

    def lookup(self, user_id: np.ndarray) -> np.ndarray:
        """Dense index of each raw id (the sorted ``users.npz`` position); -1 where unknown."""
        pos = np.clip(np.searchsorted(self.user_ids, user_id), 0, len(self.user_ids) - 1)
        return np.where(self.user_ids[pos] == user_id, pos, -1)

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise BadRequest naming the first bad value; fills absent hour / weekday with now (UTC), in place."""
        rows = len(inputs["user_id"])
        if "hour" not in inputs or "weekday" not in inputs:
            hour, weekday = now_context()
            inputs.setdefault("hour", np.full((rows, 1), hour, np.int64))
            inputs.setdefault("weekday", np.full((rows, 1), weekday, np.int64))
        for name, low, high in (("k", 1, self.k_max), ("hour", 0, 23), ("weekday", 0, 6)):
            bad = inputs[name][(inputs[name] < low) | (inputs[name] > high)]
            if bad.size:
                raise BadRequest(f"{name}={int(bad[0])} is out of range: choose {low}..{high}")
        ids = inputs["user_id"].reshape(-1)
        unknown = ids[self.lookup(ids) < 0]
        if unknown.size:
            raise BadRequest(f"unknown user_id {int(unknown[0])}: not among the {len(self.user_ids)} users "
                             "this model was trained on")

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Checked inputs -> (item_ids, scores), [rows, n] with n the most items any row holds (-1 pads)."""
        idx = self.lookup(inputs["user_id"].reshape(-1)).reshape(-1, 1)
        vec = self.retriever.user_vectors(idx)
        cand, src = self.retriever.candidates(idx, vec)
        feed = {"user_idx": idx, "user_vec": vec, "context_hour": inputs["hour"],
                "context_weekday": inputs["weekday"], "cand_idx": cand, "cand_src": src,
                "k": inputs["k"].astype(np.int32)}
        feed = {n: (v.reshape(-1) if self.ranker_ranks.get(n) == 1 else v) for n, v in feed.items()}
        item_ids, scores = self.ranker.run(["item_ids", "scores"], feed)
        width = int((item_ids >= 0).sum(axis=1).max()) if len(item_ids) else 0
        return item_ids[:, :width], scores[:, :width]


def create_app(repository: str | os.PathLike[str] | None = None, threads: int | None = None):
    """The FastAPI app over ``repository`` (default: $RECSERVE_BASELINE_REPOSITORY; a uvicorn factory)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    repository = repository or os.environ.get(ENV_REPOSITORY)
    if not repository:
        raise RuntimeError(f"no repository: pass one or set {ENV_REPOSITORY}")
    threads = threads or int(os.environ.get(ENV_THREADS, "1"))
    recommender = Recommender(repository, threads)
    app = FastAPI(title="recserve baseline", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.recommender = recommender

    @app.post(INFER_PATH)
    async def infer(request: Request) -> Response:
        try:
            inputs, request_id = parse_request(await request.body())
            recommender.check(inputs)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        item_ids, scores = recommender(inputs)
        return Response(render_response(item_ids, scores, request_id), media_type="application/json")

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="a `recserve export repository` folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (one per core)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads per worker (default: cores // workers, at least 1)")
    args = parser.parse_args(argv)
    if not (args.repository / "manifest.json").is_file():
        parser.error(f"{args.repository} has no manifest.json; run `recserve export repository` first")
    import uvicorn

    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    # the workers are fresh interpreters: they read these before importing faiss / onnxruntime
    os.environ.update({ENV_REPOSITORY: str(args.repository.resolve()), ENV_THREADS: str(threads),
                       "OMP_NUM_THREADS": "1"})
    uvicorn.run("baseline_service:create_app", factory=True, app_dir=str(Path(__file__).resolve().parent),
                host=args.host, port=args.port, workers=args.workers, http="httptools", loop="uvloop",
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
