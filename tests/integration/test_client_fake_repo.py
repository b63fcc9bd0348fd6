"""RecClient against a real tritonserver serving a FAKE repository generated from the serving spec.

Every config is rendered by `recserve.serving.repository` (`model_config`, `ensemble_config`, `render`: the
embedded flavor, every model a python-backend model) from `recserve/serving/spec.py`, so the wiring, the
tensor names, dims and dtypes, the batching and the `k_max` parameter are the ones a real export writes.
Only the model.py files are fakes: tiny python-backend models over hard-coded tables (3 users with raw ids
11, 12, 13; 10 items with raw ids 100..109 titled "item-100"...; D=4, K=5, KMAX=5, G=2) that read and write
exactly the tensor names of `spec.step(name)`. `retrieval` returns the K-1 best unseen items and one -1
(padding); `ranker` scores them with a numpy formula and answers KMAX raw ids best first, -1 past k. The test
computes the expected answer from the same tables and formulas, so it proves the client (both modes, both
protocols, titles, CLI) without trained artifacts.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from recserve.client import RecClient
from recserve.client.cli import recommend_command
from recserve.errors import ClientError, ServerError, UnknownUserError
from recserve.server import TritonServer, find_tritonserver, free_port
from recserve.serving import spec

pytestmark = pytest.mark.integration

try:
    find_tritonserver()
except ServerError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"no tritonserver binary: {exc}", allow_module_level=True)

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
# repository.py imports tritonclient's model_config_pb2: after the skip guards.
from recserve.serving.repository import RepoOptions, ensemble_config, model_config, render  # noqa: E402

PROTOCOLS = ("grpc", "http")
MODES = ("ensemble", "pipeline")
SIZES = {"D": 4, "K": 5, "KMAX": 5, "G": 2, "S": 3}
K, KMAX = SIZES["K"], SIZES["KMAX"]
OPTS = RepoOptions(flavor="embedded", candidates=K, k_max=KMAX)

# The tables and formulas: pasted into every fake model.py, and exec'd by the test for the expected answer.
TABLES_PY = textwrap.dedent(
    """\
    import numpy as np

    from recserve.ranking import PAD_ID, PAD_SCORE

    D, K, KMAX, G, S = 4, 5, 5, 2, 3
    USER_IDS = np.array([11, 12, 13], dtype=np.int64)                             # raw ids, sorted
    ITEM_IDS = np.arange(100, 110, dtype=np.int64)                                # raw ids, sorted
    TITLES = [f"item-{i}" for i in ITEM_IDS]
    SEEN = [{0, 1}, {3}, {8, 9}]                                                   # item indices per user
    _rng = np.random.default_rng(7)
    USER_VECS = _rng.normal(size=(len(USER_IDS), D)).astype(np.float32)
    ITEM_VECS = _rng.normal(size=(len(ITEM_IDS), D)).astype(np.float32)
    ITEM_GENRES = (_rng.random(size=(len(ITEM_IDS), G)) > 0.5).astype(np.float32)
    ITEM_POP = np.linspace(0.0, 0.6, len(ITEM_IDS), dtype=np.float32)
    USER_BIAS = np.array([0.0, 1.0, -1.0], dtype=np.float32)


    class RequestError(ValueError):
        pass


    def user_vec(user_idx):
        # (B,) -> (B, D), unit length
        vec = USER_VECS[user_idx]
        return (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)


    def candidates(user_idx, vec):
        # (B,), (B, D) -> (B, K): the K-1 best items the user has not seen, then one PAD_ID (FAISS's padding)
        rows = []
        for u, scores in zip(user_idx, vec @ ITEM_VECS.T):
            unseen = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in SEEN[int(u)]]
            rows.append(unseen[: K - 1] + [PAD_ID])
        return np.array(rows, dtype=np.int64)


    def source_scores(cand):
        # (B, K) -> (B, K, S): what retrieval hands the ranker per candidate (0 for padding)
        real = (cand >= 0)[..., None]
        pop = ITEM_POP[np.where(cand >= 0, cand, 0)][..., None]
        return np.where(real, np.concatenate([pop, 2 * pop, -pop], axis=-1), 0.0).astype(np.float32)


    def rank(user_idx, vec, hour, weekday, cand, src, k):
        # (B,), (B, D), (B,), (B,), (B, K), (B, K, S), (B,) -> raw ids (B, KMAX) best first, -1 past k; scores
        real = cand >= 0
        safe = np.where(real, cand, 0)
        score = np.einsum("bd,bkd->bk", vec, ITEM_VECS[safe]) + USER_BIAS[user_idx][:, None] * ITEM_POP[safe]
        score = score + 0.5 * src[..., 0] - 0.25 * src[..., 2]
        score = score + (hour / 23.0)[:, None] * ITEM_GENRES[safe, 0] - (weekday / 6.0)[:, None] * ITEM_GENRES[safe, 1]
        score = np.where(real, score, PAD_SCORE).astype(np.float32)
        order = np.argsort(-score, axis=1, kind="stable")[:, :KMAX]
        top = np.take_along_axis(cand, order, axis=1)
        keep = (top >= 0) & (np.arange(KMAX)[None, :] < k[:, None])
        ids = np.where(keep, ITEM_IDS[np.where(top >= 0, top, 0)], PAD_ID).astype(np.int64)
        return ids, np.where(keep, np.take_along_axis(score, order, axis=1), PAD_SCORE).astype(np.float32)
    """
)

# One fake per served model: `run(inputs, params)` on one request's arrays -> {output name: array}.
MODELS_PY = {
    "retrieval": """
        import time


        def run(inputs, params):
            k_max = int(params["k_max"])
            rows = len(inputs["user_id"])
            now = time.gmtime()
            hour = inputs.get("hour", np.full((rows, 1), now.tm_hour, np.int64))
            weekday = inputs.get("weekday", np.full((rows, 1), now.tm_wday, np.int64))
            for name, value, low, high in (("k", inputs["k"], 1, k_max), ("hour", hour, 0, 23),
                                           ("weekday", weekday, 0, 6)):
                bad = value[(value < low) | (value > high)]
                if bad.size:
                    raise RequestError(f"{name}={int(bad[0])} is out of range: choose {low}..{high}")
            ids = inputs["user_id"].reshape(-1)
            unknown = ids[~np.isin(ids, USER_IDS)]
            if unknown.size:
                raise RequestError(f"unknown user_id {int(unknown[0])}: not among the {len(USER_IDS)} users")
            idx = np.searchsorted(USER_IDS, ids).astype(np.int64)
            vec = user_vec(idx)
            cand = candidates(idx, vec)
            return {"user_idx": idx[:, None], "user_vec": vec, "context_hour": hour.reshape(-1, 1),
                    "context_weekday": weekday.reshape(-1, 1), "cand_idx": cand, "cand_src": source_scores(cand)}
        """,
    "ranker": """
        def run(inputs, params):
            col = lambda name: inputs[name].reshape(-1)  # noqa: E731
            ids, scores = rank(col("user_idx"), inputs["user_vec"], col("context_hour"), col("context_weekday"),
                               inputs["cand_idx"], inputs["cand_src"], col("k"))
            return {"item_ids": ids, "scores": scores}
        """,
    "item_tower": """
        def run(inputs, params):
            return {"item_vec": ITEM_VECS[inputs["item_idx"].reshape(-1)]}
        """,
    "catalogue": """
        def run(inputs, params):
            if "item_idx" in inputs:
                rows = inputs["item_idx"]
            else:
                ids = inputs["item_ids"]
                pos = np.clip(np.searchsorted(ITEM_IDS, ids), 0, len(ITEM_IDS) - 1)
                rows = np.where(ITEM_IDS[pos] == ids, pos, len(ITEM_IDS))
            ext = lambda a: np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)])  # noqa: E731
            titles = np.array([t.encode("utf-8") for t in TITLES] + [b""], dtype=np.object_)
            return {"titles": titles[rows], "raw_item_ids": np.append(ITEM_IDS, -1).astype(np.int64)[rows],
                    "item_genres": ext(ITEM_GENRES)[rows], "item_year": np.zeros(rows.shape, np.int64),
                    "item_vec": ext(ITEM_VECS)[rows]}
        """,
}

# Inputs and outputs by the spec's names; a RequestError becomes INVALID_ARG for that one request.
EXECUTE_PY = """

