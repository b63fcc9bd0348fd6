"""Ask a running Triton server for recommendations, over gRPC or HTTP.

Two modes give the same answer: ``ensemble`` makes one call to the server-side ensemble
``recommend``; ``pipeline`` makes one call per step of the ensemble and passes each step's arrays on
untouched, which shows what the ensemble does and lets a test compare the two. Both follow the serving
spec (``recserve/serving/spec.py``): the steps, their tensors and their wiring are read from there.
Titles come from the ``catalogue`` model, off the hot path, only when asked for (and are cached).

Every failure leaves as a :class:`~recserve.errors.RecserveError`: tritonclient's exceptions
and the socket errors of the HTTP client are mapped in one place, :func:`_map_error`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recserve.errors import ArtifactError, ClientError, RecserveError, ServerError, UnknownUserError
from recserve.serving import spec

__all__ = ["RecClient", "Recommendation", "RecommendedItem", "DEFAULT_URLS", "MODES", "PROTOCOLS"]

PROTOCOLS = ("grpc", "http")
MODES = ("ensemble", "pipeline")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
RESPONSE = tuple(t.name for t in spec.RESPONSE)
OPTION_RESPONSE = tuple(t.name for t in spec.OPTION_RESPONSE)
_CONNECTION_WORDS = ("connect", "socket", "dns", "unreachable", "name resolution")
INSTALL_FIX = "pip install 'tritonclient[grpc,http]>=2.50,<2.53'"


@dataclass(frozen=True)
class RecommendedItem:
    """One recommended item: its raw id, the ranker's score, its title ("" unless titles were asked for) and,
    when the request explored, the policy's probability of it at its position (for off-policy evaluation)."""

    item_id: int
    score: float
    title: str
    propensity: float | None = None


@dataclass(frozen=True)
class Recommendation:
    """The answer for one user, best item first, and where it came from (`spec.SOURCES`)."""

    user: int
    mode: str
    items: list[RecommendedItem] = field(default_factory=list)
    source: str = "personalized"
    version: str = ""          # the model version that answered (an A/B split's arms are versions)
    request_id: str = ""       # set when the client logs events: what `RecClient.click` refers to

    def as_dict(self) -> dict[str, Any]:
        """``{"user": ID, "mode": ..., "source": ..., "items": [{"item_id", "score", "title"[, "propensity"]}]}``."""
        return {
            "user": self.user,
            "mode": self.mode,
            "source": self.source,
            "items": [{"item_id": it.item_id, "score": it.score, "title": it.title,
                       **({"propensity": it.propensity} if it.propensity is not None else {})} for it in self.items],
        }

    def to_json(self) -> str:
        """:meth:`as_dict` as one line of JSON."""
        return json.dumps(self.as_dict(), ensure_ascii=False)

    @property
    def item_ids(self) -> list[int]:
        """The recommended raw item ids, best first."""
        return [it.item_id for it in self.items]


def _server_message(exc: Any) -> str:
    """The server's message without tritonclient's ``[status]`` prefix, on one line."""
    message = exc.message() or str(exc)
    # Triton's messages can carry a python traceback with escaped newlines: keep the first line.
    return " ".join(str(message).split("\\n")[0].split()) or type(exc).__name__


def _is_gevent_timeout(exc: BaseException) -> bool:
    try:
        from gevent import Timeout
    except ImportError:
        return False
    return isinstance(exc, Timeout)


class Overloaded(ServerError):
    """The server shed the request (HTTP 503, or gRPC UNAVAILABLE: overloaded, or restarting); `infer` retries it."""


# Retries of a shed request: full-jitter exponential backoff from 10 ms, capped at 200 ms a pause, within the
# call's timeout.
RETRY_BASE_S, RETRY_CAP_S = 0.01, 0.2
AB_REFRESH_S = 10.0     # how often the client looks again at recommend's config for an A/B split
_SHED_WORDS = ("queue", "overloaded", "too many requests", "retry shortly")


