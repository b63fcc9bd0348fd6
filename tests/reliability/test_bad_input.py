"""Hostile and malformed input, over HTTP (through the front door) and gRPC: each gets a clear 4xx naming what was
wrong, nothing leaks a traceback or a source path, and afterwards the server is ready and answers exactly as
before. A bad request batched with good ones fails only itself."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading

import grpc
import numpy as np
import pytest
import requests
from guarded import long_run, recommend_json, record, still_serving
from tritonclient.grpc import service_pb2, service_pb2_grpc

K_BIG = 2**32 + 3


def t(name, dtype, shape, data):
    return {"name": name, "datatype": dtype, "shape": shape, "data": data}


def body(*inputs, **extra):
    return json.dumps({"inputs": list(inputs), **extra}).encode()


UID = t("user_id", "INT64", [1, 1], [1])
K5 = t("k", "INT32", [1, 1], [5])
INFER = "/v2/models/recommend/infer"

# (case, method, path, body, headers, statuses it may get, words the message must hold)
HTTP_CASES = [
    ("truncated JSON", "POST", INFER, b'{"inputs":[{"name":', {}, {400}, "not valid JSON"),
    ("empty body", "POST", INFER, b"", {}, {400}, "empty request body"),
    ("plain text", "POST", INFER, b"hello", {}, {400}, "not valid JSON"),
    ("JSON array at the top", "POST", INFER, b"[1, 2]", {}, {400}, "inputs"),
    ("400 KB of nested brackets", "POST", INFER, b"[" * 400_000, {}, {400}, "not valid JSON"),
    ("2 MB body", "POST", INFER, b"[" * 2_000_000, {}, {413}, "too large"),
    ("3,000 nested brackets", "POST", INFER, b'{"inputs":' + b"[" * 3000, {}, {400}, "not valid JSON"),
    ("no inputs key", "POST", INFER, b'{"outputs": []}', {}, {400}, "no 'inputs'"),
    ("empty inputs", "POST", INFER, body(), {}, {400}, "no 'inputs'"),
    ("missing k", "POST", INFER, body(UID), {}, {400}, "missing input 'k'"),
    ("missing user_id", "POST", INFER, body(K5), {}, {400}, "missing input 'user_id'"),
    ("unknown input", "POST", INFER, body(UID, K5, t("evil", "INT64", [1, 1], [1])), {}, {400}, "unknown input 'evil'"),
    ("input twice", "POST", INFER, body(UID, K5, K5), {}, {400}, "given twice"),
    ("wrong datatype", "POST", INFER, body(t("user_id", "FP32", [1, 1], [1.0]), K5), {}, {400}, "datatype INT64"),
    ("shape of the wrong rank", "POST", INFER, body(t("user_id", "INT64", [1], [1]), K5), {}, {400}, "shape"),
    ("shape [1e9, 1] with one value", "POST", INFER, body(t("user_id", "INT64", [1_000_000_000, 1], [1]), K5), {},
     {400}, "batch of 1000000000"),
    ("shape against data", "POST", INFER, body(t("user_id", "INT64", [2, 1], [1]), t("k", "INT32", [2, 1], [5, 5])),
     {}, {400}, "needs 2"),
    ("negative shape", "POST", INFER, body(t("user_id", "INT64", [-1, 1], [1]), K5), {}, {400}, "shape"),
    ("fractional shape", "POST", INFER, body(t("user_id", "INT64", [1.5, 1], [1]), K5), {}, {400}, "shape"),
    ("int64 overflow", "POST", INFER, b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":'
     b'[99999999999999999999999]},{"name":"k","shape":[1,1],"datatype":"INT32","data":[5]}]}', {}, {400},
     "does not fit INT64"),
    ("k = 2^32 + 3", "POST", INFER, body(UID, t("k", "INT32", [1, 1], [K_BIG])), {}, {400}, "does not fit INT32"),
    ("k = 0", "POST", INFER, body(UID, t("k", "INT32", [1, 1], [0])), {}, {400}, "k=0 is out of range"),
    ("k above k-max", "POST", INFER, body(UID, t("k", "INT32", [1, 1], [10_000])), {}, {400}, "out of range"),
    ("k = -1", "POST", INFER, body(UID, t("k", "INT32", [1, 1], [-1])), {}, {400}, "out of range"),
    ("hour = 24", "POST", INFER, body(UID, K5, t("hour", "INT64", [1, 1], [24])), {}, {400}, "hour=24"),
    ("weekday = 7", "POST", INFER, body(UID, K5, t("weekday", "INT64", [1, 1], [7])), {}, {400}, "weekday=7"),
    ("unknown user at the retrieval step", "POST", "/v2/models/retrieval/infer",
     body(t("user_id", "INT64", [1, 1], [987654321]), K5), {}, {400}, "unknown user_id"),
    ("explore without a seed", "POST", INFER, body(UID, K5, t("explore", "INT32", [1, 1], [1])), {}, {400},
     "explore needs a seed"),
    ("epsilon above 1", "POST", INFER, body(UID, K5, t("explore", "INT32", [1, 1], [1]),
                                            t("explore_param", "FP32", [1, 1], [2.0]), t("seed", "INT64", [1, 1], [1])),
     {}, {400}, "epsilon"),
    ("unknown explore mode", "POST", INFER, body(UID, K5, t("explore", "INT32", [1, 1], [9])), {}, {400},
     "explore=9"),
    ("mmr_lambda above 1", "POST", INFER, body(UID, K5, t("mmr_lambda", "FP32", [1, 1], [3.0])), {}, {400},
     "mmr_lambda"),
    ("negative max_per_genre", "POST", INFER, body(UID, K5, t("max_per_genre", "INT32", [1, 1], [-2])), {}, {400},
     "max_per_genre"),
    ("history of 1,001 ids", "POST", INFER, body(UID, K5, t("history", "INT64", [1, 1001], list(range(1001)))), {},
     {400}, "1..1000"),
    ("fractional user id", "POST", INFER, body(t("user_id", "INT64", [1, 1], [1.5]), K5), {}, {400}, "whole numbers"),
    ("string data", "POST", INFER, body(t("user_id", "INT64", [1, 1], ["1"]), K5), {}, {400}, "list of numbers"),
    ("null data", "POST", INFER, body(t("user_id", "INT64", [1, 1], None), K5), {}, {400}, "no 'data'"),
    ("NaN literal", "POST", INFER, b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":[NaN]}]}',
     {}, {400}, "not valid JSON"),
    ("batch above max_batch_size", "POST", INFER, body(t("user_id", "INT64", [17, 1], [1] * 17),
                                                       t("k", "INT32", [17, 1], [5] * 17)), {}, {400}, "1..16"),
    ("binary header longer than the body", "POST", INFER, body(UID, K5), {"Inference-Header-Content-Length": "9999"},
     {400}, "Inference-Header-Content-Length"),
    ("binary size against shape", "POST", INFER,
     json.dumps({"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64",
                             "parameters": {"binary_data_size": 4}}, K5]}).encode() + b"\0" * 4,
     "HEADER", {400}, "needs 8 bytes"),
    ("unknown output", "POST", INFER, body(UID, K5, outputs=[{"name": "secrets"}]), {}, {400}, "unknown output"),
    ("internal model item_tower", "POST", "/v2/models/item_tower/infer", body(UID), {}, {404}, "not served"),
    ("unknown model", "POST", "/v2/models/nope/infer", body(UID), {}, {404}, "not served"),
    ("model repository index", "POST", "/v2/repository/index", b"", {}, {403}, "not public"),
    ("model load", "POST", "/v2/repository/models/recommend/load", b"{}", {}, {403}, "not public"),
    ("model unload", "POST", "/v2/repository/models/recommend/unload", b"{}", {}, {403}, "not public"),
    ("shared memory register", "POST", "/v2/systemsharedmemory/region/x/register",
     b'{"key": "/x", "offset": 0, "byte_size": 8}', {}, {403}, "not public"),
    ("shared memory status", "GET", "/v2/systemsharedmemory/status", b"", {}, {403}, "not public"),
    ("log settings", "POST", "/v2/logging", b'{"log_verbose_level": 9}', {}, {403}, "not public"),
    ("trace settings", "POST", "/v2/trace/setting", b"{}", {}, {403}, "not public"),
    ("statistics", "GET", "/v2/models/recommend/stats", b"", {}, {403, 404}, ""),
    ("GET on infer", "GET", INFER, b"", {}, {403, 405}, ""),
    ("DELETE a model", "DELETE", "/v2/models/recommend", b"", {}, {403}, ""),
    ("16 KB header", "POST", INFER, body(UID, K5), {"X-Big": "a" * 16_000}, {400, 414, 431, 494}, ""),
    ("catalogue: too many ids", "POST", "/v2/models/catalogue/infer",
     body(t("item_ids", "INT64", [1, 1001], list(range(1001)))), {}, {400}, "1..1000"),
]

LEAKS = ("Traceback", ".py", "/work/", "site-packages", "File \"")


def leaks(text: str) -> list[str]:
    return [w for w in LEAKS if w in text]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_http_input_gets_a_clear_4xx_and_the_server_keeps_answering(served, expected, case):
    name, method, path, data, headers, statuses, words = case
    if headers == "HEADER":     # the binary extension: the JSON part's length in a header
        header_len = len(data) - 4
        headers = {"Inference-Header-Content-Length": str(header_len)}
    r = requests.request(method, f"http://{served.url('http')}{path}", data=data,
                         headers={"Content-Type": "application/json", **headers}, timeout=10)
    assert r.status_code in statuses, f"{name}: {r.status_code} {r.text[:300]}"
    message = r.json()["error"] if r.text.startswith("{") else r.text
    assert words.lower() in message.lower(), f"{name}: {message!r} does not say {words!r}"
    assert not leaks(message), f"{name}: the answer leaks {leaks(message)}: {message[:300]}"
    still_serving(served, expected)


# -- gRPC: straight to Triton (its protobuf frontend checks sizes); the models and the admin key do the rest ------

def _grpc_stub(served):
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.url("grpc")))


def _request(model: str, tensors: list[tuple[str, str, list[int], np.ndarray]], outputs=()):
    r = service_pb2.ModelInferRequest(model_name=model)
    for name, dtype, shape, arr in tensors:
        x = r.inputs.add()
        x.name, x.datatype = name, dtype
        x.shape.extend(shape)
        r.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    for o in outputs:
        r.outputs.add().name = o
    return r


@pytest.fixture(scope="module")
def ranker_inputs(served, users):
    """A good ranker request (the retrieval step's answer for one user), as name -> (dtype, array)."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(served.url("grpc"))
    ins = []
    for name, dtype, value in (("user_id", "INT64", users[0]), ("k", "INT32", 5)):
        x = grpcclient.InferInput(name, [1, 1], dtype)
        x.set_data_from_numpy(np.array([[value]], dtype=np.int64 if dtype == "INT64" else np.int32))
        ins.append(x)
    out = c.infer("retrieval", ins)
    names = ("user_idx", "user_vec", "context_hour", "context_weekday", "cand_idx", "cand_src")
    got = {n: out.as_numpy(n) for n in names}
    return {n: ("INT64" if got[n].dtype == np.int64 else "FP32", got[n]) for n in names} | \
        {"k": ("INT32", np.array([[5]], np.int32))}


def _ranker(inputs: dict, **changes) -> list:
    merged = {**inputs}
    for name, value in changes.items():
        dtype, arr = merged[name]
        merged[name] = (dtype, value(arr.copy()))
    return [(n, d, list(a.shape), a) for n, (d, a) in merged.items()]


def _set(idx, value):
    def f(a):
        a.reshape(-1)[idx] = value
        return a
    return f


def grpc_cases(served, ri):
    one = np.array([[1]], np.int64)
    k5 = np.array([[5]], np.int32)
    n_items = len(np.load(served.repository / "catalogue" / "1" / "items.npz")["item_ids"])
    return [
        ("missing k", _request("recommend", [("user_id", "INT64", [1, 1], one)]), "k"),
        ("wrong datatype", _request("recommend", [("user_id", "FP32", [1, 1], np.ones((1, 1), np.float32)),
                                                  ("k", "INT32", [1, 1], k5)]), "data-type"),
        ("raw bytes against shape", _request("recommend", [("user_id", "INT64", [4, 1], one),
                                                           ("k", "INT32", [4, 1], np.full((4, 1), 5, np.int32))]),
         "byte size"),
        ("shape [1e9, 1]", _request("recommend", [("user_id", "INT64", [1_000_000_000, 1], one),
                                                  ("k", "INT32", [1, 1], k5)]), "batch size"),
        ("unknown model", _request("nope", [("user_id", "INT64", [1, 1], one)]), "nope"),
        ("k out of range", _request("recommend", [("user_id", "INT64", [1, 1], one),
                                                  ("k", "INT32", [1, 1], np.array([[0]], np.int32))]), "k=0"),
        ("unknown user at the retrieval step", _request("retrieval", [
            ("user_id", "INT64", [1, 1], np.array([[987654321]])), ("k", "INT32", [1, 1], k5)]), "unknown user_id"),
        ("explore without a seed", _request("recommend", [("user_id", "INT64", [1, 1], one), ("k", "INT32", [1, 1], k5),
                                                          ("explore", "INT32", [1, 1], np.array([[2]], np.int32))]),
         "explore needs a seed"),
        ("hour out of range", _request("recommend", [("user_id", "INT64", [1, 1], one), ("k", "INT32", [1, 1], k5),
                                                     ("hour", "INT64", [1, 1], np.array([[99]]))]), "hour=99"),
        ("ranker: candidate index out of range", _request("ranker", _ranker(ri, cand_idx=_set(0, 10**9))),
         "cand_idx=1000000000"),
        ("ranker: negative candidate index", _request("ranker", _ranker(ri, cand_idx=_set(0, -5))), "cand_idx=-5"),
        ("ranker: user index out of range", _request("ranker", _ranker(ri, user_idx=_set(0, 10**6))), "user_idx"),
        ("ranker: NaN source score", _request("ranker", _ranker(ri, cand_src=_set(3, np.nan))), "NaN"),
        ("ranker: infinite user vector", _request("ranker", _ranker(ri, user_vec=_set(0, np.inf))), "NaN or infinity"),
        ("ranker: k out of range", _request("ranker", _ranker(ri, k=_set(0, 0))), "k=0"),
        ("ranker: hour out of range", _request("ranker", _ranker(ri, context_hour=_set(0, 31))), "context_hour=31"),
        ("item tower: item index out of range", _request("item_tower", [
            ("item_idx", "INT64", [1, 1], np.array([[n_items + 7]])),
            ("item_genres", "FP32", [1, _genres(served)], np.zeros((1, _genres(served)), np.float32)),
            ("item_year", "INT64", [1, 1], np.zeros((1, 1), np.int64))]), "item_idx"),
        ("item tower: year bucket out of range", _request("item_tower", [
            ("item_idx", "INT64", [1, 1], np.zeros((1, 1), np.int64)),
            ("item_genres", "FP32", [1, _genres(served)], np.zeros((1, _genres(served)), np.float32)),
            ("item_year", "INT64", [1, 1], np.array([[10_000]]))]), "item_year"),
        ("catalogue: too many ids", _request("catalogue", [("item_ids", "INT64", [1, 1001],
                                                            np.arange(1001).reshape(1, -1))]), "at most"),
        ("unknown output", _request("recommend", [("user_id", "INT64", [1, 1], one), ("k", "INT32", [1, 1], k5)],
                                    outputs=["secrets"]), "secrets"),
    ]


def _genres(served) -> int:
    from recserve.serving.repository import parse

    cfg = parse((served.repository / "item_tower" / "config.pbtxt").read_text())
    return int(next(i for i in cfg.input if i.name == "item_genres").dims[0])


def test_bad_grpc_input_gets_invalid_argument_naming_it_and_the_server_keeps_answering(served, expected,
                                                                                       ranker_inputs):
    stub = _grpc_stub(served)
    cases = grpc_cases(served, ranker_inputs)
    assert len(cases) + len(HTTP_CASES) >= 40 + 10
    for name, request, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
            pytest.fail(f"{name}: answered")
        code, details = err.value.code(), err.value.details()
        allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        if name == "unknown model":
            allowed.add(grpc.StatusCode.UNAVAILABLE)
        assert code in allowed, f"{name}: {code} {details}"
        assert words.lower() in details.lower(), f"{name}: {details!r} does not say {words!r}"
        assert not leaks(details), f"{name}: leaks {leaks(details)}: {details}"
        still_serving(served, expected)
    record("bad input", http_kinds=len(HTTP_CASES), grpc_kinds=len(cases))


def _admin_calls(stub):
    return {
        "repository index": lambda md: stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=md),
        "model unload": lambda md: stub.RepositoryModelUnload(
            service_pb2.RepositoryModelUnloadRequest(model_name="__none__"), metadata=md),
        "shared memory register": lambda md: stub.SystemSharedMemoryRegister(
            service_pb2.SystemSharedMemoryRegisterRequest(name="x", key="/x", byte_size=8), metadata=md),
        "log settings": lambda md: stub.LogSettings(service_pb2.LogSettingsRequest(), metadata=md),
        "statistics": lambda md: stub.ModelStatistics(service_pb2.ModelStatisticsRequest(), metadata=md),
        "trace settings": lambda md: stub.TraceSetting(service_pb2.TraceSettingRequest(), metadata=md),
    }


