"""docs/contract.md section 7 (lifecycle): bind only when warm, drain on SIGTERM/SIGINT, the drain
timeout, statelessness. Real servers, real signals."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import wire

from vasipc import frames

pytestmark = pytest.mark.usefixtures("every_backend")  # each test on every runtime

MODEL_ID = "nudenet-320n"


def health_on(sock: socket.socket) -> dict:
    wire.send(sock, {"op": "health"})
    resp = wire.recv(sock)
    assert resp.get("op") == "health", resp
    return resp


def pipelined_infers(path: str, frame: Path, model_id: str, n_conn: int,
                     depth: int) -> list[socket.socket]:
    """n_conn connections, each with `depth` infer requests written in one go; request_id
    "c-k" is the k-th request of connection c."""
    socks = []
    for c in range(n_conn):
        s = wire.connect(path, timeout=60)
        s.sendall(b"".join(wire.encode(wire.infer_request(str(frame), model_id,
                                                          request_id=f"{c}-{k}"))
                           for k in range(depth)))
        socks.append(s)
    return socks


def wait_all_read(monitor: socket.socket, total: int, timeout: float = 30.0,
                  exact: bool = True) -> dict:
    """Poll health until the server has read all `total` infer requests (at least `total`,
    when not `exact`)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health_on(monitor)
        if h["requests_total"] >= total:
            assert h["requests_total"] == total or not exact, h
            return h
        assert time.monotonic() < deadline, f"the server read only {h} of {total} requests"
        time.sleep(0.002)


def wait_gone(path: str, timeout: float = 30.0) -> None:
    """Until `path` is gone (`timeout` is a hang guard)."""
    deadline = time.monotonic() + timeout
    while os.path.lexists(path):
        assert time.monotonic() < deadline, f"{path} still there after {timeout} s"
        time.sleep(0.002)


def read_answers(socks: list[socket.socket], depth: int) -> list[list[dict]]:
    out = []
    for c, s in enumerate(socks):
        answers = [wire.recv(s) for _ in range(depth)]
        assert [a["request_id"] for a in answers] == [f"{c}-{k}" for k in range(depth)]
        out.append(answers)
    return out


# --- start -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_socket_appears_only_when_warm(server_factory, bench_model):
    """The first successful connect already finds the model loaded and warm: health says
    ready; nothing answers "starting". (A slow model with four warm-up batch sizes makes
    the window before the bind wide.)"""
    server = server_factory("--max-batch", "4", model=bench_model, model_id="bench-warm",
                            wait=False)
    path = server.socket
    deadline = time.monotonic() + 60
    while True:
        assert server.proc.poll() is None, server.stderr_text()
        assert time.monotonic() < deadline, server.stderr_text()
        if os.path.lexists(path):
            try:
                s = wire.connect(path, timeout=10)
            except (ConnectionRefusedError, FileNotFoundError):
                continue  # bound, not yet listening
            with s:
                h = health_on(s)
            assert h["ready"] is True and h["status"] == "ok", h
            break
        time.sleep(0.001)
    info = wire.roundtrip(path, {"op": "info"})
    assert info["max_batch_size"] == 4
    assert server.stop() == 0


# --- drain -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["TERM", "INT"])
def test_signal_drains_in_flight_requests(server_factory, astronaut_frame, sig):
    n_conn, depth = 4, 8
    server = server_factory("--max-queue", "2048", "--drain-timeout", "120")
    path = server.socket
    monitor = wire.connect(path)
    socks = pipelined_infers(path, astronaut_frame, MODEL_ID, n_conn, depth)
    try:
        h = wait_all_read(monitor, n_conn * depth)
        assert h["in_flight"] > 0, h
        server.proc.send_signal(sig)
        # the listening socket goes at once, while requests are still in flight
        wait_gone(path)
        h = health_on(monitor)
        assert h["status"] == "draining" and h["ready"] is False, h
        assert h["in_flight"] > 0, h
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            wire.connect(path, timeout=1)
        # a new infer on an open connection is refused; info still answered
        wire.send(monitor, wire.infer_request(str(astronaut_frame), MODEL_ID,
                                              request_id="late"))
        late = wire.recv(monitor)
        assert late["error_code"] == "shutting_down" and late["request_id"] == "late", late
        assert late["detections"] == [] and late["error"], late
        wire.send(monitor, {"op": "info", "request_id": "i"})
        assert wire.recv(monitor)["op"] == "info"
        # codes that come before shutting_down still win (docs/contract.md 4)
        wire.send(monitor, wire.infer_request(str(astronaut_frame), "someone-else"))
        assert wire.recv(monitor)["error_code"] == "model_mismatch"
        wire.send(monitor, {"frame_reference": str(astronaut_frame), "model_id": MODEL_ID})
        assert wire.recv(monitor)["error_code"] == "invalid_request"
        # every request read before the signal is answered normally
        for answers in read_answers(socks, depth):
            for a in answers:
                assert a["error_code"] is None and a["frame_id"] == 42, a
                assert a["detections"], a
        assert server.proc.wait(30) == 0, server.stderr_text()
        assert "Traceback" not in server.stderr_text()
    finally:
        monitor.close()
        for s in socks:
            s.close()


