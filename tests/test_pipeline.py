"""The batcher's workers (leader/follower: each batch is filled, run and answered by one
worker thread; one worker per backend stream plus one, at least two, each with one input
buffer), on every backend.

In-process: a real `Batcher` on the nudenet model, its backend wrapped to gate, slow down
or fail runs, so roles, queue accounting, model capture, stop and sticky errors can be
checked deterministically; and a real in-process `Server` under concurrent mixed load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import wire

from vasipc import frames
from vasipc._fast.decode import Decoded, DecodeLayout, decode_detections
from vasipc._fast.frameview import FrameView
from vasipc.backends.base import SOLO
from vasipc.batcher import MIN_WORKERS, Batcher, Pending
from vasipc.errors import Overloaded
from vasipc.frame_source import FrameOpener, FrameRoots
from vasipc.heads.base import round6_scalar
from vasipc.heads.detection import detection_dicts
from vasipc.model import ModelSpec, load_model
from vasipc.runtime import Device
from vasipc.schema import parse_infer
from vasipc.server import Server, ServerConfig

MODEL_ID = "m"


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def models(nudenet_model, request):
    """The batcher's guarantees on every backend (openvino where it is installed)."""
    if request.param == "openvino":
        pytest.importorskip("openvino")
    spec = ModelSpec(path=nudenet_model, model_id=MODEL_ID, model_name="n", model_version="1",
                     threads=1, backend=request.param)
    return {b: load_model(spec, Device("cpu"), b) for b in (1, 4)}


@pytest.fixture(scope="module")
def frame_dirs(astronaut_rgb):
    root = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="vasipc-pipe-"))
    paths = []
    for i in range(6):
        rgb = np.roll(astronaut_rgb[::2, ::2], 40 * i, axis=1).copy()
        h, w = rgb.shape[:2]
        p = root / f"f{i}"
        frames.write_frame_dir(p, frames.rgb_to_nv12(rgb), width=w, height=h,
                               pixel_format="NV12", frame_id=i)
        paths.append(str(p))
    yield root, paths
    import shutil
    shutil.rmtree(root, ignore_errors=True)


class GatedBackend:
    """Wraps the model's backend (ONNX Runtime): each run waits for the gate (if closed) and may fail. With
    `permits` set, each run also takes one permit (so runs can be let through one by one).
    Records the batch size and the thread of each run."""

    def __init__(self, inner, fail: str | None = None) -> None:
        self.inner, self.fail = inner, fail
        self.gate = threading.Event()
        self.gate.set()
        self.permits: threading.Semaphore | None = None
        self.started = threading.Semaphore(0)
        self.runs: list[int] = []
        self.threads: list[int] = []
        self.streams_used: list[int] = []

    def run(self, feeds, size, stream, options=None):
        self.threads.append(threading.get_ident())
        self.streams_used.append(stream)
        self.started.release()
        assert self.gate.wait(30)
        if self.permits is not None:
            assert self.permits.acquire(timeout=30)
        self.runs.append(next(iter(feeds.values())).shape[0])
        if self.fail:
            raise RuntimeError(self.fail)
        return self.inner.run(feeds, size, stream, options)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def gated(model, **kw):
    s = GatedBackend(model.backend, **kw)
    return dataclasses.replace(model, backend=s), s


def make_batcher(model, root, **kw):
    fatal: list[str] = []

    def respond(p, result, stage, m):
        p.thread = threading.get_ident()  # a TPending
        assert p.complete((result, stage, m)), "answered twice"

    b = Batcher(model, FrameOpener(FrameRoots([str(root)]), 8192), max_queue=kw.pop("max_queue", 64),
                batch_timeout_s=0.0, respond=respond, on_fatal=fatal.append, **kw)
    b.start()
    return b, fatal


class TPending(Pending):
    """A Pending that also records the thread that answered it."""

    __slots__ = ("thread",)