def test_admin_apis_over_grpc_are_closed_at_the_front_door_and_need_the_key_behind_it(served):
    public = _admin_calls(_grpc_stub(served))
    admin = tuple(served.server.admin_grpc_headers.items())
    for name, call in public.items():
        with pytest.raises(grpc.RpcError) as err:
            call(admin)                     # not even with the key: the front door routes inference and health only
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, f"{name}: {err.value}"
        assert "not public" in err.value.details()
    internal = _admin_calls(service_pb2_grpc.GRPCInferenceServiceStub(
        grpc.insecure_channel(served.server.admin_grpc_url)))
    for name, call in internal.items():
        with pytest.raises(grpc.RpcError) as err:
            call(())
        assert "restricted" in err.value.details(), f"{name}: {err.value.details()}"
    assert internal["repository index"](admin).models          # the key opens them on Triton's own port
    assert internal["statistics"](admin).model_stats


@pytest.mark.long
def test_a_bad_request_fails_only_itself_under_good_load(served, users, ranker_inputs, request):
    """8 threads of good ranker and recommend calls, one thread of bad ranker calls straight at the model:
    every good call succeeds (the step computes each request alone when a merged batch fails)."""
    stub = _grpc_stub(served)
    good_ranker = _request("ranker", _ranker(ranker_inputs))
    bad_ranker = _request("ranker", _ranker(ranker_inputs, cand_idx=_set(0, 10**9)))
    goods = [good_ranker, _request("recommend", [("user_id", "INT64", [1, 1], np.array([[users[0]]])),
                                                 ("k", "INT32", [1, 1], np.array([[5]], np.int32))])]
    seconds = 20.0 if long_run(request) else 4.0
    stop = threading.Event()
    counts = {"good": 0, "good_failed": 0, "bad": 0, "bad_rejected": 0}
    lock = threading.Lock()
    errors: list[str] = []

    def good(i):
        while not stop.is_set():
            try:
                stub.ModelInfer(goods[i % 2], timeout=10)
                ok = True
            except grpc.RpcError as e:
                ok = False
                errors.append(f"{e.code()}: {e.details()[:200]}")
            with lock:
                counts["good"] += 1
                counts["good_failed"] += not ok

    def bad():
        while not stop.is_set():
            try:
                stub.ModelInfer(bad_ranker, timeout=10)
                rejected = False
            except grpc.RpcError as e:
                rejected = e.code() == grpc.StatusCode.INVALID_ARGUMENT
                if not rejected:
                    errors.append(f"bad: {e.code()}: {e.details()[:200]}")
            with lock:
                counts["bad"] += 1
                counts["bad_rejected"] += rejected

    with cf.ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(good, i) for i in range(8)] + [pool.submit(bad)]
        stop.wait(seconds)
        stop.set()
        for f in futures:
            f.result()
    record("neighbours", seconds=seconds, **counts)
    assert counts["good"] > 50 and counts["bad"] > 10, counts
    assert counts["good_failed"] == 0, (counts, sorted(set(errors))[:5])
    assert counts["bad_rejected"] == counts["bad"], counts


def test_the_recommend_cli_prints_one_line_when_pointed_at_the_wrong_port(served):
    import subprocess
    import sys

    for protocol, port in (("http", served.grpc_port), ("grpc", served.http_port)):
        r = subprocess.run([sys.executable, "-m", "recserve", "recommend", "--user", "1", "--protocol", protocol,
                            "--url", f"127.0.0.1:{port}", "--timeout", "5"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert "Traceback" not in r.stderr


def test_recommend_answers_the_same_over_both_protocols_after_the_matrix(served, expected):
    still_serving(served, expected)
    r = requests.post(f"http://{served.url('http')}{INFER}", json=recommend_json(next(iter(expected))), timeout=10)
    assert r.status_code == 200
