"""The `recserve` command: one subcommand per pipeline stage.

    recserve data synth|fetch      recserve train      recserve evaluate
    recserve export onnx|repository                    recserve serve
    recserve recommend             recserve demo       recserve bench
    recserve deploy                recserve rollback   recserve ab start|stop|report
    recserve update                recserve items add
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer

from recserve.errors import ArtifactError, RecserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrieve-then-rank recommendations, from interaction logs to NVIDIA Triton serving.")
data_app = typer.Typer(no_args_is_help=True, help="Get data: synthesise it or download MovieLens.")
export_app = typer.Typer(no_args_is_help=True, help="Export trained models: ONNX, then a Triton model repository.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print measured figures.")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
items_app = typer.Typer(no_args_is_help=True, help="Change the served catalogue: add new items without retraining.")
app.add_typer(bench_app, name="bench")
app.add_typer(items_app, name="items")


def clean_errors(fn):
    """Expected failures become one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RecserveError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def load_data(data: Path):
    from recserve.data import load_movielens

    return load_movielens(data)


@data_app.command("synth")
@clean_errors
def data_synth(
    out: Path = typer.Option(..., "--out", help="Directory to write ML-1M format files into."),
    users: int = typer.Option(3000, help="Number of users."),
    items: int = typer.Option(2000, help="Number of items."),
    interactions: int = typer.Option(150_000, help="Approximate number of interactions."),
    categories: int = typer.Option(18, help="Number of item categories (genres)."),
    seed: int = typer.Option(0, help="Random seed: same seed, same data."),
    drift: float = typer.Option(0.0, help="Pull of each user towards items released in their era (0: times "
                                "carry no signal; 8: strong). Needs users x items <= 33.5M."),
):
    """Synthesise interactions with planted user/item structure, in MovieLens-1M format."""
    from recserve.data import generate, write_ml1m

    raw = generate(users, items, interactions, n_categories=categories, seed=seed, drift=drift)
    write_ml1m(raw, out)
    typer.echo(f"wrote {len(raw.ratings)} interactions, {users} users, {items} items to {out}")


@data_app.command("fetch")
@clean_errors
def data_fetch(
    name: str = typer.Argument(..., help="ml-100k, ml-1m, ml-25m or ml-latest-small"),
    cache: Path | None = typer.Option(None, help="Cache directory (default ~/.cache/recserve/datasets)."),
):
    """Download an official MovieLens zip from GroupLens (checksum verified) and print its directory."""
    from recserve.data import fetch

    typer.echo(str(fetch(name, cache)))


