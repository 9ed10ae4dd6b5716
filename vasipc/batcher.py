"""The request queue and the inference worker.

Connections submit `Pending` requests; one worker takes up to `max_batch` of them at a
time (never mixing models: it captures the current `LoadedModel` once per batch), checks
deadlines as they leave the queue, opens and preprocesses each frame straight into its
slot of the input tensor, runs the batch once, decodes each result and completes each
request. On CPU max_batch is 1; the GPU path extends this same class.
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

from vasipc._fast.letterbox import FrameBusError, letterbox_geometry, letterbox_into
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


class Batcher:
    def __init__(self, model: LoadedModel, opener: FrameOpener, *, max_queue: int,
                 batch_timeout_s: float,
                 respond: Callable[[Pending, dict | VasipcError, dict, LoadedModel], None],
                 on_fatal: Callable[[str], None]) -> None:
        self.model = model  # replaced whole on reload; each batch reads it once
        self.opener = opener
        self.max_queue = max_queue
        self.batch_timeout_s = batch_timeout_s
        self._respond = respond
        self._on_fatal = on_fatal
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False
        self._inputs: dict[int, np.ndarray] = {}  # per input shape, reused across batches
        self._thread = threading.Thread(target=self._run, name="vasipc-infer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
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
            self._cond.notify()

    def _take(self, max_batch: int) -> list[Pending]:
        with self._cond:
            while not self._queue:
                if self._stopped:
                    return []
                self._cond.wait()
            batch = [self._queue.popleft()]
            # A request that waited for the busy device may wait a little longer for
            # company; one that found the device idle is taken at once.
            waited = _now() - batch[0].arrival
            deadline = batch[0].arrival + self.batch_timeout_s
            while len(batch) < max_batch:
                if not self._queue:
                    remaining = deadline - _now()
                    if remaining <= 0 or waited < 1e-4 or self._stopped:
                        break
                    self._cond.wait(remaining)
                    continue
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while True:
            model = self.model
            batch = self._take(model.max_batch)
            if not batch:
                return
            try:
                self._process(model, batch)
            except Exception as exc:  # never lose a request: anything left gets `internal`
                log.exception("inference worker error")
                for p in batch:
                    if not p.done():
                        self._respond(p, InternalError(f"internal error: {exc}"), {}, model)

    def _input_for(self, model: LoadedModel, n: int) -> np.ndarray:
        key = id(model)
        x = self._inputs.get(key)
        if x is None or x.shape[0] < n:
            self._inputs = {key: model.new_input(model.max_batch)}  # drop a replaced model's
            x = self._inputs[key]
        return x[:n]

    def _process(self, model: LoadedModel, batch: list[Pending]) -> None:
        t_start = _now()
        x = self._input_for(model, len(batch))
        live: list[tuple[Pending, tuple, int | None, float]] = []
        for p in batch:
            req = p.request
            queue_ms = (t_start - p.arrival) * 1e3
            stage = {"queue_ms": queue_ms}
            if req.deadline_ms is not None and queue_ms > req.deadline_ms:
                self._respond(p, DeadlineExceeded(
                    f"waited {queue_ms:.1f} ms in the queue, deadline_ms {req.deadline_ms:g}"), stage, model)
                continue
            t0 = _now()
            try:
                geom, frame_id = self._preprocess(model, req, x[len(live)])
            except VasipcError as err:
                self._respond(p, err, stage, model)
                continue
            except Exception as exc:
                log.exception("preprocessing failed")
                self._respond(p, InternalError(f"preprocessing failed: {exc}"), stage, model)
                continue
            live.append((p, geom, frame_id, (_now() - t0) * 1e3))
        if not live:
            return
        t0 = _now()
        try:
            out = model.run(x[:len(live)])
        except Exception as exc:
            text = str(exc)
            for p, _, frame_id, _ in live:
                self._respond(p, InternalError(f"inference failed: {text.splitlines()[0] if text else exc!r}",
                                               frame_id=frame_id), {}, model)
            if any(m in text for m in _STICKY_MARKERS):
                self._on_fatal(text)
            return
        inference_ms = (_now() - t0) * 1e3
        for i, (p, geom, frame_id, pre_ms) in enumerate(live):
            t0 = _now()
            detections = self._postprocess(model, p.request, out[i], geom)
            self._respond(p, {"frame_id": frame_id, "detections": detections}, {
                "queue_ms": (t_start - p.arrival) * 1e3, "preprocess_ms": pre_ms,
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
                               frame.stride, slot, new_w, new_h, left, top)
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
