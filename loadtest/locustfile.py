"""Locust load test for the served recommender: one ``TritonUser`` for gRPC or HTTP, ensemble or pipeline.

Follows locust's ``examples/grpc/grpc_user.py``: the user wraps a client (here :class:`recserve.client.RecClient`)
and fires ``events.request`` with the time it measured, so locust's statistics, CSV files and web UI work
as for HTTP. ``--host`` is ``HOST:PORT`` of the server's gRPC or HTTP endpoint (no scheme).

Settings come from flags, environment variables or a locust config file, never from edits to this file::

    locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 30s --host 127.0.0.1:8001 \\
        --protocol grpc --users-from work/artifacts/onnx/user_features.npz --csv work/locust

| flag | environment | default |
|---|---|---|
| ``--protocol grpc|http`` | ``RECSERVE_PROTOCOL`` | grpc |
| ``--mode ensemble|pipeline`` | ``RECSERVE_MODE`` | ensemble |
| ``--k N`` | ``RECSERVE_K`` | 10 |
| ``--users-from NPZ`` (key ``user_ids``) | ``RECSERVE_USERS_FROM`` | |
| ``--user-ids-file FILE`` (text, one id a line) | ``RECSERVE_USER_IDS_FILE`` | |
| ``--request-timeout S`` | ``RECSERVE_TIMEOUT`` | 10 |
| ``--think-time S`` (wait between a user's requests) | ``RECSERVE_THINK_TIME`` | 0 |

Locust's own options keep their ``LOCUST_*`` variables (``LOCUST_HOST``, ``LOCUST_USERS``, ...).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from pathlib import Path

# Before anything opens a gRPC channel: make grpcio cooperate with gevent, as locust's gRPC example does.
# Without it, every blocking gRPC call stalls all users of this locust process.
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, events, task

from recserve.client import RecClient
from recserve.errors import RecserveError

grpc_gevent.init_gevent()

PROTOCOLS = ("grpc", "http")
MODES = ("ensemble", "pipeline")


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    """Register the recserve options with locust's parser (they also show in the web UI)."""
    group = parser.add_argument_group("recserve", "What TritonUser asks the Triton server")
    group.add_argument("--protocol", choices=PROTOCOLS, default="grpc", env_var="RECSERVE_PROTOCOL",
                       help="grpc or http; --host must be that endpoint's HOST:PORT")
    group.add_argument("--mode", choices=MODES, default="ensemble", env_var="RECSERVE_MODE",
                       help="ensemble: one call to `recommend`; pipeline: one call per stage")
    group.add_argument("--k", type=int, default=10, env_var="RECSERVE_K", help="items per recommendation")
    group.add_argument("--users-from", default="", env_var="RECSERVE_USERS_FROM",
                       help="an .npz with a `user_ids` array (ARTIFACTS/onnx/user_features.npz)")
    group.add_argument("--user-ids-file", default="", env_var="RECSERVE_USER_IDS_FILE",
                       help="a text file of raw user ids, one a line (alternative to --users-from)")
    group.add_argument("--request-timeout", type=float, default=10.0, env_var="RECSERVE_TIMEOUT",
                       help="seconds one request may take")
    group.add_argument("--think-time", type=float, default=0.0, env_var="RECSERVE_THINK_TIME",
                       help="seconds each simulated user waits between requests (0: closed loop)")


@functools.lru_cache(maxsize=8)
def load_user_ids(users_from: str = "", user_ids_file: str = "") -> tuple[int, ...]:
    """Raw user ids to sample from: an .npz's ``user_ids`` or a text file with one id a line.

    Raises:
        ValueError: neither source given, the file is missing, or it holds no ids (the message says which).
    """
    if users_from:
        path = Path(users_from)
        if not path.is_file():
            raise ValueError(f"--users-from {path} does not exist; run `recserve export onnx` or pass --user-ids-file")
        with np.load(path, allow_pickle=False) as z:
            if "user_ids" not in z.files:
                raise ValueError(f"--users-from {path} has no `user_ids` array (it has {', '.join(z.files)})")
            ids = tuple(int(u) for u in z["user_ids"].reshape(-1))
    elif user_ids_file:
        path = Path(user_ids_file)
        if not path.is_file():
            raise ValueError(f"--user-ids-file {path} does not exist")
        lines = path.read_text(encoding="utf-8").split()
        try:
            ids = tuple(int(line) for line in lines)
        except ValueError as exc:
            raise ValueError(f"--user-ids-file {path}: every line must be an integer user id ({exc})") from None
    else:
        raise ValueError("no user ids: pass --users-from ARTIFACTS/onnx/user_features.npz or --user-ids-file FILE")
    if not ids:
        raise ValueError(f"{users_from or user_ids_file} holds no user ids")
    return ids


@events.test_start.add_listener
def check_settings(environment, **_kwargs) -> None:
    """Fail before spawning when the user ids cannot be read: one clear line instead of a traceback per user."""
    opts = environment.parsed_options
    if opts is None or not hasattr(opts, "users_from"):
        return
    try:
        load_user_ids(opts.users_from, opts.user_ids_file)
    except ValueError as exc:
        logging.error("recserve locustfile: %s", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()


class TritonUser(User):
    """One simulated client: recommendations for random real users, timed and reported to locust."""

    # Replaced in tests; called as client_factory(url, protocol=..., timeout=...).
    client_factory = RecClient

    def __init__(self, environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        if opts is None:
            raise ValueError("TritonUser needs locust's parsed options: run it with `locust -f loadtest/locustfile.py`")
        if not self.host:
            raise ValueError("TritonUser needs --host HOST:PORT of the Triton endpoint for --protocol")
        self.protocol: str = opts.protocol
        self.mode: str = opts.mode
        self.k: int = opts.k
        self.timeout: float = opts.request_timeout
        self.think_time: float = opts.think_time
        self.user_ids = load_user_ids(opts.users_from, opts.user_ids_file)
        self.name = f"recommend[{self.mode}]"
        self.client: RecClient | None = None

    def wait_time(self) -> float:
        return self.think_time

    def on_start(self) -> None:
        # The scheme, if a user typed one, is not part of a tritonclient URL.
        url = self.host.split("://", 1)[-1].rstrip("/")
        self.client = self.client_factory(url, protocol=self.protocol, timeout=self.timeout)
        # Fetch k_max (the retrieval model config) now, so the first timed request is a recommendation only.
        # A server that is down shows up as failed requests below, not as a crash here.
        with contextlib.suppress(RecserveError):
            self.client.k_max()

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    @task
    def recommend(self) -> None:
        """One recommendation for a random known user, at a random hour and weekday."""
        user = random.choice(self.user_ids)
        hour, weekday = random.randrange(24), random.randrange(7)
        exception: Exception | None = None
        length = 0
        start_time = time.time()
        start = time.perf_counter()
        try:
            rec = self.client.recommend(user, k=self.k, hour=hour, weekday=weekday, mode=self.mode)
            length = len(rec.items)
        except Exception as exc:  # RecserveError by contract; anything else is a failure too, not a crash
            exception = exc
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=self.name,
            response_time=elapsed_ms,
            response_length=length,
            response=None,
            context={"user_id": user},
            exception=exception,
            start_time=start_time,
        )