def _map_error(exc: BaseException, *, model: str | None, where: str, timeout: float) -> RecserveError:
    """Turn one tritonclient / socket exception into the recserve error a user can act on."""
    from tritonclient.utils import InferenceServerException

    timed_out = f"the Triton server at {where} timed out after {timeout:g} s; raise --timeout or check the server"
    down = f"no Triton server answers at {where}: start one with `recserve serve`"
    if isinstance(exc, InferenceServerException):
        status = exc.status() or ""
        if "DEADLINE_EXCEEDED" in status:
            return ServerError(timed_out)
        message = _server_message(exc)
        if status == "503" or ("UNAVAILABLE" in status and any(w in message.lower() for w in _SHED_WORDS)):
            return Overloaded(f"the server at {where} shed the request: {message}")
        if "UNAVAILABLE" in status:
            # gRPC's own "failed to connect" / "Socket closed" versus Triton saying a model is not ready.
            if any(word in message.lower() for word in _CONNECTION_WORDS):
                return ServerError(down)
            target = f"model '{model}'" if model else "the server"
            return ServerError(f"{target} at {where} is unavailable: {message}; wait until the server is ready")
        if "unknown user" in message.lower():
            return UnknownUserError(message)
        target = f"model '{model}'" if model else "the server"
        return ClientError(f"{target} at {where} rejected the request: {message}")
    if isinstance(exc, ConnectionRefusedError):
        return ServerError(down)
    # socket.timeout is TimeoutError; gevent's Timeout (a BaseException) comes from the HTTP client.
    if isinstance(exc, TimeoutError) or _is_gevent_timeout(exc):
        return ServerError(timed_out)
    return ServerError(f"{down} ({type(exc).__name__}: {exc})")


class _Transport:
    """The protocol difference in one place: numpy arrays in, numpy arrays out."""

    def __init__(self, protocol: str, url: str, timeout: float) -> None:
        self.protocol, self.timeout = protocol, timeout
        self.where = f"{url} ({protocol})"
        self.last_version = ""      # model_version of the last answer
        self.retry_shed = True      # off behind _Replicas, which tries another replica first
        try:
            if protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError as exc:
            raise ClientError(f"tritonclient[{protocol}] is not installed ({exc}); run `{INSTALL_FIX}`.") from None
        from tritonclient.utils import InferenceServerException

        self._module = module
        # What a dead, slow or unreachable server raises: tritonclient's own exception over gRPC;
        # socket errors and gevent's Timeout (a BaseException) from the HTTP client.
        catch: list[type[BaseException]] = [InferenceServerException, OSError]
        if protocol == "http":
            with contextlib.suppress(ImportError):
                from gevent import Timeout

                catch.append(Timeout)
        self._catch = tuple(catch)
        with self._guard(None):
            if protocol == "grpc":
                self._client = module.InferenceServerClient(url)
            else:
                self._client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)

    @contextlib.contextmanager
    def _guard(self, model: str | None) -> Iterator[None]:
        try:
            yield
        except self._catch as exc:
            raise _map_error(exc, model=model, where=self.where, timeout=self.timeout) from None
        except RecserveError:
            raise
        except Exception as exc:   # e.g. an HTTP client reading a gRPC port: one line, never a traceback
            other = "gRPC" if self.protocol == "http" else "HTTP"
            raise ServerError(f"the server at {self.where} answered in a way {self.protocol} cannot read "
                              f"({type(exc).__name__}); is that the {other} port? (defaults: gRPC 8001, HTTP 8000)"
                              ) from None

    def _timeout_kwargs(self) -> dict[str, float]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Iterable[str],
              version: str = "") -> dict[str, np.ndarray]:
        """One inference call (of `version`, or the one the server picks); the arrays keep their dtypes."""
        from tritonclient.utils import np_to_triton_dtype

        names = list(outputs)
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            try:
                with self._guard(model):
                    requests = []
                    for name, array in inputs.items():
                        infer_input = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                        infer_input.set_data_from_numpy(array)
                        requests.append(infer_input)
                    wanted = [self._module.InferRequestedOutput(name) for name in names]
                    result = self._client.infer(model, requests, model_version=version, outputs=wanted,
                                                **self._timeout_kwargs())
                    arrays = {name: result.as_numpy(name) for name in names}
                    response = result.get_response() if hasattr(result, "get_response") else None
                    self.last_version = str(response.get("model_version", "") if isinstance(response, dict)
                                            else getattr(response, "model_version", ""))
                break
            except Overloaded:
                # shed by the server: back off (exponential, full jitter) and retry within the deadline
                pause = random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt))
                if not self.retry_shed or time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
        missing = [name for name, array in arrays.items() if array is None]
        if missing:
            raise ClientError(f"model '{model}' at {self.where} returned no {', '.join(missing)}; "
                              "the repository does not follow model_repository/README.md, re-export it.")
        return arrays

    def model_config(self, model: str) -> dict[str, Any]:
        """The model's config as a dict (model_config.proto field names)."""
        with self._guard(model):
            if self.protocol == "grpc":
                return self._client.get_model_config(model, as_json=True, **self._timeout_kwargs())["config"]
            return self._client.get_model_config(model)

    def is_ready(self) -> bool:
        with self._guard(None):
            return bool(self._client.is_server_ready(**self._timeout_kwargs()))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