import json

import triton_python_backend_utils as pb_utils

from recserve.serving import spec

STEP = spec.step(NAME)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {}
            for name in STEP.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                outputs = run(inputs, self.params)
            except RequestError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            assert sorted(outputs) == sorted(STEP.output_names), (sorted(outputs), STEP.output_names)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(outputs[name], dtype=self.dtypes[name]))
                       for name in STEP.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
"""


def write_fake_repository(root: Path) -> Path:
    """Every spec model with its generated config and a fake model.py, and the generated ensemble."""
    missing = [s.name for s in spec.STEPS if s.name not in MODELS_PY]
    assert not missing, f"the spec serves {missing}, which this test has no fake for: add one to MODELS_PY"
    for s in spec.STEPS:
        (root / s.name / "1").mkdir(parents=True)
        (root / s.name / "config.pbtxt").write_text(render(model_config(s.name, SIZES, OPTS)))
        code = f"NAME = {s.name!r}\n" + TABLES_PY + textwrap.dedent(MODELS_PY[s.name]) + EXECUTE_PY
        (root / s.name / "1" / "model.py").write_text(code)
    (root / spec.ENSEMBLE / "1").mkdir(parents=True)
    (root / spec.ENSEMBLE / "config.pbtxt").write_text(render(ensemble_config(OPTS, SIZES)))
    return root


def tables() -> dict:
    t: dict = {}
    exec(TABLES_PY, t)  # noqa: S102 - our own fixture code
    return t


def expected(user_id: int, k: int, hour: int, weekday: int) -> tuple[list[int], list[float]]:
    """The answer computed straight from the tables, without Triton: real ids best first, and their scores."""
    t = tables()
    idx = np.searchsorted(t["USER_IDS"], [user_id]).astype(np.int64)
    vec = t["user_vec"](idx)
    cand = t["candidates"](idx, vec)
    ids, scores = t["rank"](idx, vec, np.array([hour]), np.array([weekday]), cand, t["source_scores"](cand),
                            np.array([k]))
    real = ids[0] >= 0
    return ids[0][real].tolist(), scores[0][real].tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repository = write_fake_repository(tmp_path_factory.mktemp("fake_repo"))
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(repository, ready_timeout=90, verify=False, **ports) as srv:
        yield srv


@pytest.fixture(params=PROTOCOLS)
def client(request: pytest.FixtureRequest, server: TritonServer):
    protocol = request.param
    with RecClient(server.url(protocol), protocol=protocol, timeout=10.0) as rec_client:
        yield rec_client


def test_the_fixture_answer_depends_on_user_hour_and_weekday() -> None:
    # Otherwise a wiring mistake (hour and weekday swapped, user_idx dropped) could pass unnoticed.
    answers = {(u, h, w): tuple(expected(u, KMAX, h, w)[0]) for u in (11, 12, 13) for h, w in ((0, 0), (23, 0), (0, 6))}
    assert len({answers[u, 0, 0] for u in (11, 12, 13)}) == 3
    assert any(answers[u, 0, 0] != answers[u, 23, 0] for u in (11, 12, 13))
    assert any(answers[u, 0, 0] != answers[u, 0, 6] for u in (11, 12, 13))
    assert all(len(ids) == K - 1 for ids in answers.values())


def test_served_models_follow_the_spec(client: RecClient) -> None:
    for s in spec.STEPS:
        config = client._transport.model_config(s.name)
        assert [t["name"] for t in config["input"]] == list(s.input_names)
        assert [t["name"] for t in config["output"]] == list(s.output_names)
    config = client._transport.model_config(spec.ENSEMBLE)
    assert [step["model_name"] for step in config["ensemble_scheduling"]["step"]] == [s.name for s in spec.path()]


def test_ready_and_k_max_read_from_the_first_step_config(client: RecClient) -> None:
    assert client.is_ready()
    config = client._transport.model_config(spec.path()[0].name)
    assert config["parameters"]["k_max"]["string_value"] == str(KMAX)
    assert client.k_max() == KMAX


@pytest.mark.parametrize("user", [11, 12, 13])
@pytest.mark.parametrize(("hour", "weekday"), [(0, 0), (23, 6), (9, 2)])
def test_ensemble_and_pipeline_give_the_same_items(client: RecClient, user: int, hour: int, weekday: int) -> None:
    for k in (1, 3, KMAX):
        want_ids, want_scores = expected(user, k, hour, weekday)
        assert want_ids, "the fixture should leave candidates for every user"
        ensemble = client.recommend(user, k=k, hour=hour, weekday=weekday, mode="ensemble")
        pipeline = client.recommend(user, k=k, hour=hour, weekday=weekday, mode="pipeline")
        assert ensemble.item_ids == pipeline.item_ids == want_ids
        # Same float32 arithmetic on the same inputs: equal to the last bit, allow 1e-6 anyway.
        np.testing.assert_allclose([it.score for it in ensemble.items], want_scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose([it.score for it in pipeline.items], want_scores, rtol=0, atol=1e-6)
        assert all(it.title == "" for it in ensemble.items + pipeline.items), "titles only when asked for"
        assert (ensemble.user, ensemble.mode, pipeline.mode) == (user, "ensemble", "pipeline")


@pytest.mark.parametrize("mode", MODES)
def test_padding_is_never_returned_and_at_most_k_items(client: RecClient, mode: str) -> None:
    t = tables()
    for user, seen in zip([11, 12, 13], t["SEEN"]):
        for k in range(1, KMAX + 1):
            rec = client.recommend(user, k=k, hour=12, weekday=3, mode=mode)
            # K candidates, the last one padding: min(k, K-1) real items come back.
            assert len(rec.items) == min(k, K - 1)
            assert all(100 <= item <= 109 for item in rec.item_ids)
            assert not {item - 100 for item in rec.item_ids} & seen, "retrieval skips seen items"
            scores = [it.score for it in rec.items]
            assert scores == sorted(scores, reverse=True), "best first"


def test_grpc_and_http_agree(server: TritonServer) -> None:
    answers = []
    for protocol in PROTOCOLS:
        with RecClient(server.url(protocol), protocol=protocol) as rec_client:
            got = [rec_client.recommend_many([11, 12, 13], k=3, hour=8, weekday=2, mode=mode) for mode in MODES]
            answers.append([r.as_dict() for recs in got for r in recs])
    assert answers[0] == answers[1]


def test_hour_and_weekday_are_optional_on_the_wire(client: RecClient) -> None:
    # A curl user may send only user_id and k: the ensemble passes the absent inputs on and retrieval uses now.
    one = {"user_id": np.array([[12]], dtype=np.int64), "k": np.array([[3]], dtype=np.int32)}
    before = dt.datetime.now(dt.timezone.utc)
    out = client._transport.infer(spec.ENSEMBLE, one, ["item_ids", "scores"])
    after = dt.datetime.now(dt.timezone.utc)
    got = out["item_ids"][0][out["item_ids"][0] >= 0].tolist()
    assert got in [expected(12, 3, t.hour, t.weekday())[0] for t in (before, after)]


@pytest.mark.parametrize("mode", MODES)
def test_unknown_user_is_an_unknown_user_error(client: RecClient, mode: str) -> None:
    with pytest.raises(UnknownUserError, match="unknown user_id 999") as info:
        client.recommend(999, k=3, hour=1, weekday=1, mode=mode)
    assert "\n" not in str(info.value)


def test_k_above_k_max_is_refused_before_inference(client: RecClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.k_max() == KMAX   # read once; from here on nothing may reach the network
    transport = client._transport
    for name in ("infer", "model_config", "is_ready"):
        monkeypatch.setattr(transport, name, lambda *a, _name=name, **kw: pytest.fail(f"{_name} was called"))
    for mode in MODES:
        with pytest.raises(ClientError, match=rf"^k={KMAX + 1} is out of range: choose 1\.\.{KMAX}$"):
            client.recommend(11, k=KMAX + 1, hour=1, weekday=1, mode=mode)
        with pytest.raises(ClientError, match=rf"^k=0 is out of range: choose 1\.\.{KMAX}$"):
            client.recommend(11, k=0, hour=1, weekday=1, mode=mode)


def test_k_below_one_is_refused_before_k_max_is_known(server: TritonServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with RecClient(server.url("grpc")) as fresh:
        monkeypatch.setattr(fresh._transport, "model_config", lambda *a, **kw: pytest.fail("model_config was called"))
        monkeypatch.setattr(fresh._transport, "infer", lambda *a, **kw: pytest.fail("infer was called"))
        with pytest.raises(ClientError, match=r"^k=0 is out of range: choose 1\.\.k_max"):
            fresh.recommend(11, k=0, hour=1, weekday=1)


@pytest.mark.parametrize(("mode", "model"), [("ensemble", spec.ENSEMBLE), ("pipeline", spec.path()[0].name)])
def test_server_errors_name_the_model(server: TritonServer, mode: str, model: str) -> None:
    # A client told a larger k_max than the server's sends k past it: the server's own check answers.
    for protocol in PROTOCOLS:
        with RecClient(server.url(protocol), protocol=protocol, k_max=KMAX + 1) as lying:
            # Triton prefixes an ensemble step's error with "in ensemble 'recommend', ".
            refused = rf"^model '{model}' at .* rejected the request: (in ensemble '{spec.ENSEMBLE}', )?k={KMAX + 1} "
            with pytest.raises(ClientError, match=refused + "is out of range") as info:
                lying.recommend(11, k=KMAX + 1, hour=1, weekday=1, mode=mode)
            assert not isinstance(info.value, UnknownUserError)
            with pytest.raises(ClientError, match=r"^model 'nope' at .* rejected the request: .*nope"):
                lying._transport.infer("nope", {"user_id": np.array([[11]], dtype=np.int64)}, ["item_ids"])


def test_titles_come_from_the_catalogue_and_are_cached(server: TritonServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for protocol in PROTOCOLS:
        with RecClient(server.url(protocol), protocol=protocol) as fresh:
            calls: list[str] = []
            infer = fresh._transport.infer

            def counting(model, inputs, outputs, _infer=infer, _calls=calls):
                _calls.append(model)
                return _infer(model, inputs, outputs)

            monkeypatch.setattr(fresh._transport, "infer", counting)
            want_ids, _ = expected(13, 3, 7, 5)
            first = fresh.recommend(13, k=3, hour=7, weekday=5, titles=True)
            assert first.item_ids == want_ids
            assert [it.title for it in first.items] == [f"item-{i}" for i in want_ids]
            assert calls == [spec.ENSEMBLE, "catalogue"]
            second = fresh.recommend(13, k=3, hour=7, weekday=5, titles=True, mode="pipeline")
            assert second.as_dict()["items"] == first.as_dict()["items"]
            assert calls.count("catalogue") == 1, "titles are cached per item id"
            assert fresh.titles([want_ids[0], 999]) == [f"item-{want_ids[0]}", ""]   # unknown id: ""
            assert calls.count("catalogue") == 2
            assert fresh.titles([999, want_ids[0]]) == ["", f"item-{want_ids[0]}"]
            assert calls.count("catalogue") == 2


def test_cli_prints_one_json_line_with_titles_and_a_table(server: TritonServer) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("recommend")(recommend_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    args = ["recommend", "--user", "12", "-k", "3", "--hour", "5", "--weekday", "4", "--url", server.url("grpc")]
    want_ids, want_scores = expected(12, 3, 5, 4)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    payload = json.loads(lines[0])
    assert payload["user"] == 12 and payload["mode"] == "ensemble"
    assert [item["item_id"] for item in payload["items"]] == want_ids
    assert [item["title"] for item in payload["items"]] == [f"item-{i}" for i in want_ids]
    np.testing.assert_allclose([item["score"] for item in payload["items"]], want_scores, rtol=0, atol=1e-6)
    table = runner.invoke(app, [*args, "--mode", "pipeline", "--protocol", "http", "--url", server.url("http")])
    assert table.exit_code == 0, table.output
    rows = table.stdout.splitlines()
    assert rows[0] == "source: personalized"
    rows = rows[1:]
    assert rows[0].split() == ["rank", "item_id", "score", "title"]
    assert [row.split()[:2] for row in rows[1:]] == [[str(r), str(i)] for r, i in enumerate(want_ids, 1)]
    assert [row.split()[3] for row in rows[1:]] == [f"item-{i}" for i in want_ids]
    unknown = runner.invoke(app, ["recommend", "--user", "999", "--url", server.url("grpc"), "-k", "2"])
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: ") and "unknown user_id 999" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1 and "Traceback" not in unknown.stderr
