"""Write a Triton model repository from exported artifacts, every config generated from the serving spec.

Configs are data: dicts mirroring model_config.proto, parsed into `model_config_pb2.ModelConfig` and
rendered with protobuf's text format (never string templates). The repository is built in a temporary
directory next to the target and renamed into place, with a manifest of every file's sha256.

Flavors:
  embedded  the graphs run by ONNX Runtime inside python-backend models (the pip-installed tritonserver);
  native    the `ranker` and `item_tower` graphs on Triton's onnxruntime backend, or a TensorRT engine for the
            ranker (NGC container); the python steps (`retrieval`, `catalogue`) are the same in both.
The request path is retrieval -> ranker (`recserve/serving/spec.py`): an ensemble of the two models in the native
flavor; in the embedded flavor `recommend` runs both steps' code in one python model (`spec.FUSED`), since a
python-backend hop costs more than either step, and the two step models stay served for the pipeline mode.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import json_format, text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2

from recserve.errors import ArtifactError
from recserve.export import graphs
from recserve.export.index import KINDS as INDEX_KINDS
from recserve.export.index import (
    IndexSpec,
    auto_index,
    build_index,
    describe,
    equal_norm,
    pad_queries,
    recall_vs_exact,
)
from recserve.integrity import code_hashes, repository_hashes, sha256_of
from recserve.serving import spec
from recserve.sources import Blend, ViewSources, load_blend, load_view, save_sources

README = Path(__file__).resolve().parents[2] / "model_repository" / "README.md"
CHOOSE_QUERIES = 1000      # user queries `--index auto` chooses on and every index's recall is reported on
AUTO_TARGET_RECALL = 0.95  # `--index auto`: the fastest index with recall@recall_k >= this
SHIMS = {"retrieval": "retrieval:TritonPythonModel",
         "catalogue": "catalogue:TritonPythonModel", "ranker": "onnx_model:RankerStep",
         "item_tower": "onnx_model:OnnxStep"}


@dataclass
class RepoOptions:
    flavor: str = "embedded"          # embedded | native
    precision: str = "fp32"           # fp32 | int8 (issue: INT8 gate)
    candidates: int = 500             # K: candidates per user, retrieved and ranked
    k_max: int = 100                  # the most items one response carries
    index: IndexSpec = field(default_factory=IndexSpec)
    instances: int = 1
    # ONNX Runtime intra-op threads of the ranker. One: two non-spinning threads took 1.3 ms wall and 2.0 ms CPU
    # per user where one took 0.9 ms (ML-100K, K = 500); parallelism comes from instances and batching.
    ranker_threads: int = 1
    # Threads of the user-level steps (user tower, FAISS): a batch of users is a few small GEMMs.
    step_threads: int = 1
    # Embedded flavor: instances of the one-process `recommend` (spec.FUSED), one per core; 0: os.cpu_count()
    fused_instances: int = 0
    view: str = "serve"               # which interactions the tables know: serve (all), test, valid
    # Native flavor's `recommend`: "python" (the embedded model's code, which asks the native `ranker` model
    # through BLS: cold start, rules, exploration and fallbacks, 2 models on the path) or "ensemble" (retrieval ->
    # ranker, Triton's own scheduling, no request-time options)
    native_recommend: str = "python"
    tensorrt: bool = False            # set by write_repository when engines were built
    recall_k: int = 100
    # The index split into this many shards (index.S.faiss), searched as one faiss.IndexShards (a thread per shard)
    # and merged by score: the layout a catalogue too big for one machine spreads over retrieval nodes
    shards: int = 1

    def validate(self) -> None:
        if self.flavor not in ("embedded", "native"):
            raise ArtifactError(f"--flavor {self.flavor!r} is not known: choose embedded or native")
        if self.native_recommend not in ("python", "ensemble"):
            raise ArtifactError(f"--native-recommend {self.native_recommend!r} is not known: choose python or "
                                "ensemble")
        if self.precision not in ("fp32", "int8"):
            raise ArtifactError(f"--precision {self.precision!r} is not known: choose fp32 or int8")
        for name, value in (("candidates", self.candidates), ("k-max", self.k_max), ("instances", self.instances),
                            ("shards", self.shards)):
            if value < 1:
                raise ArtifactError(f"--{name} must be at least 1, got {value}")
        if self.view not in graphs.VIEWS:
            raise ArtifactError(f"view {self.view!r} is not known: choose {', '.join(graphs.VIEWS)}")
        if self.index.kind not in ("auto", *INDEX_KINDS):
            raise ArtifactError(f"--index {self.index.kind!r} is not known: choose auto, {', '.join(INDEX_KINDS)}")

    def sizes(self, meta: dict) -> dict[str, int]:
        """The spec's dimension symbols for these options and artifacts."""
        k = min(self.candidates, meta["n_items"])
        from recserve.sources import SRC_FEATURES

        return {"D": meta["dim"], "K": k, "KMAX": min(self.k_max, k), "G": meta["n_genres"], "S": len(SRC_FEATURES)}