def pending(ref, **extra) -> Pending:
    msg = wire.infer_request(ref, MODEL_ID, **extra)
    return TPending(msg, parse_infer(msg, MODEL_ID), time.perf_counter())


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def test_one_batch_runs_one_waits_prepared_the_rest_stay_queued(models, frame_dirs):
    """With runs blocked: one worker runs a batch, the other holds the next one prepared
    (off the queue), the rest wait in the queue where --max-queue counts them; then all are
    answered, each once."""
    root, paths = frame_dirs
    model, sess = gated(models[1])
    sess.gate.clear()
    b, _ = make_batcher(model, root, max_queue=3)
    ps = [pending(paths[i % len(paths)]) for i in range(5)]
    for p in ps[:2]:
        b.submit(p)
    assert sess.started.acquire(timeout=30)   # ps[0] runs
    wait_for(lambda: b.queued() == 0 and b._ahead == 2)  # ps[1] left the queue: prepared
    time.sleep(0.05)
    for p in ps[2:]:
        b.submit(p)
    time.sleep(0.05)
    assert b.queued() == 3                   # the pipeline holds at most one prepared batch
    with pytest.raises(Overloaded):
        b.submit(pending(paths[0]))
    assert b._ahead == MIN_WORKERS and b._busy and not b._filling  # both workers hold a batch
    sess.gate.set()
    for p in ps:
        assert p.wait(30)
        result, stage, m = p.response
        assert isinstance(result, dict), result
        assert stage["batch_size"] == 1 and m is model
    b.stop()
    # queue_ms counts the wait while prepared: ps[1] waited for ps[0]'s whole run
    assert ps[1].response[1]["queue_ms"] >= 40
    for t in b._threads:
        t.join(30)
    assert b._ahead == 0 and not b._busy and not b._filling


@pytest.mark.slow
def test_streams_run_batches_at_once(nudenet_model, frame_dirs):
    """With 2 streams: a batch alone runs SOLO (every thread); batches that come while it
    runs take the streams beside it, so three run at once; every answer is the
    single-stream answer."""
    root, paths = frame_dirs
    spec = ModelSpec(path=nudenet_model, model_id=MODEL_ID, model_name="n", model_version="1",
                     threads=2, streams=2)
    model, sess = gated(load_model(spec, Device("cpu"), 1))
    assert model.streams == 2 and model.backend.solo
    b, _ = make_batcher(model, root)
    assert len(b._threads) == 3  # one per stream, one more to fill
    first = pending(paths[0])
    b.submit(first)
    assert first.wait(30) and sess.streams_used == [SOLO]  # alone: solo
    assert sess.started.acquire(timeout=30)  # (its start)
    sess.gate.clear()
    ps = [pending(paths[i]) for i in range(4)]
    b.submit(ps[0])
    assert sess.started.acquire(timeout=30)  # ps[0] runs solo (held by the gate)
    for p in ps[1:]:
        b.submit(p)
    assert sess.started.acquire(timeout=30) and sess.started.acquire(timeout=30)
    wait_for(lambda: b.queued() == 1)  # three workers run; the fourth request waits
    assert sorted(sess.streams_used) == [SOLO, SOLO, 0, 1]
    sess.gate.set()
    single, _ = make_batcher(load_model(dataclasses.replace(spec, streams=1), Device("cpu"), 1), root)
    want = [pending(paths[i]) for i in range(4)]
    for p in want:
        single.submit(p)
    for p, q in zip(ps, want, strict=True):
        assert p.wait(30) and q.wait(30)
        assert p.response[0]["detections"] == q.response[0]["detections"]
    b.stop()
    single.stop()


def test_a_batch_keeps_the_model_it_captured(models, frame_dirs):
    root, paths = frame_dirs
    a, sess = gated(models[1])
    sess.gate.clear()
    b, _ = make_batcher(a, root)
    p1, p2, p3 = (pending(paths[i]) for i in range(3))
    b.submit(p1)
    assert sess.started.acquire(timeout=30)
    b.submit(p2)
    wait_for(lambda: b.queued() == 0 and b._ahead == 2)  # p2 prepared on model a
    new = dataclasses.replace(models[1])
    b.model = new  # a hot reload swaps the reference
    b.submit(p3)
    sess.gate.set()
    for p in (p1, p2, p3):
        assert p.wait(30)
    assert p1.response[2] is a and p2.response[2] is a and p3.response[2] is new
    b.stop()