class _Replicas:
    """Several servers behind one client: each call starts at the next replica (round robin); a replica that is
    down, unreachable or shedding is skipped for `COOLDOWN_S` and the call goes to the next one, with jittered
    backoff once every replica failed, within the call's timeout. A request the server refused (ClientError) is
    not retried elsewhere."""

    COOLDOWN_S = 1.0

    def __init__(self, protocol: str, urls: list[str], timeout: float) -> None:
        self.replicas = [_Transport(protocol, u, timeout) for u in urls]
        for r in self.replicas:
            r.retry_shed = False
        self.timeout, self.protocol = timeout, protocol
        self.where = ", ".join(r.where for r in self.replicas)
        self.last_version = ""
        self.failovers = 0
        self._next = 0
        self._down_until = [0.0] * len(self.replicas)

    def _call(self, fn):
        deadline = time.monotonic() + self.timeout
        last: ServerError | None = None
        for attempt in itertools.count():
            now, n = time.monotonic(), len(self.replicas)
            order = [(self._next + j) % n for j in range(n)]
            order = [i for i in order if self._down_until[i] <= now] + [i for i in order if self._down_until[i] > now]
            for i in order:
                try:
                    out = fn(self.replicas[i])
                except ClientError:
                    raise
                except ServerError as exc:
                    last = exc
                    self._down_until[i] = time.monotonic() + self.COOLDOWN_S
                    self.failovers += 1
                    continue
                self._next = (i + 1) % n
                self.last_version = self.replicas[i].last_version
                return out
            pause = random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt))
            if time.monotonic() + pause >= deadline:
                assert last is not None
                raise ServerError(f"no replica answered within {self.timeout:g} s ({self.where}); the last: {last}")
            time.sleep(pause)

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Iterable[str],
              version: str = "") -> dict[str, np.ndarray]:
        names = list(outputs)
        return self._call(lambda r: r.infer(model, inputs, names, version))

    def model_config(self, model: str) -> dict[str, Any]:
        return self._call(lambda r: r.model_config(model))

    def is_ready(self) -> bool:
        return any(self._ready(r) for r in self.replicas)

    @staticmethod
    def _ready(r: _Transport) -> bool:
        try:
            return r.is_ready()
        except ServerError:
            return False

    def close(self) -> None:
        for r in self.replicas:
            r.close()