def render(config: dict) -> str:
    """dict -> ModelConfig protobuf -> text format. ParseDict rejects any field the proto does not have."""
    return text_format.MessageToString(json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def render_proto(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _tensor(t: spec.Tensor, sizes: dict[str, int], squeeze: bool = False) -> dict:
    out: dict = {"name": t.name, "data_type": f"TYPE_{t.dtype.replace('BYTES', 'STRING')}",
                 "dims": spec.resolve(t.dims, sizes)}
    if squeeze:
        out["reshape"] = {"shape": []}   # [B, 1] on the wire, [B] in the graph
    if t.optional:
        out["optional"] = True
    return out


def model_config(name: str, sizes: dict[str, int], opts: RepoOptions, squeeze: tuple[str, ...] = (),
                 bounds: dict[str, str] | None = None) -> dict:
    """The config of one served model. `squeeze`: graph inputs of rank 1 fed from [B, 1] rows (native only)."""
    s = spec.step(name)
    batch = spec.BATCHING[s.level]
    native_graph = s.backend == "onnx" and opts.flavor == "native"
    cfg: dict = {"name": name, "max_batch_size": batch["max_batch_size"],
                 "input": [_tensor(t, sizes, native_graph and t.name in squeeze) for t in s.inputs],
                 "output": [_tensor(t, sizes) for t in s.outputs],
                 "instance_group": [{"count": opts.instances, "kind": "KIND_CPU"}]}
    if s.on_path:
        cfg["dynamic_batching"] = _dynamic_batching(batch)
    threads = opts.ranker_threads if name == "ranker" else opts.step_threads
    if native_graph and opts.tensorrt and name == "ranker":
        cfg.update(platform="tensorrt_plan", default_model_filename="model.plan")
        cfg["instance_group"] = [{"count": opts.instances, "kind": "KIND_GPU"}]
    elif native_graph:
        cfg.update(platform="onnxruntime_onnx", default_model_filename="model.onnx")
        cfg["parameters"] = {"intra_op_thread_count": {"string_value": str(threads)}}
    else:
        cfg["backend"] = "python"
        params = {"retrieval": {"k_max": str(sizes["KMAX"]), "intra_op_threads": str(opts.step_threads),
                                "omp_threads": str(opts.step_threads)},
                  "ranker": {"intra_op_threads": str(threads)},
                  "item_tower": {"intra_op_threads": str(threads)}}.get(name, {})
        params = {**params, **(bounds or {})}   # the index ranges a graph step checks each request against
        if params:
            cfg["parameters"] = {k: {"string_value": v} for k, v in params.items()}
    return cfg


# Past this, `recommend` cuts the ranker's run short and serves the retrieval order (a batch takes 1-10 ms here).
RANKER_TIMEOUT_MS = 250


def model_batch_size(name: str, flavor: str) -> int:
    """max_batch_size of a served model, as its config says (the front door bounds requests by it)."""
    if name == spec.ENSEMBLE:
        if flavor == "embedded":
            return spec.BATCHING[spec.FUSED.level]["max_batch_size"]
        return min(spec.BATCHING[s.level]["max_batch_size"] for s in spec.path())
    return spec.BATCHING[spec.step(name).level]["max_batch_size"]


def _dynamic_batching(batch: dict) -> dict:
    # no default_queue_policy: it degrades Triton's batcher (spec.py says what was measured); the front door sheds
    return {"max_queue_delay_microseconds": batch["delay_us"], "preferred_batch_size": batch["preferred"]}


def fused_config(opts: RepoOptions, sizes: dict[str, int]) -> dict:
    """`recommend` as one python model: the path's steps in one process (embedded), or retrieval here and the
    native `ranker` model through BLS (native, `native_recommend` "python")."""
    import os

    s = spec.FUSED
    batch = spec.BATCHING[s.level]
    return {"name": s.name, "backend": "python", "max_batch_size": batch["max_batch_size"],
            "input": [_tensor(t, sizes) for t in s.inputs], "output": [_tensor(t, sizes) for t in s.outputs],
            "instance_group": [{"count": opts.fused_instances or os.cpu_count() or 1, "kind": "KIND_CPU"}],
            "dynamic_batching": _dynamic_batching(batch),
            # No `response_cache`: Triton 2.51's cache stores a model's per-request error (k or hour out of range)
            # as an empty 200 answer and serves that to the next identical request (measured: README "Request-time
            # behaviours"); RecClient(cache_ttl=...) caches on the client instead.
            "parameters": {"threads": {"string_value": str(opts.step_threads)},
                           "ranker_timeout_ms": {"string_value": str(RANKER_TIMEOUT_MS)},
                           # native flavor: the ranker runs as its own model (onnxruntime / TensorRT backend), asked
                           # through BLS; embedded: in this process
                           **({"ranker_model": {"string_value": "ranker"}} if opts.flavor == "native" else {})}}


def ensemble_config(opts: RepoOptions, sizes: dict[str, int]) -> dict:
    """`recommend`: the path steps, each input wired to the request or the earlier output of the same name."""
    steps = [{"model_name": s.name, "model_version": -1, "input_map": dict(inputs),
              "output_map": {n: n for n in s.output_names}} for s, inputs in spec.wiring()]
    return {"name": spec.ENSEMBLE, "platform": "ensemble",
            # an ensemble may not batch more rows than its smallest member allows
            "max_batch_size": model_batch_size(spec.ENSEMBLE, "native"),
            "input": [_tensor(t, sizes) for t in spec.REQUEST], "output": [_tensor(t, sizes) for t in spec.RESPONSE],
            "ensemble_scheduling": {"step": steps}}


def _graph_files(artifacts: Path, opts: RepoOptions) -> dict[str, Path]:
    suffix = ".int8" if opts.precision == "int8" else ""
    files = {n: artifacts / "onnx" / f"{n}{suffix}.onnx" for n in ("user_tower", "item_tower", "ranker")}
    if opts.precision == "fp32":      # the ranker's serving arrangement (`export onnx` says why per precision)
        files["ranker"] = artifacts / "onnx" / "ranker.serving.onnx"
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        fix = " --precision int8" if opts.precision == "int8" else ""
        raise ArtifactError(f"{', '.join(missing)} missing: run `recserve export onnx --artifacts {artifacts}{fix}`")
    return files


def write_repository(artifacts: Path, repository: Path, opts: RepoOptions | None = None, version: int = 1) -> dict:
    """Build the whole repository in a temp dir beside `repository`, then swap it into place.

    Every model's files go to `MODEL/VERSION/`, and each config loads exactly that version (`version_policy
    specific`), with a copy of the config beside the files (`MODEL/VERSION/config.pbtxt`, what a rollback
    restores). `recserve.deploy` adds versions to a served repository this way."""
    opts = opts or RepoOptions()
    opts.validate()
    artifacts, repository = Path(artifacts), Path(repository)
    meta = graphs.onnx_meta(artifacts)
    sizes = opts.sizes(meta)
    opts.candidates = sizes["K"]
    files = _graph_files(artifacts, opts)
    tensorrt_note = _check_tensorrt(artifacts, opts)
    tables = graphs.serving_tables(artifacts, opts.view)

    repository.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repository.name}.tmp-", dir=repository.parent))
    try:
        def version_dir(name: str) -> Path:
            d = tmp / name / str(version)
            d.mkdir(parents=True)
            return d

        retrieval = version_dir("retrieval")
        graphs.save(graphs.user_graph(onnx.load(files["user_tower"]), tables), retrieval / "user_tower.onnx")
        np.savez(retrieval / "users.npz", user_ids=tables.user_ids)
        gate = ranker_gate(artifacts)
        inner = onnx.load(files["ranker"]) if gate["shipped"] else graphs.retrieval_order()
        view, blend = load_view(artifacts, opts.view), load_blend(artifacts)
        ranker = graphs.ranker_graph(inner, tables, sizes["K"], sizes["KMAX"], new=view.is_new)
        ranker_dir = version_dir("ranker")
        graphs.save(ranker, ranker_dir / "model.onnx")
        if opts.tensorrt:
            _tensorrt_plan(ranker_dir, sizes, tables)
        tower_dir = version_dir("item_tower")
        shutil.copy(files["item_tower"], tower_dir / "model.onnx")
        np.savez(retrieval / "seen.npz", indptr=tables.seen_indptr, items=tables.seen)
        save_sources(retrieval / "sources.npz", {"view": view})
        shutil.copy(artifacts / "blend.json", retrieval / "blend.json")
        items = Blend.item_matrix(tables.item_vec, view)
        np.save(retrieval / "blend_items.npy", items)
        queries = _user_queries(retrieval / "user_tower.onnx", blend, view)
        fetch_k = min(len(items), sizes["K"] + int(np.diff(tables.seen_indptr).max(initial=0)))
        index_info = _write_index(retrieval, items, opts, queries, fetch_k, version)
        np.savez(version_dir("catalogue") / "items.npz", item_ids=tables.item_ids, titles=tables.titles,
                 genres=tables.genres, year=tables.year, vectors=tables.item_vec)
        cold = _write_cold_start(retrieval, artifacts, opts.view, tables, files["user_tower"])
        _write_fallback(tmp / "fallback.json", cold, tables, sizes["KMAX"])
        shutil.copy(tmp / "fallback.json", tmp / "catalogue" / str(version) / "fallback.json")   # for a rollback
        squeeze = {"item_tower": ("item_idx", "item_year")}
        n_users, n_items = str(len(tables.user_ids)), str(len(tables.item_ids))
        bounds = {"ranker": {"n_users": n_users, "n_items": n_items, "k_max": str(sizes["KMAX"])},
                  "item_tower": {"n_items": n_items, "n_year_buckets": str(_year_buckets(files["item_tower"]))},
                  # the year range the rules' freshness is scaled by (recserve.rules.ItemTable), for clients
                  "catalogue": {"year_min": str(int(tables.year.min())) if len(tables.year) else "0",
                                "year_max": str(int(tables.year.max())) if len(tables.year) else "0"}}
        for s in spec.STEPS:
            _write_config(tmp, s.name, model_config(s.name, sizes, opts, squeeze.get(s.name, ()), bounds.get(s.name)),
                          shim=SHIMS[s.name] if (s.backend == "python" or opts.flavor == "embedded") else None,
                          version=version)
        version_dir(spec.ENSEMBLE)
        if opts.flavor == "embedded" or opts.native_recommend == "python":
            _write_config(tmp, spec.ENSEMBLE, fused_config(opts, sizes), shim="fused:TritonPythonModel",
                          version=version)
        else:
            _write_config(tmp, spec.ENSEMBLE, ensemble_config(opts, sizes), shim=None, version=version)
        if README.exists():
            shutil.copy(README, tmp / "README.md")
        manifest = {
            "format": 3, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_version": version, "fingerprint": meta["fingerprint"], "artifacts": str(artifacts.resolve()),
            "flavor": opts.flavor,
            "precision": opts.precision, "view": opts.view, "candidates": sizes["K"], "k_max": sizes["KMAX"],
            "path": [s.name for s in spec.path()], "index": index_info, "ranker": gate,
            "tensorrt": {"engines": opts.tensorrt, "note": tensorrt_note},
            "int8": _int8_summary(artifacts) if opts.precision == "int8" else None,
            "models": sorted([*(s.name for s in spec.STEPS), spec.ENSEMBLE]),
        }
        # every version's own manifest (`recserve deploy` adds versions; recserve/deploy.py)
        manifest["versions"] = {str(version): dict(manifest)}
        if opts.flavor == "embedded" or opts.native_recommend == "python":
            # the drift reference of the served path itself (LocalPipeline reads the manifest), before the hashes
            from recserve.serving.steps.fused import write_reference

            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            write_reference(tmp, version)
        manifest.update({
            "sha256": repository_hashes(tmp),
            "code_sha256": code_hashes(),     # what `recserve serve` verifies before starting (recserve/integrity.py)
        })
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, repository)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_fallback(path: Path, cold, tables: graphs.ServingTables, k_max: int) -> None:
    """The list a client serves when no server answers (`RecClient(fallback=...)`): popular and trending."""
    score = cold.count + cold.trending
    top = np.argsort(-score, kind="stable")[:k_max]
    path.write_text(json.dumps({"source": "fallback", "note": "popular and trending items, written by export",
                                "items": [{"item_id": int(tables.item_ids[i]), "score": float(score[i]),
                                           "title": str(tables.titles[i])} for i in top]}, indent=1))


