"""RecClient against a real tritonserver serving a FAKE repository that follows model_repository/README.md.

Every stage is a tiny python-backend model over hard-coded tables (3 users, 10 items, K=5, D=4,
C=1, H=3, G=2), wired by a real ensemble ``recommend``. The test computes the expected ranking
from the same tables in numpy, so it proves the client (both modes, both protocols) without the
real repository generator.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.integration

try:
    find_tritonserver()
except ServerError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"no tritonserver binary: {exc}", allow_module_level=True)

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from google.protobuf import json_format, text_format  # noqa: E402  (after the skip guards)
from tritonclient.grpc import model_config_pb2  # noqa: E402

PROTOCOLS = ("grpc", "http")
K = 5

# Shared by every fake model.py and by the expected answer below.
TABLES_PY = textwrap.dedent(
    """\
    import numpy as np

    K, D, C, H, G, N_ITEMS = 5, 4, 1, 3, 2, 10
    USER_IDS = np.array([11, 12, 13], dtype=np.int64)
    USER_CATS = np.array([[0], [1], [1]], dtype=np.int64)                      # (U, C)
    HISTORY = np.array([[0, 1, 2], [3, 3, 3], [9, 8, 9]], dtype=np.int64)     # (U, H)
    _rng = np.random.default_rng(7)
    USER_VECS = _rng.normal(size=(3, D)).astype(np.float32)                    # (U, D)
    ITEM_VECS = _rng.normal(size=(N_ITEMS, D)).astype(np.float32)              # (N, D)
    ITEM_GENRES = (_rng.random(size=(N_ITEMS, G)) > 0.5).astype(np.float32)   # (N, G)
    ITEM_YEAR = np.arange(1990, 1990 + N_ITEMS, dtype=np.int64)                # (N,)
    ITEM_POP = np.linspace(0.0, 0.3, N_ITEMS, dtype=np.float32)                # (N,)


    def user_vec(user_idx, user_cats):
        vec = USER_VECS[user_idx[:, 0]] + 0.1 * user_cats.astype(np.float32)   # (B, D)
        return (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)


    def retrieve(vec):
        # Top K-1 by dot product, then one -1: FAISS's padding, which topk must skip.
        scores = vec @ ITEM_VECS.T                                              # (B, N)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : K - 1]
        idx = np.concatenate([order, -np.ones((len(vec), 1), dtype=np.int64)], axis=1).astype(np.int64)
        got = np.take_along_axis(scores, order, axis=1)
        return idx, np.concatenate([got, np.zeros((len(vec), 1))], axis=1).astype(np.float32)


    def rank(vec, hour, weekday, cand_genres, cand_pop, cand_vec):
        score = cand_pop + np.einsum("bd,bkd->bk", vec, cand_vec)                # (B, K)
        score += 0.1 * hour / 23.0 * cand_genres[:, :, 0] - 0.1 * weekday / 6.0 * cand_genres[:, :, 1]
        return score.astype(np.float32)


    def top(scores, idx, valid, k):
        pos = np.flatnonzero(valid)
        order = pos[np.argsort(-scores[pos], kind="stable")][:k]
        ids = (idx[order] + 100).astype(np.int64)
        return ids, scores[order].astype(np.float32), [f"Item {i}" for i in ids]
    """
)

# One python model per stage: inputs and outputs as the README names them; per-request errors.
MODELS_PY = {
    "user_features": """
        def run(get):
            user_id = get("user_id")[:, 0]
            if not np.isin(user_id, USER_IDS).all():
                bad = int(user_id[~np.isin(user_id, USER_IDS)][0])
                raise ValueError(f"unknown user_id {bad}: not in the users table; pass an id from the data")
            idx = np.searchsorted(USER_IDS, user_id).astype(np.int64)
            return {"user_idx": idx[:, None], "user_cats": USER_CATS[idx], "history": HISTORY[idx]}
        """,
    "user_tower": """
        def run(get):
            return {"user_vec": user_vec(get("user_idx"), get("user_cats"))}
        """,
    "retrieval": """
        def run(get):
            idx, scores = retrieve(get("user_vec"))
            return {"candidate_idx": idx, "candidate_scores": scores}
        """,
    "ranker_inputs": """
        def run(get):
            cand = get("candidate_idx")
            idx = np.where(cand >= 0, cand, 0)
            seen = HISTORY[get("user_idx")[:, 0]]
            valid = (cand >= 0) & ~(cand[:, :, None] == seen[:, None, :]).any(axis=2)
            return {"cand_idx": idx, "cand_genres": ITEM_GENRES[idx], "cand_year": ITEM_YEAR[idx],
                    "cand_pop": ITEM_POP[idx], "cand_vec": ITEM_VECS[idx], "cand_valid": valid}
        """,
    "ranker": """
        def run(get):
            return {"scores": rank(get("user_vec"), get("hour"), get("weekday"),
                                   get("cand_genres"), get("cand_pop"), get("cand_vec"))}
        """,
    "topk": """
        def run(get):
            k = int(get("k")[0, 0])
            if not 1 <= k <= K:
                raise ValueError(f"k={k} is out of range: choose 1..{K}")
            ids, scores, titles = top(get("rank_scores")[0], get("candidate_idx")[0], get("cand_valid")[0], k)
            return {"item_ids": ids[None], "scores": scores[None],
                    "titles": np.array([[t.encode("utf-8") for t in titles]], dtype=np.object_)}
        """,
}

EXECUTE_PY = """

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            def get(name, request=request):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            try:
                outputs = run(get)
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
                continue
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
"""


def tensor(name: str, dtype: str, dims: list[int]) -> dict:
    # The wire calls it BYTES; model_config.proto calls it TYPE_STRING.
    return {"name": name, "data_type": "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}", "dims": dims}


USER = [tensor("user_idx", "INT64", [1]), tensor("user_cats", "INT64", [1]), tensor("history", "INT64", [3])]
CANDS = [
    tensor("cand_idx", "INT64", [K]), tensor("cand_genres", "FP32", [K, 2]), tensor("cand_year", "INT64", [K]),
    tensor("cand_pop", "FP32", [K]), tensor("cand_vec", "FP32", [K, 4]), tensor("cand_valid", "BOOL", [K]),
]
TOPK_OUT = [tensor("item_ids", "INT64", [-1]), tensor("scores", "FP32", [-1]), tensor("titles", "BYTES", [-1])]
SIGNATURES = {  # model: (inputs, outputs), per row: Triton adds the batch dimension
    "user_features": ([tensor("user_id", "INT64", [1])], USER),
    "user_tower": (USER, [tensor("user_vec", "FP32", [4])]),
    "retrieval": ([tensor("user_vec", "FP32", [4])],
                  [tensor("candidate_idx", "INT64", [K]), tensor("candidate_scores", "FP32", [K])]),
    "ranker_inputs": ([tensor("user_idx", "INT64", [1]), tensor("candidate_idx", "INT64", [K])], CANDS),
    "ranker": (USER[:2] + [tensor("user_vec", "FP32", [4]), tensor("hour", "INT64", [1]),
                           tensor("weekday", "INT64", [1])] + CANDS[:5], [tensor("scores", "FP32", [K])]),
    "topk": ([tensor("rank_scores", "FP32", [K]), tensor("candidate_idx", "INT64", [K]),
              tensor("cand_valid", "BOOL", [K]), tensor("k", "INT32", [1])], TOPK_OUT),
}
ENSEMBLE_INPUTS = [tensor("user_id", "INT64", [1]), tensor("k", "INT32", [1]),
                   tensor("hour", "INT64", [1]), tensor("weekday", "INT64", [1])]
RENAMED_OUTPUTS = {("ranker", "scores"): "rank_scores"}  # ranker's and topk's `scores` are different tensors


def ensemble_steps() -> list[dict]:
    steps = []
    for model, (inputs, outputs) in SIGNATURES.items():
        steps.append({
            "model_name": model,
            "model_version": -1,
            "input_map": {t["name"]: t["name"] for t in inputs},
            "output_map": {t["name"]: RENAMED_OUTPUTS.get((model, t["name"]), t["name"])
                           for t in outputs if t["name"] != "candidate_scores"},
        })
    return steps


def write_config(directory: Path, config: dict) -> None:
    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    (directory / "config.pbtxt").write_text(text_format.MessageToString(message))


def write_fake_repository(root: Path) -> Path:
    for model, (inputs, outputs) in SIGNATURES.items():
        (root / model / "1").mkdir(parents=True)
        config = {"name": model, "backend": "python", "max_batch_size": 8, "input": inputs, "output": outputs,
                  "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
        if model == "topk":
            config["parameters"] = {"candidates": {"string_value": str(K)}}
        write_config(root / model, config)
        code = TABLES_PY + textwrap.dedent(MODELS_PY[model]) + EXECUTE_PY
        (root / model / "1" / "model.py").write_text(code)
    (root / "recommend" / "1").mkdir(parents=True)
    write_config(root / "recommend", {
        "name": "recommend", "platform": "ensemble", "max_batch_size": 8,
        "input": ENSEMBLE_INPUTS, "output": TOPK_OUT, "ensemble_scheduling": {"step": ensemble_steps()},
    })
    return root


def expected(user_id: int, k: int, hour: int, weekday: int) -> tuple[list[int], np.ndarray]:
    """The answer computed straight from the tables, without Triton."""
    t: dict = {}
    exec(TABLES_PY, t)  # noqa: S102 - our own fixture code
    idx = np.array([[int(np.searchsorted(t["USER_IDS"], user_id))]])
    vec = t["user_vec"](idx, t["USER_CATS"][idx[:, 0]])
    cand, _ = t["retrieve"](vec)
    safe = np.where(cand >= 0, cand, 0)
    valid = (cand >= 0) & ~np.isin(cand, t["HISTORY"][idx[0, 0]])
    scores = t["rank"](vec, np.array([[hour]]), np.array([[weekday]]), t["ITEM_GENRES"][safe],
                       t["ITEM_POP"][safe], t["ITEM_VECS"][safe])
    ids, top_scores, _ = t["top"](scores[0], cand[0], valid[0], k)
    return ids.tolist(), top_scores


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repository = write_fake_repository(tmp_path_factory.mktemp("fake_repo"))
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(repository, ready_timeout=90, **ports) as srv:
        yield srv


@pytest.fixture(params=PROTOCOLS)
def client(request: pytest.FixtureRequest, server: TritonServer):
    protocol = request.param
    with RecClient(server.url(protocol), protocol=protocol, timeout=10.0) as rec_client:
        yield rec_client


def test_ready_and_candidates_from_topk_config(client: RecClient) -> None:
    assert client.is_ready()
    assert client.candidates() == K


@pytest.mark.parametrize("user", [11, 12, 13])
@pytest.mark.parametrize(("hour", "weekday"), [(0, 0), (23, 6)])
def test_ensemble_and_pipeline_give_the_same_items(client: RecClient, user: int, hour: int, weekday: int) -> None:
    for k in (1, 3, K):
        want_ids, want_scores = expected(user, k, hour, weekday)
        assert want_ids, "the fixture should leave candidates for every user"
        ensemble = client.recommend(user, k=k, hour=hour, weekday=weekday, mode="ensemble")
        pipeline = client.recommend(user, k=k, hour=hour, weekday=weekday, mode="pipeline")
        assert ensemble.item_ids == pipeline.item_ids == want_ids
        # Same float32 arithmetic on the same inputs: equal to the last bit, allow 1e-6 anyway.
        np.testing.assert_allclose([it.score for it in ensemble.items], want_scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose([it.score for it in pipeline.items], want_scores, rtol=0, atol=1e-6)
        assert [it.title for it in ensemble.items] == [f"Item {i}" for i in want_ids]
        assert (ensemble.user, ensemble.mode, pipeline.mode) == (user, "ensemble", "pipeline")


def test_filtered_candidates_are_never_returned(client: RecClient) -> None:
    # K=5 candidates, the last one FAISS padding: at most 4 come back, none the user has seen.
    rec = client.recommend(11, k=K, hour=12, weekday=3)
    assert 1 <= len(rec.items) <= K - 1
    assert not {item - 100 for item in rec.item_ids} & {0, 1, 2}


def test_grpc_and_http_agree(server: TritonServer) -> None:
    answers = []
    for protocol in PROTOCOLS:
        with RecClient(server.url(protocol), protocol=protocol) as rec_client:
            answers.append(rec_client.recommend_many([11, 12, 13], k=3, hour=8, weekday=2, mode="pipeline"))
    assert [r.as_dict() for r in answers[0]] == [r.as_dict() for r in answers[1]]


@pytest.mark.parametrize("mode", ["ensemble", "pipeline"])
def test_unknown_user_is_an_unknown_user_error(client: RecClient, mode: str) -> None:
    with pytest.raises(UnknownUserError, match="unknown user_id 999") as info:
        client.recommend(999, k=3, hour=1, weekday=1, mode=mode)
    assert "\n" not in str(info.value)


def test_k_above_candidates_is_refused_before_inference(client: RecClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client.candidates()
    monkeypatch.setattr(client._transport, "infer", lambda *a, **kw: pytest.fail("inference was called"))
    with pytest.raises(ClientError, match=rf"^k={K + 1} is out of range: choose 1\.\.{K}$"):
        client.recommend(11, k=K + 1)


def test_other_server_errors_name_the_model(client: RecClient) -> None:
    # Bypass the client's own k check to see the server's per-request error come back through the ensemble.
    one = {"user_id": np.array([[11]], dtype=np.int64), "k": np.array([[K + 1]], dtype=np.int32),
           "hour": np.array([[1]], dtype=np.int64), "weekday": np.array([[1]], dtype=np.int64)}
    with pytest.raises(ClientError, match=rf"^model 'recommend' at .* rejected the request: .*k={K + 1} is out of"):
        client._transport.infer("recommend", one, ["item_ids"])
    with pytest.raises(ClientError, match=r"^model 'nope' at .* rejected the request: .*nope"):
        client._transport.infer("nope", one, ["item_ids"])


def test_cli_prints_one_json_line_and_a_table(server: TritonServer) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("recommend")(recommend_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    args = ["recommend", "--user", "12", "-k", "3", "--hour", "5", "--weekday", "4", "--url", server.url("grpc")]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    payload = json.loads(lines[0])
    want_ids, _ = expected(12, 3, 5, 4)
    assert payload["user"] == 12 and payload["mode"] == "ensemble"
    assert [item["item_id"] for item in payload["items"]] == want_ids
    table = runner.invoke(app, [*args, "--mode", "pipeline", "--protocol", "http", "--url", server.url("http")])
    assert table.exit_code == 0, table.output
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["rank", "item_id", "score", "title"]
    assert [int(row.split()[1]) for row in rows[1:]] == want_ids
    unknown = runner.invoke(app, ["recommend", "--user", "999", "--url", server.url("grpc"), "-k", "2"])
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: ") and "unknown user_id 999" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1 and "Traceback" not in unknown.stderr
