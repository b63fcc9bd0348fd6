"""Write a Triton model repository from exported artifacts.

Configs are data: dicts mirroring model_config.proto, parsed into `model_config_pb2.ModelConfig` and
rendered with protobuf's text format (never string templates). The repository is built in a temporary
directory next to the target and renamed into place, with a manifest of every artifact's sha256.

Flavors:
  embedded  ONNX models run by ONNX Runtime inside python-backend models (the pip-installed tritonserver);
  native    Triton's onnxruntime backend (NGC container), same model.onnx files.
Python-backend steps (user_features, retrieval, ranker_inputs, topk) are the same in both flavors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from recserve.errors import ArtifactError
from recserve.export.index import IndexSpec, build_index, describe, recall_vs_exact
from recserve.triton_models.retrieval import sha256_of

PY_MODELS = ("user_features", "retrieval", "ranker_inputs", "topk")
ONNX_MODELS = ("user_tower", "item_tower", "ranker")
README = Path(__file__).resolve().parents[2] / "model_repository" / "README.md"

# Dynamic batching. On CPU a formed batch amortises per-call overhead (python stub IPC, one ORT run,
# one BLAS GEMM in FAISS). The queue delay is paid in full by a lone request at every one of the six
# steps, so it is kept at 100 us (measured: 500 us cost ~3 ms of a 7.5 ms request at concurrency 1);
# under load the batcher merges whatever queued while the instance was busy, delay or not.
# User-level models batch many users; the ranker's rows are already K candidates wide, so a few users
# make a full GEMM.
USER_LEVEL_BATCH = {"max_batch_size": 256, "preferred": [16, 64], "delay_us": 100}
CANDIDATE_LEVEL_BATCH = {"max_batch_size": 32, "preferred": [4, 8], "delay_us": 100}


@dataclass
class RepoOptions:
    flavor: str = "embedded"          # embedded | native
    precision: str = "fp32"           # fp32 | int8 (issue: INT8 gate)
    candidates: int = 500
    index: IndexSpec = field(default_factory=IndexSpec)
    instances: int = 1
    # Threads per model instance. Seven models share the cores; one thread each, without spinning,
    # beats every instance spinning a thread per core (measured in README "Serving").
    intra_op_threads: int = 1
    tensorrt: bool = False            # set by write_repository when engines were built
    recall_k: int = 100

    def validate(self) -> None:
        if self.flavor not in ("embedded", "native"):
            raise ArtifactError(f"--flavor {self.flavor!r} is not known: choose embedded or native")
        if self.candidates < 1:
            raise ArtifactError(f"--candidates must be at least 1, got {self.candidates}")
        if self.instances < 1:
            raise ArtifactError(f"--instances must be at least 1, got {self.instances}")


def tensor(name: str, dtype: str, dims: list[int], reshape: list[int] | None = None, optional: bool = False) -> dict:
    t: dict = {"name": name, "data_type": f"TYPE_{dtype}", "dims": dims}
    if reshape is not None:
        t["reshape"] = {"shape": reshape}
    if optional:
        t["optional"] = True
    return t


def render(config: dict) -> str:
    """dict -> ModelConfig protobuf -> text format. ParseDict rejects any field the proto does not have."""
    return text_format.MessageToString(json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _batching(b: dict) -> dict:
    return {"max_queue_delay_microseconds": b["delay_us"], "preferred_batch_size": b["preferred"]}


def model_io(meta: dict, k: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """Inputs and outputs of every model, per request row (Triton adds the batch dim)."""
    C, H, D, G = len(meta["user_cat_names"]), meta["history_len"], meta["dim"], meta["n_genres"]
    scalar = {"reshape": []}   # [B, 1] on the wire, [B] in the ONNX model
    return {
        "user_features": ([tensor("user_id", "INT64", [1]), tensor("hour", "INT64", [1], optional=True),
                           tensor("weekday", "INT64", [1], optional=True)],
                          [tensor("user_idx", "INT64", [1]), tensor("user_cats", "INT64", [C]),
                           tensor("history", "INT64", [H]), tensor("context_hour", "INT64", [1]),
                           tensor("context_weekday", "INT64", [1])]),
        "user_tower": ([tensor("user_idx", "INT64", [1], **scalar), tensor("user_cats", "INT64", [C]),
                        tensor("history", "INT64", [H])], [tensor("user_vec", "FP32", [D])]),
        "item_tower": ([tensor("item_idx", "INT64", [1], **scalar), tensor("item_genres", "FP32", [G]),
                        tensor("item_year", "INT64", [1], **scalar)], [tensor("item_vec", "FP32", [D])]),
        "retrieval": ([tensor("user_vec", "FP32", [D])],
                      [tensor("candidate_idx", "INT64", [k]), tensor("candidate_scores", "FP32", [k])]),
        "ranker_inputs": ([tensor("user_idx", "INT64", [1]), tensor("candidate_idx", "INT64", [k])],
                          [tensor("cand_idx", "INT64", [k]), tensor("cand_genres", "FP32", [k, G]),
                           tensor("cand_year", "INT64", [k]), tensor("cand_pop", "FP32", [k]),
                           tensor("cand_vec", "FP32", [k, D]), tensor("cand_valid", "BOOL", [k])]),
        "ranker": ([tensor("user_idx", "INT64", [1], **scalar), tensor("user_cats", "INT64", [C]),
                    tensor("user_vec", "FP32", [D]), tensor("hour", "INT64", [1], **scalar),
                    tensor("weekday", "INT64", [1], **scalar), tensor("cand_idx", "INT64", [k]),
                    tensor("cand_genres", "FP32", [k, G]), tensor("cand_year", "INT64", [k]),
                    tensor("cand_pop", "FP32", [k]), tensor("cand_vec", "FP32", [k, D])],
                   [tensor("scores", "FP32", [k])]),
        "topk": ([tensor("rank_scores", "FP32", [k]), tensor("candidate_idx", "INT64", [k]),
                  tensor("cand_valid", "BOOL", [k]), tensor("k", "INT32", [1])],
                 [tensor("item_ids", "INT64", [-1]), tensor("scores", "FP32", [-1]), tensor("titles", "STRING", [-1])]),
    }


def model_config(name: str, meta: dict, opts: RepoOptions) -> dict:
    inputs, outputs = model_io(meta, opts.candidates)[name]
    batch = CANDIDATE_LEVEL_BATCH if name in ("ranker", "ranker_inputs", "topk") else USER_LEVEL_BATCH
    cfg: dict = {"name": name, "max_batch_size": batch["max_batch_size"], "input": inputs, "output": outputs,
                 "dynamic_batching": _batching(batch),
                 "instance_group": [{"count": opts.instances, "kind": "KIND_CPU"}]}
    native_onnx = name in ONNX_MODELS and opts.flavor == "native"
    if native_onnx and opts.tensorrt:
        cfg["platform"] = "tensorrt_plan"
        cfg["default_model_filename"] = "model.plan"
    elif native_onnx:
        cfg["platform"] = "onnxruntime_onnx"
        cfg["default_model_filename"] = "model.onnx"
        if opts.intra_op_threads:
            cfg["parameters"] = {"intra_op_thread_count": {"string_value": str(opts.intra_op_threads)}}
    else:
        cfg["backend"] = "python"
        if name in ONNX_MODELS:
            # python backend ignores `reshape`; the ONNX Runtime wrapper squeezes [B, 1] itself
            for t in cfg["input"]:
                t.pop("reshape", None)
        params = {"intra_op_threads": str(opts.intra_op_threads)} if name in ONNX_MODELS else {}
        if name == "retrieval":
            params["omp_threads"] = str(opts.intra_op_threads)
        if name == "topk":
            params["candidates"] = str(opts.candidates)
        if params:
            cfg["parameters"] = {k: {"string_value": v} for k, v in params.items()}
    return cfg


def ensemble_config(meta: dict, opts: RepoOptions) -> dict:
    """`recommend`: user_features -> user_tower -> retrieval -> ranker_inputs -> ranker -> topk."""
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict:
        return {"model_name": model, "model_version": -1,
                "input_map": dict(inputs), "output_map": dict(outputs)}

    same = lambda *names: {n: n for n in names}  # noqa: E731
    ranker_in = {**same("user_idx", "user_cats", "user_vec", "cand_idx", "cand_genres", "cand_year", "cand_pop",
                        "cand_vec"), "hour": "ctx_hour", "weekday": "ctx_weekday"}
    return {
        "name": "recommend", "platform": "ensemble",
        # an ensemble may not batch more rows than its smallest member allows
        "max_batch_size": CANDIDATE_LEVEL_BATCH["max_batch_size"],
        "input": [tensor("user_id", "INT64", [1]), tensor("k", "INT32", [1]),
                  tensor("hour", "INT64", [1], optional=True), tensor("weekday", "INT64", [1], optional=True)],
        "output": [tensor("item_ids", "INT64", [-1]), tensor("scores", "FP32", [-1]), tensor("titles", "STRING", [-1])],
        "ensemble_scheduling": {"step": [
            # hour / weekday are optional: user_features passes them on, or the current UTC time
            step("user_features", same("user_id", "hour", "weekday"),
                 {**same("user_idx", "user_cats", "history"), "context_hour": "ctx_hour",
                  "context_weekday": "ctx_weekday"}),
            step("user_tower", same("user_idx", "user_cats", "history"), same("user_vec")),
            # candidate_scores are not needed: the ranker recomputes the dot product as a feature
            step("retrieval", same("user_vec"), same("candidate_idx")),
            step("ranker_inputs", same("user_idx", "candidate_idx"),
                 same("cand_idx", "cand_genres", "cand_year", "cand_pop", "cand_vec", "cand_valid")),
            step("ranker", ranker_in, {"scores": "rank_scores"}),
            step("topk", {"rank_scores": "rank_scores", "candidate_idx": "candidate_idx", "cand_valid": "cand_valid",
                          "k": "k"}, same("item_ids", "scores", "titles")),
        ]},
    }


def _user_queries(artifacts: Path, limit: int = 2000) -> np.ndarray:
    """Real user vectors (serving view) to measure the index's recall with."""
    from recserve import checkpoint
    from recserve.data.dataset import TEST, TRAIN, VALID, Dataset
    from recserve.reference import Tables, user_vectors

    ds = Dataset.load(artifacts / "dataset.npz")
    two_tower, _ = checkpoint.load(artifacts / "two_tower.pt", ds.fingerprint)
    users = np.random.default_rng(0).permutation(ds.n_users)[:limit]
    return user_vectors(two_tower, Tables(ds, (TRAIN, VALID, TEST), two_tower.cfg.history_len).users(users))