def _write_cold_start(dest: Path, artifacts: Path, view: str, tables: graphs.ServingTables, user_tower: Path):
    """What `recommend` needs beyond the path: cold-start popularity (`recserve.coldstart`), the raw user tower
    (run on a request's history), and the items' genres, years and unit vectors for the rules."""
    from recserve.coldstart import fit_cold, save_cold
    from recserve.data.dataset import Dataset

    ds = Dataset.load(Path(artifacts) / "dataset.npz")
    known = ds.mask(*graphs.VIEWS[view])
    cold = fit_cold(ds.users[known], ds.items[known], ds.timestamps[known], ds.user_cats, ds.n_items)
    save_cold(dest / "cold.npz", cold)
    shutil.copy(user_tower, dest / "user_tower_raw.onnx")
    np.savez(dest / "items.npz", item_ids=tables.item_ids, genres=tables.genres, year=tables.year,
             vectors=tables.item_vec, proxy_user=np.array(_proxy_user(user_tower)),
             history_len=np.array(tables.history.shape[1]))
    return cold


def _proxy_user(user_tower: Path) -> int:
    """The user whose id embedding is nearest the mean of all: the id a user the model never saw borrows."""
    for init in onnx.load(user_tower).graph.initializer:
        if "user_emb" in init.name and len(init.dims) == 2:
            emb = numpy_helper.to_array(init).astype(np.float32)
            return int(np.argmin(np.linalg.norm(emb - emb.mean(0), axis=1)))
    return 0