def _read_fallback(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("items"), list):
            raise ValueError("no 'items' list")
        return data
    except (OSError, ValueError, AttributeError) as exc:
        raise ClientError(f"fallback file {path} is not usable ({exc}): pass the repository's fallback.json, "
                          "written by `recserve export repository`") from None


def _freeze(options: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((n, v.tobytes()) for n, v in options.items()))


def _options(history, segment, exclude, max_per_genre, mmr_lambda, freshness, explore, seed) -> dict[str, np.ndarray]:
    """The request's optional tensors (spec.OPTIONS), only those that differ from the defaults."""
    out: dict[str, np.ndarray] = {}
    for name, values in (("history", history), ("segment", segment), ("exclude", exclude)):
        if values is not None:
            ids = [int(v) for v in values]
            if name != "segment" and not ids:
                continue
            if not ids or len(ids) > spec.MAX_WIDTH:
                raise ClientError(f"{name} holds {len(ids)} ids: send 1..{spec.MAX_WIDTH}")
            out[name] = np.array([ids], dtype=np.int64)
    if max_per_genre:
        out["max_per_genre"] = _one(_check_range("max_per_genre", max_per_genre, 0, 10**6), np.int32)
    for name, value, default, low, high in (("mmr_lambda", mmr_lambda, 1.0, 0.0, 1.0),
                                            ("freshness", freshness, 0.0, -1e6, 1e6)):
        if value != default:
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise ClientError(f"{name}={value!r} is out of range: choose {low:g}..{high:g}")
            out[name] = np.array([[value]], dtype=np.float32)
    if explore not in (None, "", "none"):
        from recserve.rules import EXPLORE, Rules

        try:
            parsed = Rules.parse_explore(explore)
        except ValueError as exc:
            raise ClientError(f"explore={explore!r}: {exc}") from None
        mode = parsed["explore"]
        out["explore"] = _one(EXPLORE.index(mode), np.int32)       # the code `recommend` reads
        out["explore_param"] = np.array([[parsed["epsilon" if mode == "epsilon" else "temperature"]]], np.float32)
        out["seed"] = _one(random.SystemRandom().randrange(2**31) if seed is None else
                           _check_range("seed", seed, 0, 2**62), np.int64)
    return out


def _rules_of(options: dict[str, np.ndarray]):
    """The `recserve.rules.Rules` the served `recommend` reads from the same option tensors."""
    from recserve.rules import rules_from_options

    return rules_from_options(lambda name, default: options[name].reshape(-1)[0].item() if name in options
                              else default, options["exclude"][0] if "exclude" in options else ())


