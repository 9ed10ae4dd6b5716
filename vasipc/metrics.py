"""Recording of the server's responses for its Prometheus metrics (`Stats`).

Recording is on the request path, where a few µs count, so nothing here calls
prometheus_client per request (nor imports it: a server without `--metrics-port` never
loads it). `Stats` appends one tuple per response to a list, without a lock: a successful
`infer` its metadata timings, any other response its (op, error_code). The server's main
loop (every 0.2 s) and each scrape fold them into counters and histogram buckets with
numpy. The exposition, `/metrics` and the probes are vasipc.metrics_http.
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections import Counter

import numpy as np

OPS = frozenset(("infer", "health", "info"))
STAGES = ("queue", "preprocess", "inference", "postprocess")
# the metadata keys of a successful infer response that make a row of Stats._rows
_ROW_KEYS = ("queue_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms")
_COLS = len(_ROW_KEYS)
_row_of = operator.itemgetter(*_ROW_KEYS)
# The main loop folds every 0.2 s (serve.py), off the response path; a recording thread
# folds only past this many unfolded entries (a memory cap, for servers without that loop).
FOLD_ROWS = 65536
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def op_label(msg: object) -> str:
    """The `op` label of a request: one of OPS, else "unknown" (no JSON object, or an op
    the server does not know: clients must not be able to mint label values)."""
    op = msg.get("op", "infer") if type(msg) is dict else None
    return op if type(op) is str and op in OPS else "unknown"  # op may be any JSON value


class Stats:
    """Counters of the server's responses; `infer_ok` and `count` are the recording hooks
    (any thread), `snapshot` the scrape.

    Recording takes no lock: it appends one tuple to a list (`list.append` is atomic under
    the GIL; free-threaded builds lock the list itself). `_fold` (one folder at a time)
    takes the first n entries and deletes exactly those (`del lst[:n]`, atomic too), so an
    append that races with it lands after them and waits for the next fold."""

    def __init__(self) -> None:
        self._fold_lock = threading.Lock()
        self._rows: list[tuple] = []  # (queue, preprocess, inference, postprocess, total ms)
        self._events: list[tuple[str, str]] = []  # (op, error_code) of every other response
        self._batches: list[int] = []  # the size of each batch run
        # folded: guarded by _fold_lock
        self._counts: Counter[tuple[str, str]] = Counter({("infer", "ok"): 0})  # there from the start
        self._bounds_ms = np.asarray(LATENCY_BUCKETS_S) * 1e3
        self._latency = np.zeros((_COLS, len(LATENCY_BUCKETS_S) + 1), np.int64)  # +Inf last
        self._latency_sum_ms = np.zeros(_COLS)
        self._batch_sizes = np.zeros(1, np.int64)  # batches run, by their number of requests

    def infer_ok(self, md: dict) -> None:
        """A successful infer response, with its metadata (`total_ms` set)."""
        rows = self._rows
        rows.append(_row_of(md))
        if len(rows) >= FOLD_ROWS:
            self.fold()

    def batch(self, n: int) -> None:
        """A batch of n requests ran (the batcher's hook, once per run)."""
        batches = self._batches
        batches.append(n)
        if len(batches) >= FOLD_ROWS:
            self.fold()

    def count(self, op: str, code: str) -> None:
        """Any other response: `code` is its error_code, or "ok"."""
        events = self._events
        events.append((op, code))
        if len(events) >= FOLD_ROWS:
            self.fold()

    def fold(self) -> None:
        """What was recorded since the last fold into the counters and buckets."""
        with self._fold_lock:
            self._fold()

    def _fold(self) -> None:
        n = len(self._events)
        if n:
            self._counts.update(self._events[:n])
            del self._events[:n]
        n = len(self._batches)
        if n:
            sizes = np.bincount(self._batches[:n])
            del self._batches[:n]
            if len(sizes) < len(self._batch_sizes):
                sizes.resize(len(self._batch_sizes))
            sizes[:len(self._batch_sizes)] += self._batch_sizes
            self._batch_sizes = sizes
        n = len(self._rows)
        if not n:
            return
        rows = np.fromiter(itertools.chain.from_iterable(self._rows[:n]), np.float64,
                           n * _COLS).reshape(n, _COLS)
        del self._rows[:n]
        nb = len(LATENCY_BUCKETS_S) + 1
        for i in range(_COLS):
            # side="left": a value equal to a bound belongs to that bucket (le is "<=")
            idx = np.searchsorted(self._bounds_ms, rows[:, i], side="left")
            self._latency[i] += np.bincount(idx, minlength=nb)
            self._latency_sum_ms[i] += rows[:, i].sum()
        self._counts[("infer", "ok")] += n

    def snapshot(self) -> dict:
        """A consistent copy of everything recorded so far, for one scrape."""
        with self._fold_lock:
            self._fold()
            return {"counts": dict(self._counts), "latency": self._latency.copy(),
                    "latency_sum_ms": self._latency_sum_ms.copy(),
                    "batch_sizes": self._batch_sizes.copy()}