def _year_buckets(item_tower: Path) -> int:
    """Rows of the item tower's year embedding (its `item_year` input indexes them)."""
    for init in onnx.load(item_tower).graph.initializer:
        if "year_emb" in init.name and len(init.dims) == 2:
            return int(init.dims[0])
    raise ArtifactError(f"{item_tower} has no year embedding table; re-export it with `recserve export onnx`")


def ranker_gate(artifacts: Path) -> dict:
    """`recserve train`'s ship-or-not verdict on the ranker (ARTIFACTS/ranker_gate.json); shipped when absent."""
    path = Path(artifacts) / "ranker_gate.json"
    return json.loads(path.read_text()) if path.exists() else {"shipped": True, "note": "no ranker_gate.json"}


def _write_config(root: Path, name: str, config: dict, shim: str | None, version: int = 1) -> None:
    config = {**config, "version_policy": {"specific": {"versions": [version]}}}
    text = render(config)
    (root / name / "config.pbtxt").write_text(text)
    (root / name / str(version) / "config.pbtxt").write_text(text)     # what `recserve rollback` restores
    if shim:
        module, cls = shim.split(":")
        (root / name / str(version) / "model.py").write_text(
            f'"""Generated by `recserve export repository`; the code is in recserve/serving/steps/{module}.py."""\n'
            "from recserve.serving.steps import gentle\n\n"
            f"TritonPythonModel = gentle({module!r}, {cls!r})\n")