def test_sticky_error_answers_everything_and_reports(models, frame_dirs):
    root, paths = frame_dirs
    model, _ = gated(models[1], fail="CUDA failure 700: an illegal memory access")
    if not model.backend.sticky("CUDA failure 700"):
        pytest.skip(f"{model.backend.name} has no sticky errors on a CPU")
    b, fatal = make_batcher(model, root)
    ps = [pending(paths[i % 6]) for i in range(6)]
    for p in ps:
        b.submit(p)
    for p in ps:
        assert p.wait(30)
        assert p.response[0].code == "internal"
    assert fatal
    b.stop()


def test_stop_finishes_queued_requests_then_ends(models, frame_dirs):
    root, paths = frame_dirs
    b, _ = make_batcher(models[1], root)
    ps = [pending(paths[i % 6]) for i in range(8)]
    for p in ps:
        b.submit(p)
    b.stop()
    for t in b._threads:
        t.join(30)
        assert not t.is_alive()
    assert all(p.done() and isinstance(p.response[0], dict) for p in ps)


def test_no_input_buffer_answers_internal_and_the_queue_moves(models, frame_dirs):
    root, paths = frame_dirs
    b, _ = make_batcher(dataclasses.replace(models[1], input_height=-1), root)  # np.empty fails
    ps = [pending(paths[i]) for i in range(3)]
    for p in ps:
        b.submit(p)
    for p in ps:
        assert p.wait(30) and p.response[0].code == "internal"
    b.model = models[1]
    p = pending(paths[0])
    b.submit(p)
    assert p.wait(30) and isinstance(p.response[0], dict)
    b.stop()


def test_batches_fill_while_the_device_is_busy(models, frame_dirs):
    """max_batch 4: requests arriving during a run form the next batch (up to 4)."""
    root, paths = frame_dirs
    model, sess = gated(models[4])
    sess.gate.clear()
    b, _ = make_batcher(model, root)
    first = pending(paths[0])
    b.submit(first)
    assert sess.started.acquire(timeout=30)
    rest = [pending(paths[i % 6]) for i in range(9)]
    for p in rest:
        b.submit(p)
    time.sleep(0.2)
    sess.gate.set()
    for p in [first, *rest]:
        assert p.wait(30)
    assert sess.runs[0] == 1 and sess.runs[1] == 4, sess.runs
    assert sorted(p.response[1]["batch_size"] for p in rest)[-1] == 4
    b.stop()


def test_at_concurrency_one_a_request_stays_on_one_thread(models, frame_dirs):
    """One request at a time: it is prepared, run and answered by the same worker thread
    (handed over once, by submit), never the submitting thread."""
    root, paths = frame_dirs
    model, sess = gated(models[1])
    b, _ = make_batcher(model, root)
    prep_threads: list[int] = []
    preprocess = b._preprocess

    def recording_preprocess(*args):
        prep_threads.append(threading.get_ident())
        return preprocess(*args)

    b._preprocess = recording_preprocess
    for i in range(6):
        p = pending(paths[i])
        b.submit(p)
        assert p.wait(30)
        assert isinstance(p.response[0], dict), p.response
        assert prep_threads[-1] == sess.threads[-1] == p.thread != threading.get_ident()
    assert {t.ident for t in b._threads} >= set(prep_threads)
    b.stop()


def test_a_batch_is_answered_while_the_next_one_runs(models, frame_dirs):
    """The worker that ran batch k answers it after freeing the device, without waiting for
    batch k+1, which the other worker runs meanwhile."""
    root, paths = frame_dirs
    model, sess = gated(models[1])
    sess.permits = threading.Semaphore(0)
    b, _ = make_batcher(model, root)
    p1, p2 = pending(paths[0]), pending(paths[1])
    b.submit(p1)
    assert sess.started.acquire(timeout=30)
    b.submit(p2)
    wait_for(lambda: b._ahead == 2)         # p2 prepared by the other worker
    sess.permits.release()                  # let p1's run through, not p2's
    assert sess.started.acquire(timeout=30)  # p2's run started (and is held)
    assert p1.wait(30) and not p2.done()
    assert p1.thread == sess.threads[0] != sess.threads[1]
    sess.permits.release()
    assert p2.wait(30) and p2.thread == sess.threads[1]
    b.stop()