def write_repository(artifacts: Path, repository: Path, opts: RepoOptions | None = None) -> dict:
    """Build the whole repository in a temp dir beside `repository`, then swap it into place."""
    import faiss

    opts = opts or RepoOptions()
    opts.validate()
    artifacts, repository = Path(artifacts), Path(repository)
    onnx_dir = artifacts / "onnx"
    if not (onnx_dir / "export.json").exists():
        raise ArtifactError(f"{onnx_dir}/export.json is missing: run `recserve export onnx --artifacts {artifacts}`")
    meta = json.loads((onnx_dir / "export.json").read_text())
    opts.candidates = min(opts.candidates, meta["n_items"])
    model_files = {n: onnx_dir / f"{n}.onnx" for n in ONNX_MODELS}
    if opts.precision == "int8":
        model_files.update(_int8_files(artifacts))
    elif opts.precision != "fp32":
        raise ArtifactError(f"--precision {opts.precision!r} is not known: choose fp32 or int8")

    tensorrt_note = None
    if opts.flavor == "native" and opts.precision == "int8":
        from recserve.export.quantize import int8_report
        from recserve.export.tensorrt import tensorrt_status

        opts.tensorrt, tensorrt_note = tensorrt_status()
        target = ((int8_report(artifacts) or {}).get("settings") or {}).get("target")
        if opts.tensorrt and target != "tensorrt":
            raise ArtifactError("the INT8 models were quantized for ONNX Runtime (uint8 activations), which "
                                "TensorRT's parser rejects: run `recserve export onnx --precision int8 "
                                "--int8-target tensorrt` first")

    repository.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repository.name}.tmp-", dir=repository.parent))
    try:
        for name in ONNX_MODELS:
            files = ({"model.plan": _tensorrt_plan(tmp, name, model_files[name], meta, opts)} if opts.tensorrt
                     else {"model.onnx": model_files[name]})
            _write_model(tmp, name, model_config(name, meta, opts), files,
                         shim="onnx_model" if opts.flavor == "embedded" else None)
        tables = {"user_features": ["user_features.npz"], "retrieval": [],
                  "ranker_inputs": ["item_features.npz", "user_features.npz", "item_embeddings.npy"],
                  "topk": ["item_features.npz"]}
        for name in PY_MODELS:
            _write_model(tmp, name, model_config(name, meta, opts), {f: onnx_dir / f for f in tables[name]}, shim=name)
        index_info = _write_index(tmp / "retrieval" / "1", onnx_dir, opts, _user_queries(artifacts), faiss)
        _write_model(tmp, "recommend", ensemble_config(meta, opts), {}, shim=None)
        if README.exists():
            shutil.copy(README, tmp / "README.md")
        manifest = {
            "format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_version": 1, "fingerprint": meta["fingerprint"], "flavor": opts.flavor,
            "precision": opts.precision, "candidates": opts.candidates, "index": index_info,
            "tensorrt": {"engines": opts.tensorrt, "note": tensorrt_note},
            "int8": _int8_summary(artifacts) if opts.precision == "int8" else None,
            "models": sorted([*ONNX_MODELS, *PY_MODELS, "recommend"]),
            "sha256": {str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, repository)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_model(root: Path, name: str, config: dict, files: dict[str, Path], shim: str | None) -> None:
    version = root / name / "1"
    version.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(render(config))
    for dest, src in files.items():
        if not src.exists():
            raise ArtifactError(f"{src} is missing: re-run `recserve export onnx`")
        shutil.copy(src, version / dest)
    if shim:
        (version / "model.py").write_text(
            f'"""Generated by `recserve export repository`; the code is in recserve/triton_models/{shim}.py."""\n'
            f"from recserve.triton_models.{shim} import TritonPythonModel  # noqa: F401\n")


def _write_index(dest: Path, onnx_dir: Path, opts: RepoOptions, queries: np.ndarray, faiss) -> dict:
    vectors = np.load(onnx_dir / "item_embeddings.npy")
    index, spec = build_index(vectors, opts.index)
    faiss.write_index(index, str(dest / "index.faiss"))
    recall = recall_vs_exact(index, vectors, queries, opts.recall_k)
    info = {"spec": describe(spec), "n_items": int(index.ntotal), "dim": int(vectors.shape[1]),
            "metric": "inner_product", "candidates": opts.candidates, "recall_k": min(opts.recall_k, len(vectors)),
            "recall_vs_exact": round(recall, 5), "queries": int(len(queries)),
            "item_tower_sha256": sha256_of(dest.parent.parent / "item_tower" / "1" / "model.onnx"),
            "device": "cpu (moved to a GPU at load time when one and GPU FAISS are present)"}
    (dest / "index.json").write_text(json.dumps(info, indent=2))
    return info


def _tensorrt_plan(tmp: Path, name: str, onnx_path: Path, meta: dict, opts: RepoOptions) -> Path:
    """Build a TensorRT engine for one model, profiles matched to its batcher, checked against ONNX Runtime."""
    from recserve.export.tensorrt import build_engine, verify_engine

    batch = CANDIDATE_LEVEL_BATCH if name == "ranker" else USER_LEVEL_BATCH
    row_dims = {t["name"]: ([] if t.get("reshape") is not None else t["dims"])
                for t in model_io(meta, opts.candidates)[name][0]}
    plan = tmp / f".{name}.plan"
    build_engine(onnx_path, plan, row_dims, batch["preferred"], batch["max_batch_size"], int8=True)
    fp32 = onnx_path.with_name(f"{name}.onnx")
    verify_engine(plan, fp32, name, meta, opts.candidates)
    return plan


def _int8_summary(artifacts: Path) -> dict | None:
    from recserve.export.quantize import int8_report

    report = int8_report(artifacts) or {}
    return {"settings": report.get("settings"), "gate": report.get("gate")}


def _int8_files(artifacts: Path) -> dict[str, Path]:
    files = {n: artifacts / "onnx" / f"{n}.int8.onnx" for n in ONNX_MODELS}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ArtifactError(f"INT8 models are missing ({', '.join(missing)}): run "
                            f"`recserve export onnx --artifacts {artifacts} --precision int8` first")
    return files


def _swap_into_place(tmp: Path, repository: Path) -> None:
    """Rename the finished build over the old repository; a crash leaves one complete repository."""
    old = None
    if repository.exists():
        old = repository.with_name(f".{repository.name}.old-{int(time.time() * 1000)}")
        repository.rename(old)
    tmp.rename(repository)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