@pytest.mark.slow
def test_signal_answers_what_was_sent_beyond_the_pipeline_depth(server_factory, astronaut_frame):
    """More requests pipelined on one connection than the server reads ahead (64): the ones
    the client had sent before the signal are answered normally; one sent after the
    socket is gone gets shutting_down."""
    depth = 150
    server = server_factory("--max-queue", "2048", "--drain-timeout", "120")
    path = server.socket
    socks = pipelined_infers(path, astronaut_frame, MODEL_ID, 1, depth)
    try:
        server.proc.send_signal(signal.SIGTERM)
        wait_gone(path)
        wire.send(socks[0], wire.infer_request(str(astronaut_frame), MODEL_ID, request_id="late"))
        for a in read_answers(socks, depth)[0]:
            assert a["error_code"] is None and a["detections"], a
        late = wire.recv(socks[0])
        assert late["request_id"] == "late" and late["error_code"] == "shutting_down", late
        assert server.proc.wait(60) == 0, server.stderr_text()
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_signal_with_nothing_in_flight_exits_0_at_once(server_factory):
    """An idle connection does not hold the exit up: with a drain timeout longer than
    stop's 30 s hang guard, a server waiting on it would be killed and the test fail."""
    server = server_factory("--drain-timeout", "120")
    with wire.connect(server.socket) as idle:
        assert server.stop(signal.SIGTERM) == 0
        assert wire.is_closed(idle, 30)


@pytest.mark.slow
@pytest.mark.parametrize("n_conn, depth", [(2, 16), (1, 100)], ids=["2x16", "1x100"])
def test_drain_timeout_answers_the_rest_shutting_down(server_factory, astronaut_frame,
                                                      bench_model, n_conn, depth):
    """--drain-timeout 0.2 with ~2.5 s of work queued: what is not done by then is answered
    shutting_down (exit does not wait for the queue), nothing is lost, the exit code is 1.
    (1x100: more than the server reads ahead on one connection, 64.)"""
    server = server_factory("--drain-timeout", "0.2", "--conf", "0.99", model=bench_model,
                            model_id="bench-drain")
    path = server.socket
    monitor = wire.connect(path)
    socks = pipelined_infers(path, astronaut_frame, "bench-drain", n_conn, depth)
    try:
        # beyond 64 a connection's requests wait in the server's buffer: not counted yet
        wait_all_read(monitor, min(depth, 64) * n_conn, exact=depth <= 64)
        server.proc.send_signal(signal.SIGTERM)
        all_answers = read_answers(socks, depth)
        code = server.proc.wait(30)
    finally:
        monitor.close()
        for s in socks:
            s.close()
    assert code == 1, server.stderr_text()
    refused = 0
    for answers in all_answers:  # each in request order (read_answers checks request_id)
        codes = [a["error_code"] for a in answers]
        assert set(codes) <= {None, "shutting_down"}, codes
        # Not necessarily the done ones first: the workers finish batches in no set order
        # (a starved thread may answer request k after k+1's batch ran), and a request
        # whose batch finished before the timeout keeps its answer.
        for a in answers:
            if a["error_code"] == "shutting_down":
                assert a["detections"] == [] and a["error"], a
            else:
                assert a["frame_id"] == 42, a
        refused += codes.count("shutting_down")
    assert refused >= n_conn * depth // 2, f"only {refused} requests got shutting_down"


# --- state -------------------------------------------------------------------------------------

def test_no_state_between_requests(nudenet_server, astronaut_frame, astronaut_rgb, shm_dir):
    """The same frame gives the same detections whatever came before, from any camera;
    track_id is always null."""
    other = shm_dir / "other"
    flipped = np.ascontiguousarray(astronaut_rgb[::-1, ::-1])
    frames.write_frame_dir(other, frames.rgb_to_nv12(flipped), width=flipped.shape[1],
                           height=flipped.shape[0], pixel_format="NV12", frame_id=7)
    path = nudenet_server.socket

    def infer(ref: Path, camera: str) -> list[dict]:
        msg = wire.infer_request(str(ref), MODEL_ID)
        msg["camera_id"] = camera
        resp = wire.roundtrip(path, msg)
        assert resp["error_code"] is None, resp
        assert all(d["track_id"] is None for d in resp["detections"]), resp
        return resp["detections"]

    first = infer(astronaut_frame, "cam-a")
    assert first
    other_dets = infer(other, "cam-a")
    assert other_dets != first
    assert infer(astronaut_frame, "cam-a") == first
    assert infer(astronaut_frame, "cam-b") == first
    for _ in range(3):
        infer(other, "cam-b")
    with wire.connect(path) as s:  # on a kept connection too
        for _ in range(3):
            wire.send(s, wire.infer_request(str(astronaut_frame), MODEL_ID))
            assert wire.recv(s)["detections"] == first