def test_on_complete_is_called_once_by_the_completing_thread(models, frame_dirs):
    """The hook runs once, in the thread whose complete() won, after the response is set
    and the waiters are released; an exception in it is logged and the workers go on."""
    root, paths = frame_dirs
    b, _ = make_batcher(models[1], root)
    calls: list[tuple[Pending, int, bool]] = []

    def hook(p):
        calls.append((p, threading.get_ident(), p.done() and p.wait(5)))
        if len(calls) <= MIN_WORKERS + 1:
            raise RuntimeError("hook failed")

    ps = [pending(paths[i % 6]) for i in range(8)]
    for p in ps:
        p.on_complete = hook
    for p in ps[:MIN_WORKERS + 1]:  # the hook raises for these
        b.submit(p)
        assert p.wait(30)
    wait_for(lambda: len(calls) == MIN_WORKERS + 1)
    assert all(t.is_alive() for t in b._threads)
    for p in ps[MIN_WORKERS + 1:]:
        b.submit(p)
    for p in ps:
        assert p.wait(30) and isinstance(p.response[0], dict)
    wait_for(lambda: len(calls) == len(ps))
    assert len({id(c[0]) for c in calls}) == len(ps)  # each request's hook once
    for p, tid, released in calls:
        assert tid == p.thread and released
    assert not ps[0].complete(({}, {}, None))  # a late complete loses: no second call
    assert len(calls) == len(ps)
    b.stop()
    for t in b._threads:
        t.join(30)
        assert not t.is_alive()


def test_pending_on_complete_hook_alone():
    seen = []
    p = Pending({}, None, 0.0, on_complete=seen.append)
    assert p.complete({"a": 1}) and not p.complete({"a": 2})
    assert seen == [p] and p.response == {"a": 1} and p.wait(0)
    q = Pending({}, None, 0.0)
    q.on_complete = lambda _: 1 / 0
    assert q.complete({}) and q.done()  # the hook's exception is logged, not raised


# --- postprocess -----------------------------------------------------------------------------

def _postprocess_reference(model, req, pred, geom):
    """The numpy formulation of the detection list (np.round to 6 decimals)."""
    cfg, spec = req.config, model.spec
    max_det = spec.max_detections if cfg.max_detections is None else cfg.max_detections
    mask = None
    if cfg.classes is not None:
        mask = np.zeros(model.num_classes, np.uint8)
        mask[[c for c in cfg.classes if c < model.num_classes]] = 1
    layout = DecodeLayout(num_fields=pred.shape[0], num_classes=pred.shape[0] - 4)
    found = decode_detections(
        layout, pred.T,
        spec.confidence_threshold if cfg.confidence_threshold is None else cfg.confidence_threshold,
        spec.nms_iou_threshold if cfg.nms_iou_threshold is None else cfg.nms_iou_threshold,
        max_det, mask, *geom)
    return [
        {"class_id": c, "class_name": model.class_names[c], "confidence": s, "bbox": b,
         "track_id": None}
        for c, s, b in zip(found.class_ids.tolist(), np.round(found.scores.astype(np.float64), 6).tolist(),
                           np.round(found.boxes.astype(np.float64), 6).tolist(), strict=True)
    ]


def test_round6_scalar_is_numpy_round():
    rng = np.random.default_rng(7)
    xs = [0.0, -0.0, 5e-7, -5e-7, 4e-7, -4e-7, 1.5e-6, 2.5e-6, 0.1234565, 1.0, 0.9999995]
    for scale in (1e-7, 1e-6, 1e-3, 1.0, 1e3):
        xs += (rng.standard_normal(2000).astype(np.float32) * scale).tolist()
    want = np.round(np.asarray(xs, np.float64), 6).tolist()
    got = [round6_scalar(x * 1e6) for x in xs]
    assert json.dumps(got) == json.dumps(want)  # equal, signs of zero included
    for bad in (math.nan, math.inf):
        with pytest.raises((ValueError, OverflowError)):
            round6_scalar(bad)