def _user_queries(user_graph: Path, blend: Blend, view: ViewSources, limit: int = 2000) -> np.ndarray:
    """Real users' blend vectors, through the served user graph, to measure the index's recall with."""
    from recserve.serving.steps.base import ort_session

    users = np.random.default_rng(0).permutation(len(view.als_user))[:limit]
    user_vec = ort_session(user_graph, 0).run(["user_vec"], {"user_idx": users.reshape(-1, 1)})[0]
    return blend.query(user_vec, view.als_user[users], view.ctx_user[users])


def _write_index(dest: Path, items: np.ndarray, opts: RepoOptions, queries: np.ndarray, fetch_k: int = 0,
                 version: int = 1) -> dict:
    """The inner-product index over the items' blend vectors (`recserve.sources.Blend.item_matrix`).

    `--index auto` measures exact and approximate indexes on the first `CHOOSE_QUERIES` user queries (held out: users,
    never items) and builds the fastest with recall@recall_k >= `AUTO_TARGET_RECALL` (`recserve.export.index.
    auto_index`; exact Flat below `recserve.bench_index.EXACT_BELOW` items). `recall_vs_exact` is recall@recall_k of
    the index as served on those same queries, for every kind; approximate kinds also get their recall at `fetch_k`
    (K + the most items one user has seen: the largest search the retrieval step makes)."""
    import faiss

    held = queries[:CHOOSE_QUERIES]
    # approximate kinds search the items made equal in norm (one more column; queries get a 0): the same inner
    # products, on a sphere (`equal_norm`); exact search keeps the plain vectors, bit for bit what evaluation ranks
    sphere, sphere_q = equal_norm(items), pad_queries(held)
    chosen = None
    if opts.index.kind == "auto":
        index, resolved, chosen = auto_index(sphere, sphere_q, k=opts.recall_k, target_recall=AUTO_TARGET_RECALL,
                                             fetch_k=fetch_k, threads=opts.step_threads or None)
        if resolved.kind == "flat":
            index, resolved = build_index(items, resolved, fetch_k=fetch_k)
    else:
        index, resolved = build_index(items if opts.index.kind == "flat" else sphere, opts.index, fetch_k=fetch_k)
    augmented = resolved.kind != "flat"
    vecs, qs = (sphere, sphere_q) if augmented else (items, held)
    if opts.shards > 1:
        from recserve.bench_index import shard_index

        if opts.shards > len(items):
            raise ArtifactError(f"--shards {opts.shards}: the catalogue has only {len(items)} items")
        index = shard_index(vecs, opts.shards, {"kind": resolved.kind, "params": resolved.params()})
        for s in range(opts.shards):
            faiss.write_index(index.at(s), str(dest / f"index.{s}.faiss"))
    else:
        faiss.write_index(index, str(dest / "index.faiss"))
    recall = recall_vs_exact(index, vecs, qs, opts.recall_k)
    info = {"spec": describe(resolved), "n_items": int(index.ntotal), "dim": int(items.shape[1]),
            "metric": "inner_product", "equal_norm": augmented, "candidates": opts.candidates,
            "recall_k": min(opts.recall_k, len(items)), "recall_vs_exact": round(recall, 5),
            "queries": int(len(held)), "fetch_k": int(fetch_k), "shards": opts.shards}
    if resolved.kind != "flat" and fetch_k:
        info["recall_at_fetch_k"] = round(recall_vs_exact(index, vecs, qs, fetch_k), 5)
    if chosen is not None:
        info["auto"] = chosen
    info.update({"item_tower_sha256": sha256_of(dest.parent.parent / "item_tower" / str(version) / "model.onnx"),
                 "device": "cpu (moved to a GPU at load time when one and GPU FAISS are present)"})
    (dest / "index.json").write_text(json.dumps(info, indent=2))
    return info


