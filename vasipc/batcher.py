"""The request queue and the inference workers (leader/follower: a batch never changes thread).

Connections submit `Pending` requests to the queue. S + 1 identical worker threads serve
it (S: the model's backend streams, the runs that may be in flight at once; at least 2
workers), each owning one input buffer of the current model (re-allocated when `model` was
replaced). A worker loops:

1. it waits for the *fill role* (no other worker filling) and a queued request;
2. filling, it takes requests off the queue (never mixing models: a batch captures the
   current `LoadedModel` once, when it starts), checks each deadline as the request leaves
   the queue and opens and preprocesses its frame straight into its slot of the worker's
   buffer. It keeps filling while every stream is busy (up to max_batch) and goes at once
   when a stream is free, unless `batch_timeout_s` lets a first request that waited for
   a busy device wait a little longer for company;
3. it gives up the fill role (another worker may start filling the next batch), waits
   for a free stream of its model, runs the batch on it, frees it, then decodes and
   answers each request of its batch itself, while other batches run. A batch alone
   (nothing else running, prepared, filling or queued) runs on the backend's SOLO layout
   where it has one: every thread on one run, the lowest latency at low load.

So at concurrency 1 a request is handed over once (submitting thread -> a worker) and is
prepared, run and answered on that worker's thread; under load, batch k+1 is opened and
preprocessed while batches run (the C kernel and the runtimes release the GIL). At most
S + 1 batches are out of the queue (S running, one prepared or filling); the rest wait in
the real queue, where `--max-queue` counts them and their deadline is checked. Requests
complete in no set order (an early error, or batch k+1 answered before the end of batch
k's decode): the server keeps each connection's responses in order. Conditions
over one lock wake only threads that can act: each idle worker's own (the fill role is
free and a request is queued; the most recently idle worker is woken first, so at low load
one warm thread does the work), `_fill` (the filler: a request came, or a stream went
idle) and `_device` (prepared batches: a stream was freed). Streams are counted per model,
so a hot reload's model never runs more batches at once than its own backend has streams.

Buffers: `model.new_buffer()`, with a slot per request of the model's largest run size
(batches run padded to 1, 2, 4, ... max_batch: `LoadedModel.run_batch`). With the C kernel
(`--preprocess cpu`) it is a numpy array, each frame resized into its slot on the
host; in graph mode (CUDA, or `--preprocess graph`) it is a `device_path.DeviceBatch` on
the model's device: each frame is copied to a staging buffer and resized by the
preprocessing graph straight into its device slot, and the batch runs IO-bound.

Semantics (docs/contract.md 3.1, 4):
- `--max-queue` counts requests waiting in the queue; at most S + 1 batches more are
  between the queue and their response (S running, one prepared).
- `deadline_ms` is checked when a request leaves the queue, before its frame is opened;
  a prepared request may then wait up to one batch's inference for a free stream.
- `queue_ms` is all the time a request waited before its batch's inference started,
  except its own preprocessing: (inference start - arrival) - preprocess_ms. For a
  request answered before inference (deadline, frame errors) it is the time until it
  left the queue. `preprocess_ms` is its own open + resize, `inference_ms` its batch's
  `model.run`, `postprocess_ms` its own decode, `batch_size` the requests in its batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from vasipc._fast.letterbox import FrameBusError
from vasipc.backends.base import SOLO
from vasipc.device_path import DeviceSlot
from vasipc.errors import (
    DeadlineExceeded,
    FrameChanged,
    InternalError,
    Overloaded,
    ShuttingDown,
    VasipcError,
    first_line,
)
from vasipc.frame_source import FrameOpener, OpenFrame
from vasipc.model import LoadedModel
from vasipc.preprocess import Geometry
from vasipc.schema import InferRequest

log = logging.getLogger("vasipc")
_now = time.perf_counter

MIN_WORKERS = 2  # one batch running, the next one prepared, even on one stream


class Pending:
    """One `infer` request between its last byte read and its response.

    `on_complete`, when set, is called with the request by the `complete` call that set
    the response, in its thread, after the waiters were released; its exceptions are
    logged, never raised."""

    __slots__ = ("_claim", "_done", "arrival", "msg", "on_complete", "request", "response")

    def __init__(self, msg: dict, request: InferRequest | None, arrival: float, *,
                 on_complete: Callable[[Pending], None] | None = None) -> None:
        self.msg = msg
        self.request = request
        self.arrival = arrival
        self.response: dict | None = None
        self.on_complete = on_complete
        self._done = threading.Lock()
        self._done.acquire()
        self._claim = itertools.count().__next__  # atomic under the GIL: first caller gets 0

    def claim(self) -> bool:
        """Take the right to answer: True for the first caller only. The winner then calls
        `fulfil`; `complete` does both."""
        return self._claim() == 0

    def complete(self, response: dict) -> bool:
        """Set the response once; later calls (e.g. a drain timeout racing the worker) lose."""
        if not self.claim():
            return False
        self.fulfil(response)
        return True

    def fulfil(self, response: dict) -> None:
        """Set the response of a claimed request, release its waiters, run the hook."""
        self.response = response
        self._done.release()
        hook = self.on_complete
        if hook is not None:
            try:
                hook(self)
            except Exception:
                log.exception("on_complete hook failed")

    def done(self) -> bool:
        return self.response is not None

    def wait(self, timeout: float = -1) -> bool:
        if self._done.acquire(timeout=timeout):
            self._done.release()
            return True
        return False


class _Batch:
    """Requests taken off the queue together, preprocessed into one worker's input buffer."""

    __slots__ = ("current", "eager", "items", "model", "x")

    def __init__(self, model: LoadedModel, x: np.ndarray) -> None:
        self.model = model  # captured once: the whole batch runs on it
        self.x = x
        # (request, geometry, frame_id, preprocess_ms) of each prepared slot, in order
        self.items: list[tuple[Pending, Geometry, int | None, float]] = []
        self.current: Pending | None = None  # taken off the queue, not yet in items
        self.eager = False  # its first request found the device idle