@pytest.mark.parametrize("config", [{}, {"confidence_threshold": 0.0, "max_detections": 50},
                                    {"confidence_threshold": 0.01, "classes": [0, 2, 5, 10**6]},
                                    {"confidence_threshold": 0.99}])
def test_postprocess_output_is_unchanged(models, frame_dirs, config):
    """The detection lists (keys, order, 6-decimal floats, signs of zero) are exactly those of
    the numpy formulation, on real outputs and on boxes clipped at the frame's edges."""
    root, paths = frame_dirs
    model = models[1]
    b = Batcher(model, FrameOpener(FrameRoots([str(root)]), 8192), max_queue=1,
                batch_timeout_s=0, respond=lambda *a: None, on_fatal=lambda t: None)
    rng = np.random.default_rng(3)
    for ref in paths[:3]:
        req = parse_infer(wire.infer_request(ref, MODEL_ID, config=config), MODEL_ID)
        x = model.new_buffer()
        geom, _ = b._preprocess(model, req.frame_reference, req.frame_metadata, x[0])
        pred = model.run_batch(x, 1)[0][0]
        edge = pred.copy()  # boxes spilling over every edge: clipped to 0 and 1
        edge[:4] += rng.standard_normal(edge[:4].shape).astype(np.float32) * 400
        for p in (pred, edge):
            got = model.head.decode([p[None]], 0, geom, req.config, model.spec)["detections"]
            assert json.dumps(got) == json.dumps(_postprocess_reference(model, req, p, geom))
            assert all(list(d) == ["class_id", "class_name", "confidence", "bbox", "track_id"]
                       for d in got)


@pytest.mark.parametrize("k", [1, 3, 4, 20])
def test_detections_round_as_numpy_for_any_count(k):
    """Few or many detections, zeros of either sign, NaN and inf: the floats are those of
    np.round(x.astype(float64), 6)."""
    rng = np.random.default_rng(k)
    names = tuple(f"c{i}" for i in range(5))
    boxes = rng.random((k, 4), dtype=np.float32)
    scores = rng.random(k, dtype=np.float32)
    class_ids = rng.integers(0, len(names), k).astype(np.int32)
    boxes[0, :2] = [-0.0, -4e-7]
    for special in (None, math.nan, math.inf):
        if special is not None:
            boxes[-1, 2] = special
        found = Decoded(boxes, scores, class_ids, np.arange(k, dtype=np.int32), None, None)
        got = detection_dicts(found, names)
        want = [{"class_id": c, "class_name": names[c], "confidence": s, "bbox": bb,
                 "track_id": None}
                for c, s, bb in zip(class_ids.tolist(), np.round(scores.astype(np.float64), 6).tolist(),
                                    np.round(boxes.astype(np.float64), 6).tolist(), strict=True)]
        assert json.dumps(got) == json.dumps(want)


# --- a real server in-process -------------------------------------------------------------------

@pytest.fixture
def serve(models, frame_dirs):
    servers = []

    def start(max_batch: int, **cfg) -> str:
        d = tempfile.mkdtemp(prefix="vp-")
        path = os.path.join(d, "s.sock")
        srv = Server(models[max_batch], ServerConfig(socket_path=path, frame_roots=(str(frame_dirs[0]),),
                                                     **cfg))
        srv.start()
        servers.append(srv)
        return path

    yield start
    for srv in servers:
        srv.drain()


def _pipelined(path: str, msgs: list[dict]) -> list[dict]:
    with wire.connect(path, 60) as s:
        s.sendall(b"".join(wire.encode(m) for m in msgs))
        s.shutdown(socket.SHUT_WR)
        out = [wire.recv(s) for _ in msgs]
        assert wire.is_closed(s)  # nothing more: each request answered exactly once
    return out


