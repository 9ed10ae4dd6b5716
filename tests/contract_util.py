"""Helpers shared by the contract suites of sections 3-6 (requests, responses, frames, model).

Everything goes over the wire by hand (tests/wire.py); nothing here imports the server.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import wire

from vasipc import frames

MODEL_ID = "nudenet-320n"

RESPONSE_KEYS = {"model_id", "camera_id", "frame_id", "detections", "metadata", "error",
                 "error_code", "request_id"}
METADATA_KEYS = {"preprocess_ms", "inference_ms", "postprocess_ms", "queue_ms", "total_ms",
                 "batch_size", "model_version", "device"}
ERROR_CODES = ("invalid_message", "message_too_large", "invalid_request", "model_mismatch",
               "shutting_down", "overloaded", "deadline_exceeded", "frame_forbidden",
               "frame_not_found", "unsupported_format", "frame_invalid", "frame_changed",
               "internal")
FORMATS = tuple(frames.PIXEL_FORMATS)  # every pixel format of docs/contract.md 5.3


def is_number(v: Any) -> bool:
    return type(v) in (int, float)


def infer_msg(ref: str | os.PathLike, md: dict | None = None, *, model_id: str = MODEL_ID,
              **extra: Any) -> dict:
    return wire.infer_request(str(ref), model_id, md, **extra)


def infer(sock: str, ref: str | os.PathLike, md: dict | None = None, *,
          model_id: str = MODEL_ID, timeout: float = 30.0, **extra: Any) -> dict:
    return wire.roundtrip(sock, infer_msg(ref, md, model_id=model_id, **extra), timeout)


def health(sock: str) -> dict:
    return wire.roundtrip(sock, {"op": "health"})


def assert_ok(resp: dict) -> list[dict]:
    assert resp.get("error_code") is None and resp.get("error") is None, resp
    return resp["detections"]


def assert_error(resp: dict, code: str) -> dict:
    assert resp.get("error_code") == code, resp
    assert isinstance(resp.get("error"), str) and resp["error"], resp
    assert resp["detections"] == [], resp
    return resp


def assert_serving(sock: str) -> None:
    """The server still answers: health is ok and ready."""
    h = health(sock)
    assert h["status"] == "ok" and h["ready"] is True, h


def wait_idle(sock: str, timeout: float = 30.0) -> bool:
    """True once health reports no infer request in flight (a response can reach the client
    a moment before the server has booked it as written)."""
    deadline = time.monotonic() + timeout
    while health(sock)["in_flight"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def class_ids(resp: dict) -> list[int]:
    return [d["class_id"] for d in assert_ok(resp)]


# --- frames ----------------------------------------------------------------------------------

def write_dir(path: Path, rgb: np.ndarray, fmt: str = "NV12", *, stride: int | None = None,
              frame_id: int = 42) -> Path:
    h, w = rgb.shape[:2]
    frames.write_frame_dir(path, frames.encode_frame(rgb, fmt, stride), width=w, height=h,
                           pixel_format=fmt, stride=stride, frame_id=frame_id)
    return path


def write_meta(path: Path, **fields: int) -> None:
    """Write a raw `frame.meta` (any field values, valid or not) by atomic rename."""
    hdr = {"version": 1, "frame_id": 42, "timestamp_ns": 1, "width": 2, "height": 2,
           "pixel_format": frames.NV12, "stride": 2, "data_size": 6}
    hdr.update(fields)
    tmp = path / ".frame.meta.tmp"
    tmp.write_bytes(frames.FrameHeader(**hdr).pack())
    os.replace(tmp, path / "frame.meta")


def write_raw(path: Path, rgb: np.ndarray, fmt: str = "NV12", *, stride: int | None = None,
              offset: int = 0) -> dict:
    """A raw frame file; returns the frame_metadata describing it."""
    h, w = rgb.shape[:2]
    frames.write_raw_frame(path, frames.encode_frame(rgb, fmt, stride), offset)
    md = {"width": w, "height": h, "format": fmt, "offset": offset}
    if stride is not None:
        md["stride"] = stride
    return md


def gray(h: int = 64, w: int = 64, value: int = 128) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


# --- load ------------------------------------------------------------------------------------

def concurrent(sock: str, msgs: list[dict], timeout: float = 60.0) -> list[dict]:
    """Send each message on its own connection at (nearly) the same time; the answers."""
    results: list[Any] = [None] * len(msgs)
    start = threading.Barrier(len(msgs))

    def one(i: int) -> None:
        try:
            with wire.connect(sock, timeout) as s:
                start.wait(30)
                wire.send(s, msgs[i])
                results[i] = wire.recv(s)
        except Exception as exc:  # reported by the caller's asserts
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(msgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 15)
    bad = [r for r in results if not isinstance(r, dict)]
    assert not bad, bad
    return results


def pipeline(sock: str, msgs: list[dict], timeout: float = 60.0) -> list[dict]:
    """Send every message on one connection before reading, then read the answers in order."""
    with wire.connect(sock, timeout) as s:
        s.sendall(b"".join(wire.encode(m) for m in msgs))
        return [wire.recv(s) for _ in msgs]


def requests_read(sock: str) -> int:
    """`infer` requests the server has read so far (health's requests_total)."""
    return wire.roundtrip(sock, {"op": "health"})["requests_total"]


def wait_read(sock: str, total: int, timeout: float = 60.0) -> None:
    """Until the server has read `total` infer requests (not a sleep: a loaded machine may
    take any time to schedule the server's I/O thread)."""
    deadline = time.monotonic() + timeout
    while requests_read(sock) < total:
        assert time.monotonic() < deadline, f"the server did not read {total} requests"
        time.sleep(0.005)


class BackgroundLoad:
    """Keeps `depth` slow requests queued on one pipelined connection while the block runs."""

    def __init__(self, sock: str, msg: dict, depth: int) -> None:
        self.sock, self.msg, self.depth = sock, msg, depth
        self.responses: list[dict] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.responses = pipeline(self.sock, [self.msg] * self.depth, timeout=120.0)

    def __enter__(self) -> BackgroundLoad:
        before = requests_read(self.sock)
        self._thread.start()
        wait_read(self.sock, before + self.depth)  # every request is read: queued or running
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(150)


# Pauses between sending a request and changing its frame: they move the change through the
# server's read (open, map, copy, re-check), from before it starts to after it ends.
IN_FLIGHT_PAUSES = (0.0, 0.0005, 0.002, 0.005, 0.02)


def changed_in_flight(sock: str, ref: str | os.PathLike, md: dict | None, rounds: int,
                      change: Callable[[int], None], restore: Callable[[], None], *,
                      model_id: str = MODEL_ID) -> list[dict]:
    """The answers to `rounds` requests for `ref` on one connection, each with its frame changed
    under it: after sending request i and before reading its answer the test calls
    `change(i)`, after the answer `restore()`. The test makes every change itself, one per
    request, so what is tested does not depend on how threads are scheduled; where in the
    server's read a change lands does, so the caller accepts every outcome a change may cause."""
    answers = []
    with wire.connect(sock, 60) as s:
        for i in range(rounds):
            wire.send(s, infer_msg(ref, md, model_id=model_id))
            time.sleep(IN_FLIGHT_PAUSES[i % len(IN_FLIGHT_PAUSES)])
            change(i)
            answers.append(wire.recv(s))
            restore()
    return answers


def raw_4k_truncated_in_flight(sock: str, path: Path, rounds: int = 20, *,
                               model_id: str = MODEL_ID) -> tuple[list[str | None], dict]:
    """A 4K NV12 raw frame file at `path`, shrunk under each of `rounds` requests (to nothing,
    a page, a third, half) and restored after its answer; returns the answers' error codes
    and the file's frame_metadata. 20 rounds pair each shrink with each pause."""
    w, h = 3840, 2160
    size = frames.frame_size(w, h, "NV12")
    frames.write_raw_frame(path, np.random.default_rng(1).integers(0, 256, size, np.uint8))
    md = {"width": w, "height": h, "format": "NV12"}
    shrunk = (0, 4096, size // 3, size // 2)
    answers = changed_in_flight(sock, path, md, rounds,
                                lambda i: os.truncate(path, shrunk[i % len(shrunk)]),
                                lambda: os.truncate(path, size), model_id=model_id)
    return [a["error_code"] for a in answers], md