def _now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_range(name: str, value: object, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise ClientError(f"{name}={value!r} is out of range: choose {low}..{high}")
    return int(value)  # type: ignore[arg-type]


def _one(value: int, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)  # (1, 1): a batch of one row


def _decode(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RecClient:
    """A client for the served recommender.

    Args:
        url: ``HOST:PORT`` of the server; ``None`` means 127.0.0.1 on Triton's default port for
            the protocol (gRPC 8001, HTTP 8000). Several, separated by commas, are replicas: calls go round robin,
            and one that is down or shedding is skipped for a second (`_Replicas`).
        protocol: ``"grpc"`` or ``"http"``.
        timeout: seconds one call may take before :class:`ServerError` is raised.
        k_max: the most items one response carries; ``None`` reads it from the ``retrieval`` model's
            config on first use. Giving it spares that call (tests use it to validate ``k`` offline).
        fallback: a ``fallback.json`` that ``export repository`` writes (the popular list): when no server
            answers within ``timeout``, ``recommend`` returns its first k items with ``source="fallback"``
            instead of raising.
        cache_ttl: seconds a deterministic answer (no exploration) is reused for the same request; 0 = off.
        event_log: a file to append an `impression` per answer to, and a `click` per :meth:`click`
            (`recserve.events`: JSON lines, rotated); `recserve ab report` reads it.

    Raises:
        ClientError: a bad protocol or timeout.

    Example:
        >>> with RecClient(protocol="http") as client:  # doctest: +SKIP
        ...     print(client.recommend(42, k=5, titles=True).to_json())
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        timeout: float = 10.0,
        k_max: int | None = None,
        fallback: str | Path | None = None,
        cache_ttl: float = 0.0,
        event_log: str | Path | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ClientError(f"protocol={protocol!r} is not supported: choose 'grpc' or 'http'")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ClientError(f"timeout={timeout!r} must be a positive number of seconds")
        if k_max is not None and (not _is_int(k_max) or k_max < 1):
            raise ClientError(f"k_max={k_max!r} must be a positive integer (the repository's k-max)")
        self.protocol = protocol
        # TritonServer.url("http") includes the scheme; tritonclient's HTTP client refuses one.
        url = url or DEFAULT_URLS[protocol]
        self.url = url.removeprefix("http://") if protocol == "http" else url
        self.timeout = float(timeout)
        self._k_max = None if k_max is None else int(k_max)
        self._titles: dict[int, str] = {}
        self._fallback = _read_fallback(Path(fallback)) if fallback is not None else None
        if not isinstance(cache_ttl, (int, float)) or cache_ttl < 0:
            raise ClientError(f"cache_ttl={cache_ttl!r} must be a number of seconds >= 0")
        self.cache_ttl = float(cache_ttl)
        self._cache: dict[tuple, tuple[float, Recommendation]] = {}
        self.cache_hits = self.cache_misses = 0
        self._options_served: bool | None = None
        self._config: tuple[float, dict[str, Any]] | None = None
        self._years: tuple[float, float] | None = None
        self.fallbacks = 0          # answers from the fallback file, or (pipeline mode) in retrieval order
        urls = [u.strip().removeprefix("http://") if protocol == "http" else u.strip()
                for u in self.url.split(",") if u.strip()] if isinstance(self.url, str) else []
        if not urls:
            raise ClientError(f"url={url!r}: give HOST:PORT, or several separated by commas (replicas)")
        self._transport = _Transport(protocol, urls[0], self.timeout) if len(urls) == 1 else \
            _Replicas(protocol, urls, self.timeout)
        from recserve.events import EventLog

        self.events = EventLog(event_log) if event_log is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (and the event log); the client is not usable afterwards."""
        self._transport.close()
        if self.events is not None:
            self.events.close()

    def __enter__(self) -> RecClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecClient(url={self.url!r}, protocol={self.protocol!r}, timeout={self.timeout:g})"

    # -- server facts ------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """True when the server answers and every model is ready; False when nothing answers."""
        try:
            return self._transport.is_ready()
        except ServerError:
            return False

    def k_max(self) -> int:
        """The most items one response carries: the ``retrieval`` model config's ``k_max`` parameter (cached).

        Raises:
            ServerError: no server answers.
            ArtifactError: the parameter is missing or not a positive integer.
        """
        if self._k_max is None:
            first = spec.path()[0].name
            config = self._transport.model_config(first)
            raw = (config.get("parameters") or {}).get("k_max", {}).get("string_value")
            try:
                value = int(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                value = 0
            if value < 1:
                raise ArtifactError(f"model '{first}' at {self._transport.where} has k_max={raw!r} in its "
                                    "config parameters, not a positive integer; re-run `recserve export repository`")
            self._k_max = value
        return self._k_max

    def titles(self, item_ids: Iterable[int]) -> list[str]:
        """Titles of raw item ids from the ``catalogue`` model ("" for an unknown id); cached per id."""
        ids = [int(i) for i in item_ids]
        missing = sorted({i for i in ids if i not in self._titles})
        if missing:
            out = self._transport.infer("catalogue", {"item_ids": np.array([missing], dtype=np.int64)}, ("titles",))
            self._titles.update(zip(missing, (_decode(t) for t in out["titles"][0])))
        return [self._titles[i] for i in ids]

    # -- recommendations ---------------------------------------------------------------------------

    def recommend(
        self,
        user_id: int,
        k: int = 10,
        hour: int | None = None,
        weekday: int | None = None,
        mode: str = "ensemble",
        titles: bool = False,
        *,
        history: Iterable[int] | None = None,
        segment: Iterable[int] | None = None,
        exclude: Iterable[int] | None = None,
        max_per_genre: int = 0,
        mmr_lambda: float = 1.0,
        freshness: float = 0.0,
        explore: str | None = None,
        seed: int | None = None,
    ) -> Recommendation:
        """Recommend ``k`` items for one user (a user the model never saw gets popular, segment or history-based
        items; ``source`` says which).

        Args:
            user_id: the raw user id, as in the data set.
            k: how many items, 1..k_max.
            hour: hour of the request, 0..23; default now (UTC).
            weekday: day of the request, 0 = Monday .. 6; default today (UTC).
            mode: ``"ensemble"`` (one call) or ``"pipeline"`` (one call per step, then the rules and exploration
                applied here; a user the model never saw is answered by ``recommend``'s cold start).
            titles: also look the items' titles up (one more call, off the hot path, cached).
            history: the user's recent raw item ids, newest last (personalises an unknown user).
            segment: an unknown user's attribute codes, in the data set's order (popular in that segment).
            exclude: raw item ids never returned.
            max_per_genre: at most this many items of any one genre; 0 = off.
            mmr_lambda: diversity by maximal marginal relevance, 0..1; 1 = off.
            freshness: boost for newer items, in score units; 0 = off.
            explore: ``"epsilon:E"`` or ``"softmax:T"``; each item then carries its propensity.
            seed: the exploration's seed (a fresh random one when not given).

        Raises:
            ClientError: a bad argument (before any inference call) or a request the server rejected.
            UnknownUserError: pipeline mode, for a user the model does not know, when the served ``recommend`` has
                no cold start (the native flavor).
            ServerError: no server answers, or it timed out (unless a ``fallback`` file was given).
        """
        if mode not in MODES:
            raise ClientError(f"mode={mode!r} is not supported: choose 'ensemble' or 'pipeline'")
        if not _is_int(user_id) or not np.iinfo(np.int64).min <= user_id <= np.iinfo(np.int64).max:
            raise ClientError(f"user_id={user_id!r} is not a 64-bit integer: pass the raw user id from the data")
        now = _now_utc()
        hour = _check_range("hour", now.hour if hour is None else hour, 0, 23)
        weekday = _check_range("weekday", now.weekday() if weekday is None else weekday, 0, 6)
        if not _is_int(k) or k < 1:
            # Refused without a round trip; k_max is named when it is already known.
            high = self._k_max if self._k_max is not None else "k_max (the most items the server returns)"
            raise ClientError(f"k={k!r} is out of range: choose 1..{high}")
        options = _options(history, segment, exclude, max_per_genre, mmr_lambda, freshness, explore, seed)
        exploring = "explore" in options
        key = (int(user_id), int(k), hour, weekday, mode, titles, _freeze(options))
        if self.cache_ttl and not exploring:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                self.cache_hits += 1
                return hit[1]
            self.cache_misses += 1
        try:
            k = _check_range("k", k, 1, self.k_max())
            inputs = {
                "user_id": _one(user_id, np.int64),
                "k": _one(k, np.int32),
                "hour": _one(hour, np.int64),
                "weekday": _one(weekday, np.int64),
            }
            if mode == "ensemble":
                inputs.update(options)
                wanted = RESPONSE + (OPTION_RESPONSE if self._has_options() else ())
                arm_name, arm_version = self._arm(int(user_id))
                out = self._transport.infer(spec.ENSEMBLE, inputs, wanted,
                                            **({"version": arm_version} if arm_version else {}))
            else:
                try:
                    out = self._pipeline(inputs, options, k)
                except UnknownUserError:
                    if not self._has_options():     # the native flavor's `recommend` has no cold start either
                        raise
                    # a user the model never saw: the steps cannot rank for them; the embedded `recommend`'s cold
                    # start answers (popular in context, the segment's, or from `history`), and `source` says which
                    out = self._transport.infer(spec.ENSEMBLE, {**inputs, **options}, RESPONSE + OPTION_RESPONSE)
        except ServerError:
            if self._fallback is None:
                raise
            return self._from_fallback(int(user_id), k, mode)
        ids, scores = out["item_ids"][0], out["scores"][0]
        real = ids >= 0   # the native flavor pads rows to k_max with -1
        ids, scores = ids[real][:k], scores[real][:k]
        props = out["propensity"][0][real][:k] if exploring and "propensity" in out else [None] * len(ids)
        source = _decode(out["source"].reshape(-1)[0]) if "source" in out else "personalized"
        names = self.titles(ids) if titles else [""] * len(ids)
        items = [RecommendedItem(int(i), float(sc), t, None if pr is None else float(pr))
                 for i, sc, t, pr in zip(ids, scores, names, props)]
        version = self._transport.last_version if mode == "ensemble" else ""
        rec = Recommendation(user=int(user_id), mode=mode, items=items, source=source, version=version,
                             request_id=uuid.uuid4().hex if self.events is not None else "")
        if self.events is not None:
            self.events.write({"type": "impression", "request_id": rec.request_id, "user": rec.user,
                               "items": rec.item_ids, "source": source, "version": version,
                               **({"arm": arm_name} if mode == "ensemble" and arm_name else {}),
                               **({"propensities": [it.propensity for it in items]} if exploring else {})})
        if self.cache_ttl and not exploring:
            self._cache[key] = (time.monotonic() + self.cache_ttl, rec)
        return rec

    def click(self, rec: Recommendation, item_id: int) -> None:
        """Log that the user clicked `item_id` of the answer `rec` (needs `event_log`)."""
        if self.events is None:
            raise ClientError("click() logs to the event log: create the client with RecClient(event_log=PATH)")
        if int(item_id) not in rec.item_ids:
            raise ClientError(f"item {item_id} was not in recommendation {rec.request_id or '(unlogged)'}: "
                              f"it showed {rec.item_ids}")
        self.events.write({"type": "click", "request_id": rec.request_id, "user": rec.user, "item": int(item_id),
                           "position": rec.item_ids.index(int(item_id)), "version": rec.version})

    def _has_options(self) -> bool:
        """Whether the served `recommend` answers `source` / `propensity` (the embedded flavor; cached)."""
        if self._options_served is None:
            config = self._recommend_config()
            self._options_served = any(o.get("name") == "source" for o in config.get("output", []))
        return self._options_served

    def _recommend_config(self) -> dict[str, Any]:
        """`recommend`'s config, read again at most every AB_REFRESH_S (an A/B split starts and stops)."""
        now = time.monotonic()
        if self._config is None or now - self._config[0] > AB_REFRESH_S:
            self._config = (now, self._transport.model_config(spec.ENSEMBLE))
        return self._config[1]

    def _arm(self, user_id: int) -> tuple[str, str]:
        """(arm, version) of the user while an A/B split runs (`recserve ab start` writes it into recommend's
        config as `recserve_ab`); the version is asked for by name, so no server-side forwarding is needed.
        ("", "") without a split."""
        from recserve.serving.split import arm, read_split

        params = self._recommend_config().get("parameters", {})
        split = read_split({k: v.get("string_value", "") for k, v in params.items()})
        if not split:
            return "", ""
        name = arm(user_id, float(split["share"]), str(split["salt"]))
        return name, str(split[name])

    def _from_fallback(self, user_id: int, k: int, mode: str) -> Recommendation:
        self.fallbacks += 1
        items = [RecommendedItem(int(i["item_id"]), float(i["score"]), str(i.get("title", "")))
                 for i in self._fallback["items"][:k]]   # type: ignore[index]
        return Recommendation(user=user_id, mode=mode, items=items, source="fallback")

    def recommend_many(
        self,
        user_ids: Iterable[int],
        k: int = 10,
        hour: int | None = None,
        weekday: int | None = None,
        mode: str = "ensemble",
    ) -> list[Recommendation]:
        """:meth:`recommend` for each user in turn (one request per user, same arguments)."""
        return [self.recommend(user, k=k, hour=hour, weekday=weekday, mode=mode) for user in user_ids]

    def _pipeline(self, inputs: dict[str, np.ndarray], options: dict[str, np.ndarray], k: int
                  ) -> dict[str, np.ndarray]:
        """The ensemble's steps, one call each, wired as the serving spec wires them on the server; then the
        rules and exploration of `recserve.rules` here, as the embedded `recommend` applies them.

        When the last step (the ranker) fails, the retrieval order is served (`source` "fallback"), with raw ids
        from the `catalogue`; a failing retrieval raises ServerError (the `fallback` file then answers)."""
        from recserve.ranking import top_positions

        rules = _rules_of(options)
        tensors = dict(inputs)
        if rules.reorders or rules.exclude:       # the rules choose k of the ranker's k_max best, as on the server
            tensors["k"] = _one(self.k_max(), np.int32)
        steps = spec.wiring()
        source = "personalized"
        for n, (step, wiring) in enumerate(steps):
            feed = {name: tensors[src] for name, src in wiring.items() if src in tensors}
            try:
                tensors.update(self._transport.infer(step.name, feed, step.output_names))
            except ServerError:
                if n < len(steps) - 1 or "cand_idx" not in tensors:
                    raise
                self.fallbacks += 1
                cand, blend = tensors["cand_idx"][0], tensors["cand_src"][0, :, 0]
                pos = top_positions(np.where(cand >= 0, blend, -np.inf)[None, :], self.k_max())[0]
                pos = pos[cand[pos] >= 0]
                raw = self._items(item_idx=cand[pos])["raw_item_ids"]
                tensors["item_ids"], tensors["scores"] = raw[None, :], blend[pos][None, :].astype(np.float32)
                source = "fallback"
        out = {name: tensors[name] for name in RESPONSE}
        out["source"] = np.array([[source.encode()]], dtype=object)
        if rules.reorders or rules.exclude:
            from recserve.rules import ItemTable, apply_rules

            table = None
            ids = out["item_ids"]
            if rules.needs_items:
                real = ids[0][ids[0] >= 0]
                meta = self._items(item_ids=real)
                table = ItemTable.build(real, meta["item_genres"], meta["item_year"], meta["item_vec"],
                                        year_range=self._year_range())
            got, scores, prop = apply_rules(ids, out["scores"], k, rules, table)
            out.update(item_ids=got, scores=scores, propensity=prop)
        return out

    def _items(self, **by: np.ndarray) -> dict[str, np.ndarray]:
        """The catalogue's rows (titles, raw ids, genres, years, vectors) of raw ids or dense indices."""
        (name, values), = by.items()
        wanted = [t.name for t in spec.step("catalogue").outputs]
        if len(values) == 0:
            return {n: np.zeros((0,), np.int64) for n in wanted}
        out = self._transport.infer("catalogue", {name: np.asarray(values, np.int64)[None, :]}, wanted)
        return {n: v[0] for n, v in out.items()}

    def _year_range(self) -> tuple[float, float]:
        """The catalogue's year range (its config), which the freshness rule scales by; cached."""
        if self._years is None:
            params = self._transport.model_config("catalogue").get("parameters", {})
            self._years = (float(params["year_min"]["string_value"]), float(params["year_max"]["string_value"]))
        return self._years