def test_mixed_concurrent_load_answered_once_in_order(serve, frame_dirs):
    root, paths = frame_dirs
    path = serve(1, max_queue=40)
    kinds = ["ok", "missing", "late", "ok", "badfmt", "ok"]

    def msg(c: int, i: int) -> dict:
        kind = kinds[(c + i) % len(kinds)]
        m = wire.infer_request(paths[i % len(paths)], MODEL_ID, request_id=f"{c}-{i}")
        if kind == "missing":
            m["frame_reference"] = str(root / "nope")
        elif kind == "late":
            m["deadline_ms"] = 1e-6
        elif kind == "badfmt":
            m["frame_reference"] = str(root / "raw.bin")
            m["frame_metadata"] = {"width": 4, "height": 4, "format": "YUYV"}
        return m

    streams = [[msg(c, i) for i in range(24)] for c in range(5)]
    results: list[list[dict] | None] = [None] * len(streams)

    def client(c: int) -> None:
        results[c] = _pipelined(path, streams[c])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for msgs, got in zip(streams, results, strict=True):
        assert got is not None
        assert [r["request_id"] for r in got] == [m["request_id"] for m in msgs]
        for m, r in zip(msgs, got, strict=True):
            code = r["error_code"]
            if m.get("deadline_ms"):
                assert code in ("deadline_exceeded", "overloaded"), r
            elif "nope" in m["frame_reference"]:
                assert code in ("frame_not_found", "overloaded"), r
            elif m["frame_metadata"]:
                assert code in ("invalid_request", "unsupported_format", "frame_not_found",
                                "overloaded"), r
            else:
                assert code in (None, "overloaded"), r
            if code is None:
                md = r["metadata"]
                assert md["total_ms"] >= md["queue_ms"] + md["preprocess_ms"] + md["inference_ms"] - 0.5
    codes = [r["error_code"] for got in results for r in got]
    assert codes.count(None) >= 20 and codes.count("deadline_exceeded") >= 5, codes


def test_batched_results_equal_unbatched(serve, frame_dirs):
    _, paths = frame_dirs
    one, four = serve(1), serve(4)
    msgs = [wire.infer_request(p, MODEL_ID, request_id=i, config={"confidence_threshold": 0.05})
            for i, p in enumerate(paths * 3)]
    a, b = _pipelined(one, msgs), _pipelined(four, msgs)
    assert max(r["metadata"]["batch_size"] for r in b) > 1
    for ra, rb in zip(a, b, strict=True):
        assert ra["error_code"] is None and rb["error_code"] is None
        assert ra["request_id"] == rb["request_id"]
        da, db = ra["detections"], rb["detections"]
        assert [d["class_id"] for d in da] == [d["class_id"] for d in db]
        for x, y in zip(da, db, strict=True):
            assert abs(x["confidence"] - y["confidence"]) <= 1e-4
            assert np.allclose(x["bbox"], y["bbox"], atol=1e-4)


# --- no copy of frame bytes in Python --------------------------------------------------------