def _check_tensorrt(artifacts: Path, opts: RepoOptions) -> str | None:
    if not (opts.flavor == "native" and opts.precision == "int8"):
        return None
    from recserve.export.quantize import int8_report
    from recserve.export.tensorrt import tensorrt_status

    opts.tensorrt, note = tensorrt_status()
    target = ((int8_report(artifacts) or {}).get("settings") or {}).get("target")
    if opts.tensorrt and target != "tensorrt":
        raise ArtifactError("the INT8 models were quantized for ONNX Runtime (uint8 activations), which "
                            "TensorRT's parser rejects: run `recserve export onnx --precision int8 "
                            "--int8-target tensorrt` first")
    return note


def _tensorrt_plan(version: Path, sizes: dict[str, int], tables: graphs.ServingTables) -> None:
    """A TensorRT engine of the served ranker graph, profiles matched to its batcher, checked against ORT."""
    from recserve.export.tensorrt import build_engine, verify_engine

    s = spec.step("ranker")
    batch = spec.BATCHING[s.level]
    row_dims = {t.name: spec.resolve(t.dims, sizes) for t in s.inputs}
    build_engine(version / "model.onnx", version / "model.plan", row_dims, batch["preferred"], batch["max_batch_size"])
    verify_engine(version / "model.plan", version / "model.onnx", _engine_feed(sizes, tables))