class Batcher:
    def __init__(self, model: LoadedModel, opener: FrameOpener, *, max_queue: int,
                 batch_timeout_s: float,
                 respond: Callable[[Pending, dict | VasipcError, dict, LoadedModel], None],
                 on_fatal: Callable[[str], None], preprocess_threads: int = 1,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.model = model  # replaced whole on reload; each batch reads it once
        self.opener = opener
        self.max_queue = max_queue
        self.batch_timeout_s = batch_timeout_s
        self.preprocess_threads = preprocess_threads
        self._respond = respond
        self._on_fatal = on_fatal
        self._on_batch = on_batch  # called with n once a batch of n requests has run (metrics)
        # One lock guards the queue and the roles; each Condition has only the waiters
        # that can act on its event, so a notify wakes at most one thread that has work.
        self._lock = threading.Lock()
        # idle workers, each waiting on its own Condition for "fill role free + queued"; the
        # most recently idle is woken first (its caches and core are still warm)
        self._idle: list[threading.Condition] = []
        self._fill = threading.Condition(self._lock)    # the filler: a request, or device idle
        self._device = threading.Condition(self._lock)  # prepared batches: a stream was freed
        self._queue: deque[Pending] = deque()
        self._stopped = False
        self._filling = False  # a worker holds the fill role
        self._ahead = 0  # prepared batches not yet done (waiting for a stream or running)
        # bytes of the frames opened (metrics); only the fill-role holder adds to it, so
        # there is one writer at a time and no lock is needed
        self.frame_bytes_read = 0
        self._busy: dict[int, set[int]] = {}  # id(model) -> its streams running a batch
        workers = max(MIN_WORKERS, model.streams + 1)  # kept by reloads
        self._threads = [threading.Thread(target=self._worker, name=f"vasipc-worker-{i}",
                                          daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Finish what is queued, then end the workers."""
        with self._lock:
            self._stopped = True
            while self._idle:
                self._idle.pop().notify()
            self._fill.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """After `stop`: wait for the workers to end (and let go of their model); whether
        they all did within `timeout` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def set_model(self, model: LoadedModel) -> None:
        """Serve `model` from the next batch on (a hot reload: batches in flight finish on
        the one they started with); idle workers wake to let go of the old one."""
        with self._lock:
            self.model = model
            while self._idle:
                self._idle.pop().notify()

    def queued(self) -> int:
        return len(self._queue)

    def submit(self, p: Pending) -> None:
        with self._lock:
            if self._stopped:  # no worker would take it
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"queue full ({self.max_queue} requests waiting); retry later")
            self._queue.append(p)
            # the filler takes it; else one idle worker (if any: a busy one looks when done)
            if self._filling:
                self._fill.notify()
            elif self._idle:
                self._idle.pop().notify()

    # ---- workers ---------------------------------------------------------------------
    def _worker(self) -> None:
        model: LoadedModel | None = None  # the model this worker's buffer was made for
        x: np.ndarray | None = None
        idle = threading.Condition(self._lock)
        batch: _Batch | None = None
        while True:
            batch = None  # the last batch (and its buffer, its model) goes before waiting
            with self._lock:
                while self._filling or not self._queue:
                    if self._stopped and not self._queue:
                        return
                    if model is not self.model:
                        # A reload happened: let go of the old model's buffer now, so the
                        # old model is freed once its last batch ends (device memory)
                        # instead of whenever this worker next has work.
                        model = x = None
                    self._idle.append(idle)
                    idle.wait()  # whoever notifies it has taken it off `_idle`
                self._filling = True
                if self.model is not model:  # a new model: a new buffer
                    model, x = self.model, None
            batch = self._fill_batch(model, x)
            if batch is None:
                continue
            x = batch.x
            if not batch.items:
                continue
            try:
                self._run_batch(batch)
            except Exception as exc:  # never lose a request: anything left gets `internal`
                log.exception("inference worker error")
                for p, *_ in batch.items:
                    if not p.done():
                        self._respond(p, InternalError(f"internal error: {exc}"), {}, model)

    def _fill_batch(self, model: LoadedModel, x: np.ndarray | None) -> _Batch | None:
        """Holding the fill role: fill a batch on `model` (into `x`, or a new buffer), give
        the role up and return the batch: counted in `_ahead` when it has requests to run,
        empty when not (None when no buffer could be made)."""
        batch = None
        filling = True
        try:
            batch = _Batch(model, model.new_buffer() if x is None else x)
            while True:
                with self._lock:
                    p = self._next_request(batch)
                    if p is None:
                        filling = False
                        self._end_fill()
                        if batch.items:
                            self._ahead += 1
                        return batch
                    batch.current = p
                self._admit(batch, p)
                batch.current = None
        except Exception as exc:  # never lose a request: anything taken gets `internal`
            log.exception("preprocessing worker error")
            if batch is None:  # no buffer: answer one queued request, so the queue still moves
                with self._lock:
                    held = [self._queue.popleft()] if self._queue else []
            else:
                held = [it[0] for it in batch.items] + ([batch.current] if batch.current else [])
            for q in held:
                if not q.done():
                    self._respond(q, InternalError(f"internal error: {exc}"), {}, model)
            if filling:
                with self._lock:
                    self._end_fill()
            if batch is not None:
                batch.items.clear()  # all answered: nothing to run
            return batch

    def _end_fill(self) -> None:
        """Under the lock: give up the fill role; wake an idle worker if it has work (or,
        stopping, so it can end)."""
        self._filling = False
        if (self._queue or self._stopped) and self._idle:
            self._idle.pop().notify()

    def _next_request(self, batch: _Batch) -> Pending | None:
        """Under the lock, holding the fill role: the next request for `batch`, or None when
        the batch should go now (or, empty, be dropped)."""
        while True:
            n = len(batch.items)
            if n >= batch.model.max_batch:
                return None
            if self._queue:
                if n == 0:
                    batch.eager = self._ahead < batch.model.streams
                return self._queue.popleft()
            if n == 0:
                return None  # what it took was answered already; the role goes back
            if self._ahead < batch.model.streams:
                # A stream is idle: go now, unless the batch timeout lets a request that
                # waited for the busy device wait a little longer for company.
                remaining = batch.items[0][0].arrival + self.batch_timeout_s - _now()
                if batch.eager or remaining <= 0 or self._stopped:
                    return None
                self._fill.wait(remaining)
            else:
                self._fill.wait()  # every stream is busy: keep filling the batch

    def _admit(self, batch: _Batch, p: Pending) -> None:
        """Check the deadline, then open and preprocess the frame into the next slot; a
        request that fails here is answered at once."""
        t0 = _now()
        req, model = p.request, batch.model
        queue_ms = (t0 - p.arrival) * 1e3
        stage = {"queue_ms": queue_ms}
        if req.deadline_ms is not None and queue_ms > req.deadline_ms:
            self._respond(p, DeadlineExceeded(
                f"waited {queue_ms:.1f} ms in the queue, deadline_ms {req.deadline_ms:g}"), stage, model)
            return
        try:
            geom, frame_id = self._preprocess(model, req.frame_reference, req.frame_metadata,
                                              batch.x[len(batch.items)])
        except VasipcError as err:
            self._respond(p, err, stage, model)
            return
        except Exception as exc:
            log.exception("preprocessing failed")
            text = str(exc)
            self._respond(p, InternalError(f"preprocessing failed: {first_line(exc)}"), stage, model)
            if model.backend.sticky(text):  # the graph path runs on the device too
                self._on_fatal(text)
            return
        batch.items.append((p, geom, frame_id, (_now() - t0) * 1e3))

    def _take_stream(self, model: LoadedModel) -> int | None:
        """Under the lock: a free stream of `model`, marked busy, or None. SOLO (every
        thread on one run) when the batch is alone: nothing running, prepared, being
        filled or queued; what comes while it runs takes a stream beside it."""
        if model.backend.solo and not self._busy and self._ahead == 1 and not self._queue \
                and not self._filling:
            self._busy[id(model)] = {SOLO}
            return SOLO
        busy = self._busy.setdefault(id(model), set())
        for stream in range(model.streams):
            if stream not in busy:
                busy.add(stream)
                return stream
        return None

    def _run_batch(self, batch: _Batch) -> None:
        """A prepared batch (counted in `_ahead`): wait for a free stream, run, free it,
        then decode and answer each request on this thread."""
        model, live = batch.model, batch.items
        failure: Exception | None = None
        with self._lock:
            while (stream := self._take_stream(model)) is None:
                self._device.wait()
        try:
            t_run = _now()
            out = model.run_batch(batch.x, len(live), stream)
            inference_ms = (_now() - t_run) * 1e3
        except Exception as exc:
            failure = exc
        finally:
            with self._lock:
                busy = self._busy[id(model)]
                busy.discard(stream)
                if not busy:
                    del self._busy[id(model)]
                self._ahead -= 1
                self._device.notify_all()  # prepared batches: a stream is free (few waiters)
                if self._ahead < self.model.streams:
                    self._fill.notify()  # a filling batch may go
        if failure is not None:
            text = str(failure)
            why = f"inference failed: {first_line(failure)}"
            for p, _, frame_id, _ in live:
                self._respond(p, InternalError(why, frame_id=frame_id), {}, model)
            if model.backend.sticky(text):
                self._on_fatal(text)
            return
        n = len(live)
        if self._on_batch is not None:
            self._on_batch(n)
        head, spec = model.head, model.spec
        for i, (p, geom, frame_id, pre_ms) in enumerate(live):
            t0 = _now()
            result = head.decode(out, i, geom, p.request.config, spec)
            result["frame_id"] = frame_id
            self._respond(p, result, {
                "queue_ms": max(0.0, (t_run - p.arrival) * 1e3 - pre_ms), "preprocess_ms": pre_ms,
                "inference_ms": inference_ms, "postprocess_ms": (_now() - t0) * 1e3,
                "batch_size": n}, model)

    def _preprocess(self, model: LoadedModel, reference: str, metadata: Any,
                    slot: np.ndarray | DeviceSlot) -> tuple[Geometry, int | None]:
        """Open the frame and resize it into `slot` as the model's family wants."""
        frame = self.opener.open(reference, metadata)
        self.frame_bytes_read += frame.view.length
        try:
            if model.device_path is not None:  # graph mode: `slot` is a DeviceSlot
                return self._preprocess_graph(model, frame, slot), frame.frame_id
            try:
                geom = model.family.preprocess.into(frame, slot, self.preprocess_threads)
            except FrameBusError:
                raise FrameChanged("the frame file was truncated while it was read",
                                   frame_id=frame.frame_id) from None
            frame.check_unchanged()  # a header replaced during the read is a torn read
            return geom, frame.frame_id
        finally:
            frame.close()

    @staticmethod
    def _preprocess_graph(model: LoadedModel, frame: OpenFrame, slot: DeviceSlot) -> Geometry:
        """The device path: the frame's bytes to a staging buffer (guarded copy), checked
        unchanged, then resized by the preprocessing graph into the device slot."""
        path = model.device_path
        try:
            staged = path.stage(frame, slot.batch)
        except FrameBusError:
            raise FrameChanged("the frame file was truncated while it was read",
                               frame_id=frame.frame_id) from None
        frame.check_unchanged()  # a header replaced during the copy is a torn read
        return path.preprocess_into(staged, slot)