def test_cpu_path_reads_the_frame_in_place(models, shm_dir):
    """OpenFrame.view is a FrameView over the mmap, and preprocessing a 4K frame allocates
    far less in Python than the frame's 12 MB (the kernel reads the mapping in place)."""
    w, h = 3840, 2160
    nv12 = np.full(w * h * 3 // 2, 128, np.uint8)
    path = shm_dir / "k4"
    frames.write_frame_dir(path, nv12, width=w, height=h, pixel_format="NV12")
    b = Batcher(models[1], FrameOpener(FrameRoots([str(shm_dir)]), 8192), max_queue=1,
                batch_timeout_s=0, respond=lambda *a: None, on_fatal=lambda t: None)
    req = parse_infer(wire.infer_request(str(path), MODEL_ID), MODEL_ID)
    f = b.opener.open(req.frame_reference, req.frame_metadata)
    try:
        assert isinstance(f.view, FrameView) and f.view.length >= nv12.nbytes
        assert memoryview(f.view).readonly
        maps = Path("/proc/self/maps").read_text()
        assert str(path / "frame.data") in maps  # mapped, not read
    finally:
        f.close()
    slot = models[1].new_input(1)[0]
    b._preprocess(models[1], req.frame_reference, req.frame_metadata, slot)  # warm
    tracemalloc.start()
    try:
        b._preprocess(models[1], req.frame_reference, req.frame_metadata, slot)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < nv12.nbytes / 100, peak
    mid = slot[:, slot.shape[1] // 2, slot.shape[2] // 2]
    assert np.allclose(mid, 128 / 255, atol=0.05)  # it did read the frame


# --- --preprocess-threads ----------------------------------------------------------------------

def test_preprocess_threads_zero_is_refused(nudenet_model, tmp_path):
    from serve_cli import assert_refused, run_serve

    assert_refused(run_serve("--model", nudenet_model, "--socket", str(tmp_path / "s.sock"),
                             "--preprocess-threads", "0"), "--preprocess-threads")


def test_preprocess_threads_accepted(server_factory, astronaut_frame):
    server = server_factory("--preprocess-threads", "2")
    resp = wire.roundtrip(server.socket, wire.infer_request(str(astronaut_frame), "nudenet-320n"))
    assert resp["error_code"] is None, resp


# --- batching on == batching off, under many concurrent clients ------------------------------

@pytest.fixture(scope="module")
def mixed_frames(astronaut_rgb):
    """Frames in all four formats, as export dirs and raw files, of a few sizes and strides:
    (frame_reference, frame_metadata) pairs."""
    import cv2

    root = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="vasipc-mixed-"))
    refs = []
    for i, fmt in enumerate(("NV12", "I420", "BGR24", "RGB24")):
        for j, (w, h) in enumerate(((320, 240), (512, 288), (200, 400))):
            rgb = cv2.resize(np.roll(astronaut_rgb, 30 * j, axis=1), (w, h),
                             interpolation=cv2.INTER_AREA)
            stride = frames.packed_stride(w, fmt) + (64 if j == 1 else 0)
            data = frames.encode_frame(rgb, fmt, stride)
            d = root / f"d{i}{j}"
            frames.write_frame_dir(d, data, width=w, height=h, pixel_format=fmt, stride=stride,
                                   frame_id=10 * i + j)
            refs.append((str(d), {}))
            raw = root / f"r{i}{j}.raw"
            frames.write_raw_frame(raw, data, 0)
            refs.append((str(raw), {"width": w, "height": h, "format": fmt, "stride": stride,
                                    "frame_id": 10 * i + j}))
    yield root, refs
    import shutil
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_batching_on_equals_off_under_32_concurrent_clients(models, mixed_frames):
    """Issue 4's CPU check: 32 clients at once, mixed frames, formats and frame forms; each
    request's answer from a batching server (max batch 4) equals its answer from an
    unbatched one: same classes, confidences and boxes within 1e-4."""
    root, refs = mixed_frames
    socks, servers = [], []
    for mb in (1, 4):
        path = os.path.join(tempfile.mkdtemp(prefix="vp-"), "s.sock")
        srv = Server(models[mb], ServerConfig(socket_path=path, frame_roots=(str(root),)))
        srv.start()
        servers.append(srv)
        socks.append(path)
    try:
        plan = [[refs[(c * 7 + k) % len(refs)] for k in range(4)] for c in range(32)]

        def client(path: str, items: list, out: list) -> None:
            with wire.connect(path, 120) as s:
                for n, (ref, md) in enumerate(items):
                    wire.send(s, wire.infer_request(ref, MODEL_ID, frame_metadata=md, request_id=n,
                                                    config={"confidence_threshold": 0.05}))
                    out.append(wire.recv(s))

        answers = {}
        for path in socks:
            outs = [[] for _ in plan]
            threads = [threading.Thread(target=client, args=(path, items, out))
                       for items, out in zip(plan, outs, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            assert not any(t.is_alive() for t in threads)
            answers[path] = outs
        unbatched, batched = answers[socks[0]], answers[socks[1]]
        sizes = [r["metadata"]["batch_size"] for out in batched for r in out]
        assert max(sizes) > 1, "the batching server never batched"
        for out_a, out_b in zip(unbatched, batched, strict=True):
            assert len(out_a) == len(out_b) == 4
            for ra, rb in zip(out_a, out_b, strict=True):
                assert ra["error_code"] is None and rb["error_code"] is None, (ra, rb)
                assert ra["frame_id"] == rb["frame_id"] and ra["request_id"] == rb["request_id"]
                da, db = ra["detections"], rb["detections"]
                assert [d["class_id"] for d in da] == [d["class_id"] for d in db]
                for x, y in zip(da, db, strict=True):
                    assert abs(x["confidence"] - y["confidence"]) <= 1e-4
                    assert np.allclose(x["bbox"], y["bbox"], atol=1e-4)
    finally:
        for srv in servers:
            srv.drain()


class _FailingRuns:
    """Wraps an ORT session: every IO-bound run fails with `text`."""

    def __init__(self, inner, text: str) -> None:
        self.inner, self.text = inner, text

    def run_with_iobinding(self, *args, **kwargs):
        raise RuntimeError(self.text)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_sticky_device_error_in_graph_preprocessing_reports(nudenet_model, frame_dirs):
    """On the device path the preprocessing graph runs on the GPU too: a sticky CUDA error
    there answers `internal` and makes the session fatal, as one in the model's run does."""
    root, paths = frame_dirs
    spec = ModelSpec(path=nudenet_model, model_id=MODEL_ID, model_name="n", model_version="1",
                     threads=1)
    model = load_model(spec, Device("cpu"), 1, preprocess="graph")
    dp = model.device_path
    dp._sessions[frames.NV12] = _FailingRuns(dp.preprocess_session(frames.NV12),
                                             "CUDA failure 700: an illegal memory access")
    b, fatal = make_batcher(model, root)
    p = pending(paths[0])
    b.submit(p)
    assert p.wait(30)
    err = p.response[0]
    assert err.code == "internal" and "CUDA failure" in err.message
    assert fatal and "illegal memory access" in fatal[0]
    b.stop()


def test_ordinary_preprocessing_failure_is_not_fatal(nudenet_model, frame_dirs):
    root, paths = frame_dirs
    spec = ModelSpec(path=nudenet_model, model_id=MODEL_ID, model_name="n", model_version="1",
                     threads=1)
    model = load_model(spec, Device("cpu"), 1, preprocess="graph")
    dp = model.device_path
    dp._sessions[frames.NV12] = _FailingRuns(dp.preprocess_session(frames.NV12), "shape mismatch")
    b, fatal = make_batcher(model, root)
    p = pending(paths[0])
    b.submit(p)
    assert p.wait(30)
    assert p.response[0].code == "internal"
    assert not fatal
    b.stop()


# --- hot reload ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_set_model_frees_the_old_model_once_idle(models, frame_dirs):
    """After a reload the idle workers let go of the old model's buffers at once: the old
    LoadedModel (on a GPU: its session and device buffers) is freed without waiting for
    more work, and the next request runs on the new model."""
    import gc
    import weakref

    root, paths = frame_dirs
    old = dataclasses.replace(models[4])  # objects of their own, sharing the session
    new = dataclasses.replace(models[4], spec=dataclasses.replace(models[4].spec, model_version="2"))
    b, fatal = make_batcher(old, root)
    try:
        reqs = [pending(paths[i % len(paths)]) for i in range(8)]  # both workers get a batch
        for p in reqs:
            b.submit(p)
        for p in reqs:
            assert p.wait(30)
            assert p.response[2] is old
        gone = weakref.ref(old)
        del old, reqs, p
        b.set_model(new)
        wait_for(lambda: (gc.collect(), gone() is None)[1])
        q = pending(paths[0])
        b.submit(q)
        assert q.wait(30) and q.response[2] is new
        assert not fatal
    finally:
        b.stop()
