"""The served path run in-process: the same step code, graphs, index and tables as the server, no Triton.

The served-vs-offline parity test scores it over the test split, and the plain FastAPI baseline of the
serving benchmark serves it. It follows the serving spec's wiring, as the ensemble and the client do.

`serve` is the embedded `recommend` model's whole answer (spec.OPTIONS): every row gets a list and a `source`.
- a known user: retrieval, then the ranker graph (`personalized`); the ranker failing or taking longer than
  `ranker_timeout`: the retrieval order, and retrieval failing: popular items (both `fallback`, counted through
  `on_fallback`);
- an unknown user with a `history` of known items: the user tower run on that history (with the id of the
  user nearest the average, `items.npz` proxy_user, and the `segment` codes or the commonest ones), the same
  candidate rule over it, in retrieval order (`history`): the ranker's user features would be another user's;
- an unknown user with `segment` codes: popular in that segment (`segment`); otherwise popular and trending in
  the request's hour and weekday (`popular`), `recserve.coldstart`;
- then the rules and exploration of `recserve.rules` cut each list to k (propensity 1.0 without exploration).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from recserve.coldstart import load_cold
from recserve.ranking import PAD_ID, PAD_SCORE, top_positions
from recserve.rules import EXPLORE, ItemTable, Rules, apply_rules, rules_from_options
from recserve.serving import spec
from recserve.serving.steps.base import RequestError, ort_session
from recserve.serving.steps.retrieval import Retriever, check_request

OPTIONS_KEY = "__options"   # a checked request's parsed options, one (rules, history, segment) per row


class LocalPipeline:
    """`recommend` over a repository written by `recserve export repository`, in this process."""

    def __init__(self, repository: Path, threads: int = 1, ranker_timeout: float = 0.0, version: int | None = None):
        """`version`: which of the repository's model versions to run; the live one (the manifest's) by default.
        `ranker_timeout`: seconds, 0 = none (offline scoring: a busy machine must not turn a slow batch into the
        retrieval order); the served model sets its config's `ranker_timeout_ms`."""
        repository = Path(repository)
        manifest = json.loads((repository / "manifest.json").read_text())
        self.version = int(manifest.get("model_version", 1)) if version is None else int(version)
        if version is not None and str(version) in manifest.get("versions", {}):
            manifest = {**manifest, **manifest["versions"][str(version)]}
        self.k_max = int(manifest["k_max"])
        self.retriever = Retriever(repository / "retrieval" / str(self.version),
                                   {"k_max": str(self.k_max), "omp_threads": str(threads),
                                    "intra_op_threads": str(threads)})
        self.ranker = ort_session(repository / "ranker" / str(self.version) / "model.onnx", threads)
        self.ranker_inputs = spec.step("ranker").input_names
        self.outputs = [t.name for t in spec.RESPONSE]
        version = repository / "retrieval" / str(self.version)
        self.cold = load_cold(version / "cold.npz")
        with np.load(version / "items.npz") as z:
            self.items = ItemTable(z["item_ids"], z["genres"], z["year"], z["vectors"])
            self.proxy_user, self.history_len = int(z["proxy_user"]), int(z["history_len"])
        self.raw_tower = ort_session(version / "user_tower_raw.onnx", threads)
        self.on_fallback = lambda kind: None     # the served model counts them in a metric
        self.remote_rank = None                  # (feed, timeout s) -> [item_ids, scores]: the ranker elsewhere
        # The ranker's run is cut short past `ranker_timeout` seconds (ONNX Runtime's RunOptions.terminate, set by
        # one watchdog thread) and the retrieval order is served instead; a batch normally takes 1-10 ms.
        self.ranker_timeout = float(ranker_timeout)
        self._watch: tuple[object, float] | None = None
        self._watchdogs = 0
        self.serving_thread()

    def serving_thread(self) -> None:
        """(Re)start the watchdog from the calling thread. A thread keeps the nice value of the thread that
        started it, and the watchdog takes the GIL every 10 ms: started by a load at nice 19
        (recserve.serving.steps.gentle), it held the GIL while the scheduler kept it off the cores, and requests
        waited (c=1 throughput 0.6x). The served model calls this from the thread that answers requests."""
        if self.ranker_timeout > 0:
            self._watchdogs += 1
            threading.Thread(target=self._watchdog, args=(self._watchdogs,), name="ranker-watchdog",
                             daemon=True).start()

    def _watchdog(self, generation: int) -> None:
        while generation == self._watchdogs:        # a newer watchdog replaces this one
            time.sleep(min(0.01, self.ranker_timeout / 4))
            watch = self._watch
            if watch is not None and time.monotonic() > watch[1]:
                watch[0].terminate = True

    def _rank(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The ranker graph, with the timeout; raises when it fails or runs out of time. `remote_rank`, when set
        (the native flavor's `recommend`: the `ranker` model through BLS), runs it instead of this process."""
        if self.remote_rank is not None:
            return self.remote_rank(feed, self.ranker_timeout)
        if self.ranker_timeout <= 0:
            return self.ranker.run(self.outputs, feed)
        import onnxruntime as ort

        opts = ort.RunOptions()
        self._watch = (opts, time.monotonic() + self.ranker_timeout)
        try:
            return self.ranker.run(self.outputs, feed, run_options=opts)
        finally:
            self._watch = None

    # -- the embedded `recommend` model: every request answered, with its source -------------------------

    def options(self, request: dict[str, np.ndarray], row: int) -> tuple[Rules, np.ndarray | None, np.ndarray | None]:
        """(rules, history raw ids, segment codes) of one row; RequestError names a bad value."""
        def scalar(name, default):
            v = request.get(name)
            return default if v is None else v.reshape(len(v), -1)[row, 0].item()

        mode = int(scalar("explore", 0))
        if not 0 <= mode < len(EXPLORE):
            raise RequestError(f"explore={mode} is not known: 0 off, 1 epsilon-greedy, 2 softmax")
        if mode and request.get("seed") is None:
            raise RequestError("explore needs a seed (any integer >= 0): the draw is reproducible from it, and a "
                               "cached answer is then the one a new draw would give")
        exclude = request.get("exclude")
        try:
            rules = rules_from_options(scalar, exclude[row] if exclude is not None else ())
        except ValueError as exc:
            raise RequestError(str(exc).replace("epsilon", "explore_param (epsilon)", 1)
                               .replace("temperature", "explore_param (temperature)", 1)) from None
        history = request["history"][row] if "history" in request else None
        segment = request["segment"][row] if "segment" in request else None
        return rules, history, segment

    def serve(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Checked requests (`check_request(..., allow_unknown=True)` and `options` passed) -> per request:
        item_ids, scores, propensity ([B, w], -1 / lowest / 0 past each row's items), source and version ([B, 1]
        bytes)."""
        rows = [(i, r) for i, req in enumerate(requests) for r in range(len(req["user_id"]))]
        idx = np.array([int(requests[i]["user_idx"][r, 0]) for i, r in rows], np.int64)
        ranked_ids = np.full((len(rows), self.k_max), PAD_ID, np.int64)
        ranked_scores = np.full((len(rows), self.k_max), PAD_SCORE, np.float32)
        source = [""] * len(rows)
        known = np.flatnonzero(idx >= 0)
        if len(known):
            col = lambda name: np.concatenate([requests[rows[j][0]][name][rows[j][1]:rows[j][1] + 1]  # noqa: E731
                                               for j in known])
            ids, sc, how = self._personalized(idx[known], col("hour"), col("weekday"))
            ranked_ids[known], ranked_scores[known] = ids, sc
            for j in known:
                source[j] = how
        groups: dict[tuple[Rules, int], list[int]] = {}
        for j, (i, r) in enumerate(rows):
            req = requests[i]
            rules, history, segment = req[OPTIONS_KEY][r] if OPTIONS_KEY in req else self.options(req, r)
            if idx[j] < 0:
                ranked_ids[j], ranked_scores[j], source[j] = self._cold(req, r, history, segment)
            groups.setdefault((rules, int(req["k"][r, 0])), []).append(j)
        out_rows: list = [None] * len(rows)
        for (rules, k), members in groups.items():     # rows with the same rules and k: one vectorised call
            # an exploring row's draws depend on its position in the call: each gets a call of its own
            for part in ([members] if rules.deterministic else [[m] for m in members]):
                ids, sc, prop = apply_rules(ranked_ids[part], ranked_scores[part], k, rules,
                                            self.items if rules.needs_items else None)
                for n, j in enumerate(part):
                    out_rows[j] = (ids[n], sc[n], prop[n])
        outputs, start = [], 0
        for req in requests:
            part = out_rows[start:start + len(req["user_id"])]
            srcs = source[start:start + len(req["user_id"])]
            start += len(part)
            width = max(1, max(int((ids >= 0).sum()) for ids, _, _ in part))
            outputs.append({"item_ids": np.stack([p[0][:width] for p in part]),
                            "scores": np.stack([p[1][:width] for p in part]),
                            "propensity": np.stack([p[2][:width] for p in part]),
                            "source": np.array([[s.encode()] for s in srcs], dtype=object),
                            "version": np.array([[str(self.version).encode()]] * len(part), dtype=object)})
        return outputs

    def _personalized(self, idx: np.ndarray, hour: np.ndarray, weekday: np.ndarray):
        """Known users: the path, with the ranker's KMAX best; fallbacks when a step fails."""
        request = {"user_idx": idx.reshape(-1, 1), "hour": hour.reshape(-1, 1), "weekday": weekday.reshape(-1, 1),
                   "k": np.full((len(idx), 1), self.k_max, np.int32)}
        try:
            tensors = {**request, **self.retriever(request)}
        except Exception:  # noqa: BLE001 - the fallback chain: any failure of the step serves popular items
            self.on_fallback("retrieval")
            ids, sc = zip(*(self._top(self.cold.popular(int(h), int(w)), None) for h, w in zip(hour[:, 0],
                                                                                            weekday[:, 0])))
            return np.stack(ids), np.stack(sc), "fallback"
        started = time.monotonic()
        try:
            out = dict(zip(self.outputs, self._rank({n: tensors[n] for n in self.ranker_inputs})))
            return out["item_ids"], out["scores"], "personalized"
        except Exception:  # noqa: BLE001 - the ranker failing or timing out serves the retrieval order
            timed_out = self.ranker_timeout > 0 and time.monotonic() - started >= self.ranker_timeout
            self.on_fallback("ranker_timeout" if timed_out else "ranker")
            return (*self._retrieval_order(tensors["cand_idx"], tensors["cand_src"]), "fallback")

    def _retrieval_order(self, cand: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score = np.where(cand >= 0, src[..., 0], -np.inf)
        pos = top_positions(score, self.k_max)
        ids = np.take_along_axis(cand, pos, 1)
        raw = np.where(ids >= 0, self.items.item_ids[np.maximum(ids, 0)], PAD_ID)
        sc = np.where(ids >= 0, np.take_along_axis(score, pos, 1), PAD_SCORE).astype(np.float32)
        return raw, sc

    def _top(self, score: np.ndarray, drop: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        score = score.astype(np.float64, copy=True)
        if drop is not None and len(drop):
            score[drop] = -np.inf
        pos = top_positions(score[None, :], self.k_max)[0]
        ok = np.isfinite(score[pos])
        ids = np.where(ok, self.items.item_ids[pos], PAD_ID)
        return ids, np.where(ok, score[pos], PAD_SCORE).astype(np.float32)

    def _cold(self, request: dict[str, np.ndarray], row: int, history: np.ndarray | None,
              segment: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str]:
        hist = np.array([], np.int64)
        if history is not None:
            rows = self.items.rows(np.asarray(history, np.int64))
            hist = rows[rows >= 0]
        if len(hist):
            try:
                return (*self._from_history(hist, segment), "history")
            except Exception:  # noqa: BLE001 - the fallback chain
                self.on_fallback("history")
                h, w = int(request["hour"][row, 0]), int(request["weekday"][row, 0])
                return (*self._top(self.cold.popular(h, w), hist), "fallback")
        if self.cold.narrows(segment):
            return (*self._top(self.cold.segment(segment), None), "segment")
        h, w = int(request["hour"][row, 0]), int(request["weekday"][row, 0])
        return (*self._top(self.cold.popular(h, w), None), "popular")

    def _from_history(self, hist: np.ndarray, segment: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The user tower on a request's history (dense indices, newest last), then the candidate rule."""
        n_items = len(self.items)
        newest = hist[::-1][:self.history_len]
        history = np.full((1, self.history_len), n_items, np.int64)
        history[0, :len(newest)] = newest
        cats = self.cold.user_cats_mode.copy()
        if segment is not None:
            codes = np.asarray(segment, np.int64).reshape(-1)[:len(cats)]
            given = codes > 0
            cats[:len(codes)][given] = codes[given]
        feed = {"user_idx": np.array([self.proxy_user], np.int64), "user_cats": cats.reshape(1, -1),
                "history": history}
        names = {i.name for i in self.raw_tower.get_inputs()}
        user_vec = self.raw_tower.run(["user_vec"], {n: v for n, v in feed.items() if n in names})[0]
        cand, src = self.retriever.cold_candidates(hist, user_vec)
        ids, sc = self._retrieval_order(cand, src)
        return ids[0], sc[0]

    def check(self, request: dict[str, np.ndarray]) -> None:
        """Raise RequestError naming a bad value; completes the request in place (context, user index)."""
        check_request(request, self.retriever.user_ids, self.k_max)

    def run(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked request rows -> item_ids, scores ([B, KMAX], -1 past k): retrieval, then the ranker graph."""
        tensors = {**request, **self.retriever(request)}
        return dict(zip(self.outputs, self.ranker.run(self.outputs, {n: tensors[n] for n in self.ranker_inputs})))

    def __call__(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Request tensors ([B, 1] rows) -> item_ids, scores ([B, KMAX], -1 past k). Raises RequestError."""
        tensors = dict(request)
        self.check(tensors)
        return self.run(tensors)

    def recommend(self, user_ids: np.ndarray, k: int, hour: np.ndarray, weekday: np.ndarray) -> np.ndarray:
        """(B, k) raw item ids for many users at once (-1 where fewer items exist)."""
        col = lambda a, dtype=np.int64: np.asarray(a, dtype).reshape(-1, 1)  # noqa: E731
        request = {"user_id": col(user_ids), "k": col(np.full(len(user_ids), k), np.int32),
                   "hour": col(hour), "weekday": col(weekday)}
        check_request(request, self.retriever.user_ids, self.k_max, allow_unknown=True)
        ids = self.serve([request])[0]["item_ids"]     # what the served `recommend` runs
        out = np.full((len(ids), k), -1, np.int64)
        out[:, :min(k, ids.shape[1])] = ids[:, :k]
        return out