@app.command()
@clean_errors
def train(
    data: Path = typer.Option(..., "--data", help="Directory with MovieLens files (100K, 1M or CSV family)."),
    out: Path = typer.Option(..., "--out", help="Artifacts directory to write checkpoints into."),
    seed: int = typer.Option(0, help="Random seed."),
    tower_epochs: int = typer.Option(30, help="Maximum two-tower epochs (early stopping on validation)."),
    mf_epochs: int = typer.Option(40, help="Maximum MF epochs (early stopping on validation)."),
    ranker_epochs: int = typer.Option(8, help="Maximum ranker epochs (early stopping on held-out users)."),
    budget_minutes: float = typer.Option(
        2.0, "--budget-minutes", min=0.0,     # recserve.train.DEFAULT_BUDGET_MINUTES (torch loads lazily)
        help="Time for the searches on validation: the baselines' settings (which the ALS and neighbour sources "
             "reuse; 3/4 of it) and the blend weights (1/4). 0: default settings, towers-only blend."),
    distill: bool = typer.Option(False, "--distill", help="Also train a large teacher and a distilled student ranker."),
    promote_student: bool = typer.Option(False, "--promote-student",
                                         help="With --distill: ship the student (ranker.pt) if it passes its gate."),
    model_minutes: float = typer.Option(
        0.0, "--model-minutes", min=0.0,
        help="Wall-clock cap on each model's epochs (MF, each two-tower setting, the ranker): no epoch starts "
             "after it, the best so far is kept. 0: epochs and early stopping only. For million-item sets."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    resume: Path | None = typer.Option(None, "--resume", help="Artifacts of an earlier run: the towers start from "
                                       "its weights (ids carried over by raw id) and keep its settings."),
    titles: bool = typer.Option(False, "--titles", help="The item tower always reads its title's words (by "
                                "default they are tried once and kept only on a 1% validation gain)."),
    titles_trial: bool = typer.Option(True, "--titles-trial/--no-titles-trial",
                                      help="Try title words once (one more towers training) unless --titles."),
):
    """Train popularity, BPR-MF, the two-tower retrieval model and the DCN-v2 ranker."""
    from recserve.train import TrainConfig, search_budget, train_all

    if resume is not None and not (resume / "two_tower.pt").is_file():
        raise ArtifactError(f"--resume {resume}: no two_tower.pt there; give the --out of an earlier `recserve train`")
    cfg = TrainConfig(seed=seed, tower_epochs=tower_epochs, mf_epochs=mf_epochs, ranker_epochs=ranker_epochs,
                      resume=str(resume.resolve()) if resume else "", titles=titles, titles_trial=titles_trial,
                      model_budget=60.0 * model_minutes,
                      **search_budget(budget_minutes))
    train_all(load_data(data), out, cfg, progress=not quiet)
    if distill:
        from recserve.distill import distill as run_distill
        from recserve.distill import format_distill

        typer.echo(format_distill(run_distill(out, cfg, progress=not quiet, promote=promote_student)))


@app.command("distill")
@clean_errors
def distill_cmd(
    artifacts: Path = typer.Option(..., "--artifacts", help="Directory `recserve train` wrote."),
    alpha: float = typer.Option(0.5, help="Weight of the labels' cross-entropy (1: no distillation)."),
    temperature: float = typer.Option(1.0, help="Distillation temperature."),
    promote_student: bool = typer.Option(False, "--promote-student",
                                         help="Copy the student over ranker.pt if it passes its gate."),
    latency_runs: int = typer.Option(200, help="Timed requests per model and setting."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Teacher/student rankers on already-trained artifacts: quality, latency, and whether to ship the student."""
    from recserve.distill import distill, format_distill

    typer.echo(format_distill(distill(artifacts, alpha=alpha, temperature=temperature, progress=not quiet,
                                      promote=promote_student, latency_runs=latency_runs)))


@app.command()
@clean_errors
def evaluate(artifacts: Path = typer.Option(..., "--artifacts", help="Directory `recserve train` wrote.")):
    """Full-ranking evaluation on the temporal test split; writes ARTIFACTS/metrics.json."""
    from recserve.evaluate import evaluate_artifacts, format_table

    result = evaluate_artifacts(artifacts)
    d = result["protocol"]["data"]
    typer.echo(f"{d['source']}: {d['test_users']} test users, {d['items']} items, full ranking, "
               f"train+validation items excluded")
    typer.echo(format_table(result["models"], result["protocol"]["test_time_data"], result["served"]))


@export_app.command("onnx")
@clean_errors
def export_onnx_cmd(
    artifacts: Path = typer.Option(..., "--artifacts", help="Directory `recserve train` wrote."),
    precision: str = typer.Option("fp32", help="fp32, or int8: also write calibrated QDQ INT8 models (gated)."),
    calibration_rows: int = typer.Option(2000, help="INT8: real training rows per model to calibrate on."),
    int8_target: str = typer.Option("cpu", help="INT8: cpu (ONNX Runtime) or tensorrt (symmetric, for engines)."),
    seed: int = typer.Option(0, help="INT8: seed that draws the calibration rows."),
):
    """Export user tower, item tower and ranker to ONNX (checked against PyTorch) plus serving tables."""
    from recserve.export.onnx import export_onnx

    if precision not in ("fp32", "int8"):
        raise RecserveError(f"--precision {precision!r} is not known: choose fp32 or int8")
    report = export_onnx(artifacts)
    for name, m in report["models"].items():
        typer.echo(f"{name}: {artifacts}/onnx/{m['file']}  opset {report['opset']}  "
                   f"max rel. error vs PyTorch {m['max_rel_error']:.1e}")
    if precision == "int8":
        from recserve.export.quantize import quantize_artifacts

        q = quantize_artifacts(artifacts, calibration_rows=calibration_rows, seed=seed, target=int8_target)
        for name, m in q["models"].items():
            typer.echo(f"{name}: {artifacts}/onnx/{m['file']}  INT8 QDQ ({m['calibration_rows']} calibration rows)")
        g = q["gate"]
        typer.echo(f"INT8 gate passed on the test split: ndcg@10 {g['rel_change']['ndcg@10']:+.2%}, "
                   f"recall@50 {g['rel_change']['recall@50']:+.2%} vs FP32 (limit ±1%), "
                   f"top-100 retrieval overlap {g['top100_overlap']:.3f} (limit 0.95)")


@bench_app.command("int8")
@clean_errors
def bench_int8_cmd(
    artifacts: Path = typer.Option(..., "--artifacts", help="Artifacts with onnx/*.onnx and onnx/*.int8.onnx."),
    candidates: int = typer.Option(500, help="Ranker candidates per request."),
    repeats: int = typer.Option(300, help="Timed runs per setting."),
):
    """ONNX Runtime FP32 vs INT8 latency: ranker at K candidates, towers at batch 256; 1 thread and all threads."""
    from recserve.bench import bench_int8, format_bench

    typer.echo(format_bench(bench_int8(artifacts, candidates=candidates, repeats=repeats)))


@bench_app.command("index")
@clean_errors
def bench_index_cmd(
    items: int | None = typer.Option(None, help="Synthetic catalogue size (default 200000)."),
    dim: int = typer.Option(64, help="Synthetic vector dimension."),
    vectors: Path | None = typer.Option(None, help="Item vectors .npy instead of synthetic ones."),
    queries: Path | None = typer.Option(None, help="Held-out user vectors .npy, with --vectors."),
    artifacts: Path | None = typer.Option(None, help="A trained, ONNX-exported model: its blend item vectors, "
                                                     "its users' blend vectors as queries."),
    n_queries: int = typer.Option(2000, help="Queries measured (exact truth on all of them)."),
    threads: int | None = typer.Option(None, help="FAISS OpenMP threads, every kind (default: all cores)."),
    target_recall: float = typer.Option(0.95, help="The choice: the fastest run with recall@k at least this."),
    k: int = typer.Option(100, help="Results per query; recall@k against exact Flat."),
    kinds: str = typer.Option("flat,ivf,ivfpq,hnsw", help="Comma-separated index kinds to measure."),
    batch: int = typer.Option(64, help="Queries per search call (0: all at once)."),
    budget_s: float | None = typer.Option(None, help="Start no build or sweep point after this many seconds."),
    repeats: int = typer.Option(3, help="Timed passes per run, the best counts."),
    min_time_s: float = typer.Option(0.5, help="Keep timing passes for at least this long."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the whole result as JSON here."),
    png_path: Path | None = typer.Option(None, "--png", help="Plot recall against QPS here."),
    seed: int = typer.Option(0, help="Seed of the synthetic vectors, the held-out queries and IVF training."),
):
    """FAISS Flat, IVF-Flat, IVF-PQ and HNSW: QPS, recall@k, memory, build time; the fastest at the target recall."""
    from recserve import bench_index as bi

    chosen_kinds = tuple(x.strip() for x in kinds.split(",") if x.strip())
    bad = [x for x in chosen_kinds if x not in bi.KINDS]
    if bad:
        raise RecserveError(f"--kinds {','.join(bad)} not known: choose from {','.join(bi.KINDS)}")
    if queries is not None and vectors is None:
        raise RecserveError("--queries needs --vectors (the items they are searched in)")
    if artifacts is not None and (vectors is not None or items is not None):
        raise RecserveError("--artifacts brings its own vectors: drop --vectors / --items")
    for path in (vectors, queries):
        if path is not None and not path.is_file():
            raise RecserveError(f"{path} does not exist")
    # run_bench prints the vectors' source, the table (one line per run) and the `chosen:` line
    bi.run_bench(items=items, dim=dim, vectors=vectors, queries=queries, artifacts=artifacts, n_queries=n_queries,
                 threads=threads, target_recall=target_recall, k=k, seed=seed, json_path=json_path, png_path=png_path,
                 kinds=chosen_kinds, batch=batch, budget_s=budget_s, repeats=repeats, min_time_s=min_time_s,
                 log=typer.echo)


@app.command()
@clean_errors
def serve(
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to accept remote clients)."),
    http_port: int = typer.Option(8000, help="HTTP port."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port."),
    log_verbose: int = typer.Option(0, help="Triton --log-verbose level."),
    no_verify: bool = typer.Option(False, "--no-verify",
                                   help="Skip the manifest's sha256 check of every file (development only)."),
    no_front_door: bool = typer.Option(False, "--no-front-door",
                                       help="Expose Triton's own HTTP port, without the nginx front door (unsafe)."),
    drain_timeout: float = typer.Option(5.0, help="Seconds a stop (SIGTERM, Ctrl-C) waits for requests in flight."),
    access_log: Path | None = typer.Option(None, help="Front door access log: status, seconds, upstream s, path."),
    max_restarts: int = typer.Option(3, min=0, help="Times tritonserver is started again after it stopped by itself, "
                                                    "within 10 minutes; past that `serve` exits with the cause."),
):
    """Start the real tritonserver on a model repository, behind the front door; SIGTERM or Ctrl-C drains and stops."""
    from recserve.server import serve as run_server

    sys.exit(run_server(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        host=host, log_verbose=log_verbose, verify=not no_verify,
                        front_door=False if no_front_door else None, drain_timeout=drain_timeout,
                        access_log=access_log, max_restarts=max_restarts))


from recserve.client.cli import recommend_command  # noqa: E402

app.command("recommend", help="Ask a running server for top-k recommendations for one user.")(recommend_command)


__all__ = ["app"]


@export_app.command("repository")
@clean_errors
def export_repository_cmd(
    artifacts: Path = typer.Option(..., "--artifacts", help="Directory `recserve train` and `export onnx` wrote."),
    repository: Path = typer.Option(Path("model_repository"), "--repository", help="Where to write it."),
    flavor: str = typer.Option("embedded", help="embedded (pip tritonserver) or native (NGC container)."),
    native_recommend: str = typer.Option("python", "--native-recommend",
                                         help="native flavor's recommend: python (asks the native ranker through "
                                              "BLS; cold start, rules, exploration, fallbacks) or ensemble (no "
                                              "request-time options)."),
    precision: str = typer.Option("fp32", help="fp32 or int8 (int8 needs `export onnx --precision int8`)."),
    candidates: int = typer.Option(500, help="K: candidates retrieved per user and ranked."),
    k_max: int = typer.Option(100, "--k-max", help="The most items one response may carry (requests ask 1..k-max)."),
    index: str = typer.Option("auto", help="auto (the fastest index with recall@100 >= 0.95 against exact, measured "
                                           "on the real items and user queries; exact Flat below 20k items), flat, "
                                           "ivf, ivfpq or hnsw."),
    nlist: int = typer.Option(0, help="IVF cells (0: 4*sqrt(items))."),
    nprobe: int = typer.Option(0, help="IVF cells searched per query (0: nlist/16, at least 8)."),
    ef_search: int = typer.Option(0, "--ef-search", help="HNSW candidate list per query (0: 1.5 x the largest "
                                                         "search, K + most items a user has seen; never below it)."),
    instances: int = typer.Option(1, help="Model instances per model."),
    ranker_threads: int = typer.Option(2, help="ONNX Runtime threads of the ranker instance (0: all cores)."),
    threads: int = typer.Option(1, help="Threads of the user and retrieval steps (user tower, FAISS)."),
    shards: int = typer.Option(1, help="Split the index into this many shards, searched in parallel and merged "
                                       "(README \"Scale\")."),
):
    """Write a Triton model repository (configs via protobuf, FAISS index, manifest), atomically."""
    from recserve.export.index import IndexSpec
    from recserve.serving.repository import RepoOptions, write_repository

    m = write_repository(artifacts, repository, RepoOptions(
        flavor=flavor, native_recommend=native_recommend, precision=precision, candidates=candidates, k_max=k_max,
        index=IndexSpec(index, nlist, nprobe, efSearch=ef_search), instances=instances,
        ranker_threads=ranker_threads, step_threads=threads, shards=shards))
    i = m["index"]
    if m["tensorrt"]["note"] and not m["tensorrt"]["engines"]:
        typer.echo(m["tensorrt"]["note"])
    typer.echo(f"wrote {repository} ({m['flavor']}, {m['precision']}): {' -> '.join(m['path'])}, "
               f"K={m['candidates']}, k <= {m['k_max']}, index {i['spec']['kind']} "
               f"recall@{i['recall_k']} vs exact {i['recall_vs_exact']:.4f}")
    if not m.get("ranker", {}).get("shipped", True):
        typer.echo("the ranker is not shipped (its gate on validation preferred the retrieval order): the ranker "
                   "step keeps the retrieval order"
                   + ("; with INT8 only the user tower is quantised, which measured slower than FP32 on ML-100K "
                      "(README, Serving)" if m["precision"] == "int8" else ""))
    if i.get("auto"):
        a = i["auto"]
        rk = f"recall@{a['k']}"
        params = " ".join(f"{name}={value}" for name, value in a["params"].items()) or "-"
        typer.echo(f"index auto: {a['kind']} {params}, {a['qps']:,.0f} QPS ({a['speedup_vs_exact']}x exact, "
                   f"{a['threads']} threads), {rk} {a[rk]:.4f}: {a['reason']}")


@app.command()
@clean_errors
def deploy(
    artifacts: Path = typer.Option(..., "--artifacts", help="Directory `recserve train` and `export onnx` wrote."),
    repository: Path = typer.Option(Path("model_repository"), "--repository", help="The served repository."),
    precision: str | None = typer.Option(None, help="fp32 or int8; default: the live version's."),
    index: str = typer.Option("auto", help="auto, flat, ivf, ivfpq or hnsw (as `export repository`)."),
    keep: int = typer.Option(3, min=2, help="Versions kept in the repository (the live one and earlier ones)."),
):
    """Add the artifacts as the repository's next model version and make it live; a running server switches to
    it without failing a request. Flavor, K and k-max stay the live version's."""
    from recserve.deploy import deploy as run_deploy

    m = run_deploy(artifacts, repository, _live_options(repository, precision, index), keep=keep)
    typer.echo(f"{repository}: version {m['model_version']} is live ({m['precision']}, index "
               f"{m['index']['spec']['kind']}); kept versions {sorted(int(v) for v in m['versions'])}; a running "
               "`recserve serve` switches to it within a second")


def _live_options(repository: Path, precision: str | None, index: str):
    """Options of a next version: flavor, K and k-max as the live version's; precision too unless given."""
    from recserve.deploy import read_manifest
    from recserve.export.index import IndexSpec
    from recserve.serving.repository import RepoOptions

    live = read_manifest(repository) if (repository / "manifest.json").exists() else {}
    return RepoOptions(flavor=live.get("flavor", "embedded"), precision=precision or live.get("precision", "fp32"),
                       candidates=int(live.get("candidates", 500)), k_max=int(live.get("k_max", 100)),
                       index=IndexSpec(index), ranker_threads=2)


@items_app.command("add")
@clean_errors
def items_add_cmd(
    repository: Path = typer.Option(..., "--repository", help="The served repository (a running server switches)."),
    items: Path = typer.Option(..., "--items", help="CSV with a header: item_id,title[,genres][,year]; genres "
                                                    "separated by |, as the data set names them."),
    artifacts: Path | None = typer.Option(None, "--artifacts", help="The live version's artifacts (default: the "
                                                                    "directory its manifest names)."),
    out: Path | None = typer.Option(None, "--out", help="Where the new artifacts go (default: ARTIFACTS-items-vN)."),
    precision: str | None = typer.Option(None, help="fp32 or int8; default: the live version's."),
    index: str = typer.Option("auto", help="auto, flat, ivf, ivfpq or hnsw (as `export repository`)."),
):
    """Add new items to a served catalogue without retraining: the item tower embeds them from their content
    (genres, year), and they join the index in a new version that a running server switches to at once."""
    from recserve.items import items_add

    r = items_add(repository, items, artifacts, out, _live_options(repository, precision, index))
    typer.echo(f"added {r['added']} items ({r['items_before']} -> {r['items']}) into {r['artifacts']}; "
               f"{repository}: version {r['model_version']} ({r['precision']}) is live; a running `recserve serve` "
               "switches to it within a second")


@app.command()
@clean_errors
def rollback(
    repository: Path = typer.Option(Path("model_repository"), "--repository", help="The served repository."),
    to: int | None = typer.Option(None, help="The version to make live; default: the newest one before the live."),
):
    """Make an earlier model version live again; a running server switches back to it."""
    from recserve.deploy import rollback as run_rollback

    m = run_rollback(repository, to)
    typer.echo(f"{repository}: version {m['model_version']} is live again (was {m['previous_version']})")


@app.command()
@clean_errors
def update(
    artifacts: Path = typer.Option(..., "--artifacts", help="Directory `recserve train` wrote (updated in place)."),
    events: Path = typer.Option(..., "--events", help="The event log RecClient(event_log=...) writes."),
):
    """Fold the event log's new clicks into the artifacts' histories, seen lists and popularity, without
    retraining; `recserve deploy --artifacts A` then serves them."""
    from recserve.update import update as run_update

    c = run_update(artifacts, events)
    typer.echo(f"{artifacts}: folded {c['folded']:,} of {c['clicks']:,} clicks ({c['users']:,} users); skipped "
               f"{c['already_folded']:,} already folded, {c['duplicate']:,} duplicates, {c['unknown_user']:,} of "
               f"unknown users, {c['unknown_item']:,} of unknown items. Serve them: recserve deploy --artifacts "
               f"{artifacts}")


ab_app = typer.Typer(help="A/B splits between two model versions: start, stop, report.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")


@ab_app.command("start")
@clean_errors
def ab_start(
    repository: Path = typer.Option(Path("model_repository"), "--repository", help="The served repository."),
    b: int = typer.Option(..., "--b", help="The version arm b serves (arm a is the live version)."),
    share: float = typer.Option(0.1, help="The part of users in arm b, 0..1."),
    salt: str | None = typer.Option(None, help="Salt of the user hash (a new one reshuffles users); default: new."),
):
    """Serve version B of `recommend` to SHARE of the users (by a salted hash of the user id), the live one to the
    rest; a running server loads B beside it, and each answer names its arm (header `recserve-arm`)."""
    from recserve.ab import start

    split = start(repository, b, share, salt)
    typer.echo(f"{repository}: A/B on {split['model']}: arm a = version {split['a']}, arm b = version {split['b']} "
               f"for {split['share']:.0%} of users (salt {split['salt']})")


@ab_app.command("stop")
@clean_errors
def ab_stop(repository: Path = typer.Option(Path("model_repository"), "--repository", help="The served repository.")):
    """End the split: the live version serves every user."""
    from recserve.ab import stop

    split = stop(repository)
    typer.echo(f"{repository}: A/B ended; version {split['a']} serves every user")


@ab_app.command("report")
@clean_errors
def ab_report(
    events: Path = typer.Option(..., "--events", help="The event log RecClient(event_log=...) writes."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Click-through and rank-weighted reward per version (arm): 95% intervals (a bootstrap over users for the
    differences) and a two-proportion z-test."""
    import json as json_

    from recserve.ab import format_report, report

    r = report(events)
    typer.echo(json_.dumps(r, indent=2) if as_json else format_report(r))


@app.command()
@clean_errors
def demo(
    work: Path = typer.Option(Path("work"), help="Working directory for data and artifacts."),
    data: Path | None = typer.Option(None, help="MovieLens directory to use instead of synthetic data."),
    repository: Path = typer.Option(Path("model_repository"), help="Where to write the Triton repository."),
    http_port: int = typer.Option(8000, help="HTTP port."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Metrics port."),
    users: int = typer.Option(3, help="How many users to recommend for."),
):
    """The whole job: data -> train -> evaluate -> ONNX -> repository -> Triton -> recommendations."""
    from recserve.demo import run_demo

    run_demo(work, data, repository, http_port, grpc_port, metrics_port, n_users=users)