def _engine_feed(sizes: dict[str, int], t: graphs.ServingTables, users: int = 8) -> dict[str, np.ndarray]:
    """Real rows for the engine check: the first users, their best K items by the tower score."""
    from recserve.ranking import Seen, candidates

    rng = np.random.default_rng(11)
    u = np.arange(min(users, len(t.user_ids)))
    vec = t.item_vec[rng.integers(0, len(t.item_vec), len(u))]
    cand = candidates(vec @ t.item_vec.T, u, Seen(t.seen_indptr, t.seen), sizes["K"])
    col = lambda a, dtype=np.int64: np.asarray(a, dtype).reshape(-1, 1)  # noqa: E731
    return {"user_idx": col(u), "user_vec": vec.astype(np.float32), "context_hour": col(rng.integers(0, 24, len(u))),
            "context_weekday": col(rng.integers(0, 7, len(u))), "cand_idx": cand,
            "cand_src": rng.standard_normal((*cand.shape, sizes["S"])).astype(np.float32),
            "k": col(np.full(len(u), sizes["KMAX"]), np.int32)}


def _int8_summary(artifacts: Path) -> dict | None:
    from recserve.export.quantize import int8_report

    report = int8_report(artifacts) or {}
    return {"settings": report.get("settings"), "gate": report.get("gate")}


def _swap_into_place(tmp: Path, repository: Path) -> None:
    """Rename the finished build over the old repository; a crash leaves one complete repository."""
    old = None
    if repository.exists():
        old = repository.with_name(f".{repository.name}.old-{int(time.time() * 1000)}")
        repository.rename(old)
    tmp.rename(repository)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
