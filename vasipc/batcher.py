"""The request queue and the two-stage inference pipeline.

Connections submit `Pending` requests to the queue. Two threads serve it:

- the *prep* thread takes requests off the queue (never mixing models: a batch captures
  the current `LoadedModel` once, when it starts), checks each deadline as the request
  leaves the queue, opens and letterboxes its frame straight into its slot of the
  batch's input buffer, and hands the batch over;
- the *infer* thread runs each handed-over batch once, decodes each result and
  completes each request.

So while batch k runs in ONNX Runtime, batch k+1 is opened and letterboxed into the
other of two input buffers (double buffering; `letterbox_into` and ORT release the
GIL). The hand-off holds at most one prepared batch: the prep thread takes requests off
the queue only while fewer than two buffers are out (one running, one prepared), so
requests wait in the real queue, where `--max-queue` counts them and their deadline is
checked, and never pile up behind the pipeline. With max_batch > 1 the next batch keeps
filling while the current one runs and goes as soon as the infer thread is free.

Semantics (CONTRACT 3.1, 4):
- `--max-queue` counts requests waiting in the queue; at most two batches more are
  between the queue and their response (one prepared, one running).
- `deadline_ms` is checked when a request leaves the queue, before its frame is opened;
  a prepared request may then wait up to one batch's inference for its turn.
- `queue_ms` is all the time a request waited before its batch's inference started,
  except its own preprocessing: (inference start - arrival) - preprocess_ms. For a
  request answered before inference (deadline, frame errors) it is the time until it
  left the queue.
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

from vasipc._fast.letterbox import (
    FrameBusError,
    letterbox_geometry,
    letterbox_into,
)
from vasipc._fast.yolo import decode_yolo
from vasipc.errors import DeadlineExceeded, FrameChanged, InternalError, Overloaded, VasipcError
from vasipc.frame_source import FrameOpener
from vasipc.model import LoadedModel
from vasipc.schema import InferRequest

log = logging.getLogger("vasipc")
_now = time.perf_counter

# Errors after which the session cannot be trusted again (CONTRACT 7): the server stops
# being ready and exits 1 so its supervisor restarts it.
_STICKY_MARKERS = ("CUDA failure", "cudaError", "CUDNN_STATUS", "CUBLAS_STATUS",
                   "illegal memory access", "device-side assert")

BUFFERS = 2  # input buffers per model: one batch running, the next one being prepared


class Pending:
    """One `infer` request between its last byte read and its response."""

    __slots__ = ("_claim", "_done", "arrival", "msg", "request", "response")

    def __init__(self, msg: dict, request: InferRequest | None, arrival: float) -> None:
        self.msg = msg
        self.request = request
        self.arrival = arrival
        self.response: dict | None = None
        self._done = threading.Lock()
        self._done.acquire()
        self._claim = itertools.count().__next__  # atomic under the GIL: first caller gets 0

    def complete(self, response: dict) -> bool:
        """Set the response once; later calls (e.g. a drain timeout racing the worker) lose."""
        if self._claim() != 0:
            return False
        self.response = response
        self._done.release()
        return True

    def done(self) -> bool:
        return self.response is not None

    def wait(self, timeout: float = -1) -> bool:
        if self._done.acquire(timeout=timeout):
            self._done.release()
            return True
        return False


class _Batch:
    """Requests taken off the queue together, preprocessed into one input buffer."""

    __slots__ = ("current", "eager", "items", "model", "x")

    def __init__(self, model: LoadedModel, x: np.ndarray) -> None:
        self.model = model  # captured once: the whole batch runs on it
        self.x: np.ndarray | None = x  # None once given back
        # (request, geometry, frame_id, preprocess_ms) of each prepared slot, in order
        self.items: list[tuple[Pending, tuple, int | None, float]] = []
        self.current: Pending | None = None  # taken off the queue, not yet in items
        self.eager = False  # its first request found the infer thread idle


class Batcher:
    def __init__(self, model: LoadedModel, opener: FrameOpener, *, max_queue: int,
                 batch_timeout_s: float,
                 respond: Callable[[Pending, dict | VasipcError, dict, LoadedModel], None],
                 on_fatal: Callable[[str], None], preprocess_threads: int = 1) -> None:
        self.model = model  # replaced whole on reload; each batch reads it once
        self.opener = opener
        self.max_queue = max_queue
        self.batch_timeout_s = batch_timeout_s
        self.preprocess_threads = preprocess_threads
        self._respond = respond
        self._on_fatal = on_fatal
        # One lock guards the queue, the hand-off and the buffers; both threads and the
        # connections wait on it, so every state change notifies all.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Pending] = deque()
        self._stopped = False
        self._ready: _Batch | None = None  # the hand-off: at most one prepared batch
        self._infer_idle = False  # the infer thread waits for a batch
        self._prep_done = False
        self._out = 0  # buffers handed over and not yet given back (prepared + running)
        self._pool_model: LoadedModel | None = None
        self._free: list[np.ndarray] = []  # spare input buffers of _pool_model
        self._threads = [threading.Thread(target=self._prep_loop, name="vasipc-prep", daemon=True),
                         threading.Thread(target=self._infer_loop, name="vasipc-infer",
                                          daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Finish what is queued, then end both threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def queued(self) -> int:
        return len(self._queue)

    def submit(self, p: Pending) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"queue full ({self.max_queue} requests waiting); retry later")
            self._queue.append(p)
            self._cond.notify_all()

    # ---- prep thread -----------------------------------------------------------------
    def _prep_loop(self) -> None:
        try:
            while self._prepare_batch():
                pass
        finally:
            with self._cond:
                self._prep_done = True
                self._cond.notify_all()

    def _prepare_batch(self) -> bool:
        """Fill one batch and hand it over; False once stopped with the queue empty."""
        with self._cond:
            while self._out >= BUFFERS or not (self._queue or self._stopped):
                self._cond.wait()
            if not self._queue:
                return False
            model = self.model
            if model is not self._pool_model:  # a new model: drop the old one's spares
                self._pool_model, self._free = model, []
            batch = _Batch(model, self._free.pop() if self._free else model.new_input(model.max_batch))
        try:
            while True:
                with self._cond:
                    p = self._next_request(batch)
                    if p is None:
                        if not batch.items:
                            self._give_back(batch)
                            return not self._stopped or bool(self._queue)
                        while self._ready is not None:
                            self._cond.wait()
                        self._ready = batch
                        self._out += 1
                        self._cond.notify_all()
                        return True
                    batch.current = p
                self._admit(batch, p)
                batch.current = None
        except Exception as exc:  # never lose a request: anything taken gets `internal`
            log.exception("preprocessing worker error")
            held = [it[0] for it in batch.items] + ([batch.current] if batch.current else [])
            for q in held:
                if not q.done():
                    self._respond(q, InternalError(f"internal error: {exc}"), {}, model)
            with self._cond:
                self._give_back(batch)
            return True

    def _next_request(self, batch: _Batch) -> Pending | None:
        """Under the lock: the next request for `batch`, or None when the batch should go
        to the infer thread now (or, empty, be dropped)."""
        while True:
            n = len(batch.items)
            if n >= batch.model.max_batch:
                return None
            if self._queue:
                if n == 0:
                    batch.eager = self._infer_idle and self._ready is None
                return self._queue.popleft()
            if n == 0:
                if self._stopped:
                    return None
                self._cond.wait()
                continue
            if self._infer_idle and self._ready is None:
                # The infer thread is free: go now, unless the batch timeout lets a request
                # that waited for the busy device wait a little longer for company.
                remaining = batch.items[0][0].arrival + self.batch_timeout_s - _now()
                if batch.eager or remaining <= 0 or self._stopped:
                    return None
                self._cond.wait(remaining)
            else:
                self._cond.wait()  # the infer thread is busy: keep filling the batch

    def _admit(self, batch: _Batch, p: Pending) -> None:
        """Check the deadline, then open and letterbox the frame into the next slot; a
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
            geom, frame_id = self._preprocess(model, req, batch.x[len(batch.items)])
        except VasipcError as err:
            self._respond(p, err, stage, model)
            return
        except Exception as exc:
            log.exception("preprocessing failed")
            self._respond(p, InternalError(f"preprocessing failed: {exc}"), stage, model)
            return
        batch.items.append((p, geom, frame_id, (_now() - t0) * 1e3))

    def _give_back(self, batch: _Batch) -> None:
        """Under the lock: return the batch's buffer (once) and wake the prep thread."""
        if batch.x is None:
            return
        if batch.model is self._pool_model:
            self._free.append(batch.x)
        batch.x = None
        self._cond.notify_all()

    # ---- infer thread ----------------------------------------------------------------
    def _infer_loop(self) -> None:
        while True:
            with self._cond:
                self._infer_idle = True
                self._cond.notify_all()
                while self._ready is None:
                    if self._prep_done:
                        return
                    self._cond.wait()
                batch, self._ready = self._ready, None
                self._infer_idle = False
                self._cond.notify_all()  # the hand-off is free again
            try:
                self._run_batch(batch)
            except Exception as exc:  # never lose a request: anything left gets `internal`
                log.exception("inference worker error")
                for p, *_ in batch.items:
                    if not p.done():
                        self._respond(p, InternalError(f"internal error: {exc}"), {}, batch.model)
            finally:
                self._release(batch)

    def _release(self, batch: _Batch) -> None:
        """The infer thread is done with the batch's buffer: it goes back (once)."""
        with self._cond:
            if batch.x is not None:
                self._out -= 1
                self._give_back(batch)

    def _run_batch(self, batch: _Batch) -> None:
        model, live = batch.model, batch.items
        t_run = _now()
        try:
            out = model.run(batch.x[:len(live)])
        except Exception as exc:
            text = str(exc)
            for p, _, frame_id, _ in live:
                self._respond(p, InternalError(f"inference failed: {text.splitlines()[0] if text else exc!r}",
                                               frame_id=frame_id), {}, model)
            if any(m in text for m in _STICKY_MARKERS):
                self._on_fatal(text)
            return
        inference_ms = (_now() - t_run) * 1e3
        self._release(batch)  # the output is a copy: the prep thread may refill the buffer
        for i, (p, geom, frame_id, pre_ms) in enumerate(live):
            t0 = _now()
            detections = self._postprocess(model, p.request, out[i], geom)
            self._respond(p, {"frame_id": frame_id, "detections": detections}, {
                "queue_ms": max(0.0, (t_run - p.arrival) * 1e3 - pre_ms), "preprocess_ms": pre_ms,
                "inference_ms": inference_ms, "postprocess_ms": (_now() - t0) * 1e3,
                "batch_size": len(live)}, model)

    def _preprocess(self, model: LoadedModel, req: InferRequest,
                    slot: np.ndarray) -> tuple[tuple, int | None]:
        frame = self.opener.open(req.frame_reference, req.frame_metadata)
        try:
            geom = letterbox_geometry(frame.width, frame.height, model.input_width, model.input_height)
            _, new_w, new_h, left, top = geom
            try:
                letterbox_into(frame.view, frame.pixel_format, frame.width, frame.height,
                               frame.stride, slot, new_w, new_h, left, top, threads=self.preprocess_threads)
            except FrameBusError:
                raise FrameChanged("the frame file was truncated while it was read",
                                   frame_id=frame.frame_id) from None
            frame.check_unchanged()  # a header replaced during the read is a torn read
            return (geom, frame.width, frame.height), frame.frame_id
        finally:
            frame.close()

    def _postprocess(self, model: LoadedModel, req: InferRequest, pred: np.ndarray,
                     geom: tuple) -> list[dict[str, Any]]:
        (r, _, _, left, top), src_w, src_h = geom
        cfg, spec = req.config, model.spec
        max_det = spec.max_detections if cfg.max_detections is None else cfg.max_detections
        # Any int >= 0 and any class id is valid on the wire: cap to what the kernel takes
        # (no more detections than anchors; ids beyond the model's classes match nothing).
        classes = None if cfg.classes is None else np.asarray(
            [c for c in cfg.classes if c < model.num_classes], dtype=np.int32)
        boxes, scores, class_ids = decode_yolo(
            pred,
            spec.confidence_threshold if cfg.confidence_threshold is None else cfg.confidence_threshold,
            spec.nms_iou_threshold if cfg.nms_iou_threshold is None else cfg.nms_iou_threshold,
            min(max_det, pred.shape[1]), classes, r, left, top, src_w, src_h)
        names = model.class_names
        return [
            {"class_id": c, "class_name": names[c], "confidence": s, "bbox": b, "track_id": None}
            for c, s, b in zip(class_ids.tolist(), np.round(scores.astype(np.float64), 6).tolist(),
                               np.round(boxes.astype(np.float64), 6).tolist(), strict=True)
        ]
