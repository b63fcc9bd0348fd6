"""RecClient and `recserve recommend` without a server: validation, error mapping, JSON shape."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from recserve.client import RecClient, Recommendation, RecommendedItem
from recserve.client.cli import format_table, recommend_command
from recserve.client.client import _map_error
from recserve.errors import ClientError, ServerError, UnknownUserError
from recserve.server import free_port

pytestmark = pytest.mark.unit

PROTOCOLS = ("grpc", "http")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> RecClient:
    """A client with K=500 whose transport fails the test if anything reaches the network."""
    client = RecClient("127.0.0.1:1", protocol="grpc", timeout=1.0, k_max=500)

    def no_network(*args, **kwargs):
        raise AssertionError("the request reached the network before validation")

    monkeypatch.setattr(client._transport, "infer", no_network)
    monkeypatch.setattr(client._transport, "model_config", no_network)
    return client


@pytest.fixture
def silent_port():
    """A port that accepts connections but never answers: every call times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_default_url_follows_protocol() -> None:
    assert RecClient(protocol="grpc").url == "127.0.0.1:8001"
    assert RecClient(protocol="http").url == "127.0.0.1:8000"
    assert RecClient("example:9", protocol="http").url == "example:9"
    assert RecClient("http://example:9", protocol="http").url == "example:9"


@pytest.mark.parametrize("k", [0, -3, 501])
def test_k_out_of_range_is_refused_before_any_call(offline: RecClient, k: int) -> None:
    with pytest.raises(ClientError, match=rf"^k={k} is out of range: choose 1\.\.500$"):
        offline.recommend(1, k=k)


def test_k_not_an_integer_is_refused(offline: RecClient) -> None:
    with pytest.raises(ClientError, match=r"k=2\.5 is out of range"):
        offline.recommend(1, k=2.5)  # type: ignore[arg-type]


def test_k_below_one_is_refused_without_knowing_k_max(monkeypatch: pytest.MonkeyPatch) -> None:
    client = RecClient(f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(client._transport, "model_config", lambda model: pytest.fail("asked the server for k_max"))
    with pytest.raises(ClientError, match=r"^k=0 is out of range: choose 1\.\.k_max"):
        client.recommend(1, k=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"hour": 24}, r"^hour=24 is out of range: choose 0\.\.23$"),
        ({"hour": -1}, r"^hour=-1 is out of range"),
        ({"weekday": 7}, r"^weekday=7 is out of range: choose 0\.\.6$"),
        ({"mode": "batch"}, r"^mode='batch' is not supported: choose 'ensemble' or 'pipeline'$"),
        ({"user_id": "42"}, r"^user_id='42' is not a 64-bit integer"),
        ({"user_id": 2**63}, r"is not a 64-bit integer"),
    ],
)
def test_bad_arguments_are_refused(offline: RecClient, kwargs: dict, pattern: str) -> None:
    args = {"user_id": 1, **kwargs}
    with pytest.raises(ClientError, match=pattern):
        offline.recommend(**args)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"protocol": "rest"}, r"^protocol='rest' is not supported: choose 'grpc' or 'http'$"),
        ({"timeout": 0}, r"^timeout=0 must be a positive number"),
        ({"k_max": 0}, r"^k_max=0 must be a positive integer"),
    ],
)
def test_bad_client_settings_are_refused(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ClientError, match=pattern):
        RecClient(**kwargs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_down_is_a_server_error(protocol: str) -> None:
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with RecClient(url, protocol=protocol, timeout=2.0) as client:
        assert client.is_ready() is False
        with pytest.raises(ServerError) as info:
            client.recommend(1, k=5)
    assert str(info.value) == f"no Triton server answers at {url} ({protocol}): start one with `recserve serve`"
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_silent_server_times_out(protocol: str, silent_port: int) -> None:
    client = RecClient(f"127.0.0.1:{silent_port}", protocol=protocol, timeout=0.5, k_max=10)
    start = time.monotonic()
    with pytest.raises(ServerError, match=rf"^the Triton server at 127\.0\.0\.1:{silent_port} \({protocol}\) "
                                          r"timed out after 0\.5 s"):
        client.recommend(1, k=5, mode="pipeline")
    assert time.monotonic() - start < 5.0
    client.close()


def test_server_messages_map_to_typed_errors() -> None:
    from tritonclient.utils import InferenceServerException

    def mapped(exc: BaseException):
        return _map_error(exc, model="user_features", where="h:1 (grpc)", timeout=3.0)

    unknown = mapped(InferenceServerException("in ensemble 'recommend', unknown user_id 999: not in the data",
                                              status="StatusCode.INVALID_ARGUMENT"))
    assert type(unknown) is UnknownUserError
    assert str(unknown) == "in ensemble 'recommend', unknown user_id 999: not in the data"
    other = mapped(InferenceServerException("Request for unknown model: 'user_features' is not found", status="400"))
    assert type(other) is ClientError
    assert str(other) == ("model 'user_features' at h:1 (grpc) rejected the request: "
                          "Request for unknown model: 'user_features' is not found")
    traceback = mapped(InferenceServerException("boom\\nTraceback (most recent call last):\\n  File x", status="500"))
    assert str(traceback).endswith("rejected the request: boom")
    assert str(mapped(InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"))) == (
        "the Triton server at h:1 (grpc) timed out after 3 s; raise --timeout or check the server")
    assert isinstance(mapped(ConnectionRefusedError(111, "refused")), ServerError)
    assert "timed out after 3 s" in str(mapped(TimeoutError("timed out")))
    gaierror = mapped(socket.gaierror(-2, "Name or service not known"))
    assert isinstance(gaierror, ServerError) and "Name or service not known" in str(gaierror)


def test_gevent_timeout_is_a_timeout() -> None:
    gevent = pytest.importorskip("gevent")
    error = _map_error(gevent.Timeout(1.0), model="recommend", where="h:1 (http)", timeout=1.0)
    assert isinstance(error, ServerError) and "timed out after 1 s" in str(error)


def test_recommendation_json_shape() -> None:
    rec = Recommendation(user=7, mode="ensemble", items=[RecommendedItem(12, 0.5, "Heat (1995)"),
                                                         RecommendedItem(3, 0.25, "Amélie")])
    expected = {
        "user": 7,
        "mode": "ensemble",
        "source": "personalized",
        "items": [
            {"item_id": 12, "score": 0.5, "title": "Heat (1995)"},
            {"item_id": 3, "score": 0.25, "title": "Amélie"},
        ],
    }
    assert rec.as_dict() == expected
    assert json.loads(rec.to_json()) == expected
    assert "\n" not in rec.to_json()
    assert rec.item_ids == [12, 3]
    explored = Recommendation(user=7, mode="ensemble", source="popular",
                              items=[RecommendedItem(12, 0.5, "Heat (1995)", propensity=0.7)])
    assert explored.as_dict()["source"] == "popular" and explored.as_dict()["items"][0]["propensity"] == 0.7
    table = format_table(rec).splitlines()
    assert table[0] == "source: personalized"
    assert table[1].split() == ["rank", "item_id", "score", "title"]
    assert table[2].split() == ["1", "12", "0.5000", "Heat", "(1995)"]


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("recommend")(recommend_command)

    @app.command("noop")
    def noop() -> None:  # a second command keeps `recommend` a subcommand, as in recserve.cli
        """Nothing."""

    return app


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_server_down_prints_one_error_line(protocol: str) -> None:
    runner = CliRunner()
    url = f"127.0.0.1:{free_port()}"
    result = runner.invoke(cli_app(), ["recommend", "--user", "1", "-k", "3", "--protocol", protocol,
                                       "--url", url, "--timeout", "2", "--json"])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: no Triton server answers at {url} ({protocol}): start one with `recserve serve`"
    ]
    assert "Traceback" not in result.stderr


def test_cli_bad_mode_is_one_error_line() -> None:
    result = CliRunner().invoke(cli_app(), ["recommend", "--user", "1", "--mode", "fast"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: mode='fast' is not supported: choose 'ensemble' or 'pipeline'"


def test_unavailable_model_is_not_mistaken_for_a_dead_server() -> None:
    from tritonclient.utils import InferenceServerException

    error = _map_error(InferenceServerException("Request for unknown model: 'ranker' is not ready",
                                                status="StatusCode.UNAVAILABLE"),
                       model="ranker", where="h:1 (grpc)", timeout=1.0)
    assert type(error) is ServerError
    assert str(error).startswith("model 'ranker' at h:1 (grpc) is unavailable: Request for unknown model")


def test_shed_requests_map_to_overloaded_and_are_retried_with_backoff_within_the_deadline(monkeypatch) -> None:
    from tritonclient.utils import InferenceServerException

    from recserve.client.client import Overloaded, _Transport

    shed_http = _map_error(InferenceServerException("overloaded: too many requests in flight", status="503"),
                           model="recommend", where="h:1 (http)", timeout=3.0)
    shed_grpc = _map_error(InferenceServerException("overloaded: too many requests in flight; retry with backoff",
                                                    status="StatusCode.UNAVAILABLE"),
                           model="recommend", where="h:1 (grpc)", timeout=3.0)
    assert isinstance(shed_http, Overloaded) and isinstance(shed_grpc, Overloaded)

    transport = _Transport("grpc", "127.0.0.1:1", timeout=2.0)
    calls, pauses = [], []
    monkeypatch.setattr(time, "sleep", pauses.append)

    class Result:
        def as_numpy(self, name):
            return np.array([[1]])

    def infer(model, inputs, outputs=None, **kw):
        calls.append(model)
        if len(calls) < 4:
            raise InferenceServerException("overloaded: too many requests in flight", status="StatusCode.UNAVAILABLE")
        return Result()

    monkeypatch.setattr(transport._client, "infer", infer)
    out = transport.infer("recommend", {"user_id": np.array([[1]])}, ("item_ids",))
    assert len(calls) == 4 and out["item_ids"].tolist() == [[1]]
    assert len(pauses) == 3 and all(0 <= p <= 0.2 for p in pauses)    # full jitter, capped

    calls.clear()
    monkeypatch.setattr(transport, "timeout", 0.0)                     # no time left: the shed error itself
    monkeypatch.setattr(transport._client, "infer", lambda *a, **k: (_ for _ in ()).throw(
        InferenceServerException("overloaded", status="StatusCode.UNAVAILABLE")))
    with pytest.raises(Overloaded):
        transport.infer("recommend", {"user_id": np.array([[1]])}, ("item_ids",))


def test_pipeline_mode_serves_the_retrieval_order_when_the_ranker_fails_and_applies_the_rules():
    """The client's own fallback: the blend order of the candidates, their raw ids from the catalogue."""
    client = RecClient(f"127.0.0.1:{free_port()}", protocol="http", k_max=5)
    cand = np.array([[4, 2, -1, 7, 0]], np.int64)
    src = np.zeros((1, 5, 3), np.float32)
    src[0, :, 0] = [0.1, 0.9, 0.8, 0.5, 0.3]                 # the padding's 0.8 must not count
    calls = []

    def infer(model, inputs, outputs, version=""):
        calls.append(model)
        if model == "retrieval":
            return {"user_idx": np.array([[0]]), "user_vec": np.zeros((1, 2), np.float32),
                    "context_hour": np.array([[1]]), "context_weekday": np.array([[1]]), "cand_idx": cand,
                    "cand_src": src}
        if model == "ranker":
            raise ServerError("the ranker failed")
        assert model == "catalogue"
        idx = inputs["item_idx"][0] if "item_idx" in inputs else (inputs["item_ids"][0] - 100) // 10
        return {"raw_item_ids": (idx * 10 + 100)[None], "titles": np.array([[b""] * len(idx)], dtype=object),
                "item_genres": np.eye(3, dtype=np.float32)[idx % 3][None],
                "item_year": np.zeros((1, len(idx)), np.int64),
                "item_vec": np.zeros((1, len(idx), 2), np.float32)}

    client._transport.infer = infer
    rec = client.recommend(1, k=3, hour=1, weekday=1, mode="pipeline")
    assert rec.source == "fallback" and rec.item_ids == [120, 170, 100] and client.fallbacks == 1
    assert [round(i.score, 3) for i in rec.items] == [0.9, 0.5, 0.3]
    assert calls == ["retrieval", "ranker", "catalogue"]
    excluded = client.recommend(1, k=3, hour=1, weekday=1, mode="pipeline", exclude=[170])
    assert excluded.item_ids == [120, 100, 140] and excluded.source == "fallback"
