"""vasipc.client against real servers (docs/contract.md sections 1-4, 8), plus a scripted fake
server for the failures a real one does not produce on demand."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from vasipc import errors, frames
from vasipc.client import Client, Detection, InferResult, Mask, ServerInfo, discover

MODEL_ID = "nudenet-320n"
METADATA_KEYS = {"preprocess_ms", "inference_ms", "postprocess_ms", "queue_ms", "total_ms",
                 "batch_size", "model_version", "device"}


@pytest.fixture
def client(nudenet_server) -> Iterator[Client]:
    with Client(nudenet_server.socket, model_id=MODEL_ID) as c:
        yield c


def requests_total(path: str) -> int:
    with Client(path, pool_size=0) as c:
        return c.health()["requests_total"]


# --- infer -----------------------------------------------------------------------------------

def test_infer_astronaut(client, astronaut_frame):
    result = client.infer(astronaut_frame, camera_id="cam-1", request_id="r-1")
    assert isinstance(result, InferResult)
    assert (result.model_id, result.camera_id, result.frame_id, result.request_id) == (
        MODEL_ID, "cam-1", 42, "r-1")
    assert all(isinstance(d, Detection) for d in result.detections)
    assert "FACE_FEMALE" in [d.class_name for d in result.detections]
    for det in result.detections:
        assert isinstance(det.class_id, int) and isinstance(det.confidence, float)
        x0, y0, x1, y1 = det.bbox
        assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
        assert det.track_id is None
    confidences = [d.confidence for d in result.detections]
    assert confidences == sorted(confidences, reverse=True)
    assert result.metadata.keys() >= METADATA_KEYS
    assert result.raw["error_code"] is None and result.raw["error"] is None


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["yolo-segment", "yolo-pose", "yolo-pose-xy", "yolo-obb",
                                       "yolo-classify"])
def test_infer_task_fields(case_name, server_factory, tmp_path, astronaut_frame):
    """Each task's fields arrive typed: Mask (its to_array() is pycocotools' decode of the
    RLE), keypoints, rotated boxes and polygons, classifications."""
    import numpy as np
    from family_models import build

    case, model = build(case_name, tmp_path / "model")
    server = server_factory(model=str(model), model_id="m")
    with Client(server.socket, model_id="m") as c:
        result = c.infer(astronaut_frame, camera_id="c")
        polygons = c.infer(astronaut_frame, camera_id="c", config={"mask_format": "polygon"})
    if case.task == "classify":
        assert result.detections == [] and len(result.classifications) == 5
        assert result.classifications[0].class_name == "class_3"
        return
    assert result.classifications is None and result.detections
    for det, raw in zip(result.detections, result.raw["detections"], strict=True):
        if case.task == "segment":
            mask_utils = pytest.importorskip("pycocotools.mask")
            want = mask_utils.decode({"size": raw["mask"]["size"],
                                      "counts": raw["mask"]["counts"].encode()})
            got = det.mask.to_array()
            assert got.dtype == np.bool_ and got.shape == tuple(raw["mask"]["size"])
            assert np.array_equal(got, want.astype(bool)) and got.any()
        else:
            assert det.mask is None
        if case.task == "pose":
            assert len(det.keypoints) == 17 and all(len(k) == 3 for k in det.keypoints)
            assert (det.keypoints[0][2] is None) == (case.kpt_shape[1] == 2)
        if case.task == "obb":
            assert len(det.rotated_box) == 5 and len(det.polygon) == 4
    if case.task == "segment":
        assert all(d.polygon and d.mask is None for d in polygons.detections)


def test_mask_rle_round_trip():
    """Mask.to_array reads what pycocotools writes, for masks of every shape."""
    import numpy as np

    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(5)
    for h, w in [(1, 1), (3, 7), (64, 96), (37, 101)]:
        for density in (0.0, 0.02, 0.5, 1.0):
            m = rng.random((h, w)) < density
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            got = Mask((h, w), rle["counts"].decode()).to_array()
            assert np.array_equal(got, m), (h, w, density)
    with pytest.raises(ValueError, match="covers"):
        Mask((2, 2), "1").to_array()


def test_infer_learns_model_id_from_info(nudenet_server, astronaut_frame):
    with Client(nudenet_server.socket) as c:
        assert c.model_id is None
        result = c.infer(str(astronaut_frame), camera_id="cam-1", request_id=7)
        assert c.model_id == MODEL_ID
    assert result.model_id == MODEL_ID and result.request_id == 7


def test_infer_config_and_raw_frame(client, shm_dir, astronaut_rgb):
    height, width = astronaut_rgb.shape[:2]
    raw = shm_dir / "ring.raw"
    offset = 4096
    frames.write_raw_frame(raw, frames.encode_frame(astronaut_rgb, "BGR24"), offset=offset)
    meta = {"width": width, "height": height, "format": "bgr", "offset": offset, "frame_id": 9}
    full = client.infer(raw, camera_id="c", frame_metadata=meta)
    assert full.frame_id == 9 and "FACE_FEMALE" in [d.class_name for d in full.detections]
    assert client.infer(raw, camera_id="c", frame_metadata=meta,
                        config={"max_detections": 0}).detections == []
    one = client.infer(raw, camera_id="c", frame_metadata=meta, config={"max_detections": 1})
    assert one.detections == full.detections[:1]


def test_health_and_info(client, nudenet_server):
    health = client.health()
    assert health["op"] == "health" and health["ready"] is True and health["status"] == "ok"
    assert health["model_id"] == MODEL_ID
    info = client.info()
    assert info["op"] == "info" and info["protocol_version"] == 1
    assert info["model_id"] == MODEL_ID and info["task"] == "detect"
    assert "FACE_FEMALE" in info["classes"]
    assert info["socket"] == nudenet_server.socket


# --- errors ----------------------------------------------------------------------------------

def _write_header(path: Path, **changes) -> Path:
    """A frame-export dir whose header is valid but for `changes`."""
    fields = dict(version=1, frame_id=5, timestamp_ns=1, width=64, height=48,
                  pixel_format=frames.NV12, stride=64, data_size=64 * 72)
    fields.update(changes)
    path.mkdir()
    (path / "frame.data").write_bytes(bytes(64 * 72))
    (path / "frame.meta").write_bytes(frames.FrameHeader(**fields).pack())
    return path


ERROR_CASES: dict[str, tuple[type[errors.VasipcError], Callable[[Path, Path], dict]]] = {
    "frame_not_found": (errors.FrameNotFound,
                        lambda shm, tmp: {"frame_reference": str(shm / "missing")}),
    "frame_forbidden": (errors.FrameForbidden, lambda shm, tmp: {
        "frame_reference": str(_write_header(tmp / "outside"))}),
    "model_mismatch": (errors.ModelMismatch, lambda shm, tmp: {"model_id": "someone-else"}),
    "relative_path": (errors.InvalidRequest, lambda shm, tmp: {"frame_reference": "rel/frame"}),
    "frame_invalid": (errors.FrameInvalid, lambda shm, tmp: {
        "frame_reference": str(_write_header(shm / "odd", width=63))}),
    "unsupported_format": (errors.UnsupportedFormat, lambda shm, tmp: {
        "frame_reference": str(_write_header(shm / "yuyv", pixel_format=77))}),
    "frame_changed": (errors.FrameChanged, lambda shm, tmp: {
        "frame_reference": str(_write_header(shm / "changed")), "frame_metadata": {"frame_id": 6}}),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_codes_raise_their_class(client, astronaut_frame, shm_dir, tmp_path, case):
    expected, make_args = ERROR_CASES[case]
    kwargs = {"frame_reference": str(astronaut_frame), "camera_id": "cam-e", "request_id": case}
    kwargs.update(make_args(shm_dir, tmp_path))
    with pytest.raises(expected) as info:
        client.infer(**kwargs)
    resp = info.value.response
    assert resp["error_code"] == expected.code and resp["detections"] == []
    assert resp["request_id"] == case and isinstance(resp["error"], str)
    assert info.value.message == resp["error"] and info.value.frame_id == resp["frame_id"]
    assert client.infer(astronaut_frame, camera_id="c").detections  # still serving


def test_request_returns_errors_without_raising(client):
    resp = client.request({"op": "bogus", "request_id": "q"})
    assert resp["error_code"] == "invalid_request" and resp["request_id"] == "q"
    resp = client.request({"op": "infer", "camera_id": "c"})  # required fields missing
    assert resp["error_code"] == "invalid_request" and resp["detections"] == []


# --- connections -----------------------------------------------------------------------------

def socket_fds(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(os.path.join(fd_dir, name)).startswith("socket:")
    return count


def settled(read: Callable[[], int], want: int | None = None, timeout: float = 30.0) -> int:
    """`read()` once it equals `want` (or, without `want`, once it stops changing)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == (last if want is None else want):
            return now
        last = now
    return last


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_sequential_requests_reuse_one_connection(server_factory, astronaut_frame):
    server = server_factory()
    baseline = settled(lambda: socket_fds(server.pid))
    with Client(server.socket, model_id=MODEL_ID) as c:
        for i in range(10):
            assert c.infer(astronaut_frame, camera_id="c", request_id=i).request_id == i
        assert socket_fds(server.pid) == baseline + 1
        assert c.health()["requests_total"] == 10
    assert settled(lambda: socket_fds(server.pid), want=baseline) == baseline


@pytest.mark.slow
def test_threads_share_one_client(client, nudenet_server, astronaut_frame):
    # 16 threads x 20 requests; every 5th is an infer (CPU inference is slow), the others
    # `health`, so quick and slow answers interleave on the shared pool.
    before = requests_total(nudenet_server.socket)
    failures: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(20):
                rid = f"t{t}-{i}"
                if i % 5:
                    assert client.request({"op": "health", "request_id": rid})["request_id"] == rid
                    continue
                result = client.infer(astronaut_frame, camera_id=f"cam-{t}", request_id=rid)
                assert (result.request_id, result.camera_id) == (rid, f"cam-{t}")
                assert "FACE_FEMALE" in [d.class_name for d in result.detections]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert requests_total(nudenet_server.socket) - before == 16 * 4


@pytest.mark.slow
def test_reconnects_after_server_restart(server_factory, astronaut_frame):
    first = server_factory()
    with Client(first.socket, model_id=MODEL_ID) as c:
        assert c.infer(astronaut_frame, camera_id="c").detections
        assert first.stop() == 0
        with pytest.raises(ConnectionError, match=re.escape(first.socket)):
            c.infer(astronaut_frame, camera_id="c")
        second = server_factory(socket=first.socket)
        assert c.infer(astronaut_frame, camera_id="c").detections
        # Restarted under the client's pooled connection: no error reaches the caller.
        assert second.stop() == 0
        server_factory(socket=first.socket)
        assert c.infer(astronaut_frame, camera_id="c").detections


@pytest.mark.slow
def test_least_outstanding_routing_spreads_over_servers(server_factory, astronaut_frame):
    servers = [server_factory(), server_factory()]
    with Client([s.socket for s in servers], model_id=MODEL_ID) as c:
        for i in range(10):  # one at a time: every choice is a tie, taken in turn
            c.infer(astronaut_frame, camera_id="c", request_id=i)
        assert [requests_total(s.socket) for s in servers] == [5, 5]

        def worker() -> None:
            for _ in range(3):
                c.infer(astronaut_frame, camera_id="c")

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    concurrent = [requests_total(s.socket) - 5 for s in servers]
    assert sum(concurrent) == 24 and min(concurrent) >= 6


def test_routing_avoids_the_busy_socket(scripted):
    busy = scripted(lambda n: "hang")
    idle = scripted(lambda n: "answer")
    outcome: list[BaseException] = []

    def wait_on_busy() -> None:
        try:
            c.request({"op": "health"}, 1.5, socket=busy.path)
        except TimeoutError as exc:
            outcome.append(exc)

    with Client([busy.path, idle.path], timeout=5) as c:
        stuck = threading.Thread(target=wait_on_busy)
        stuck.start()
        while busy.requests == 0:
            time.sleep(0.01)
        for _ in range(6):
            c.request({"op": "health"})
        stuck.join()
    assert (busy.requests, idle.requests) == (1, 6)
    assert len(outcome) == 1


def test_unreachable_socket_is_skipped(server_factory, nudenet_server, astronaut_frame):
    dead = server_factory.socket_path("nobody.sock")
    with Client([dead, nudenet_server.socket], model_id=MODEL_ID) as c:
        for _ in range(4):
            assert c.infer(astronaut_frame, camera_id="c").detections
    with Client(dead) as c, pytest.raises(ConnectionError, match=re.escape(dead)):
        c.health()


def test_discover_lists_live_servers(server_factory, monkeypatch):
    live = server_factory(socket=server_factory.socket_path("vas_model_live.sock"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(server_factory.socket_path("vas_model_stale.sock"))
    stale.close()  # the file stays, nothing listens
    Path(server_factory.socket_path("vas_model_file.sock")).write_text("not a socket")
    found = discover(str(server_factory.dir))
    assert found == [ServerInfo(live.socket, found[0].info)]
    assert found[0].info["model_id"] == MODEL_ID
    monkeypatch.setenv("VASIPC_SOCKET_DIR", str(server_factory.dir))
    assert [s.socket for s in discover()] == [live.socket]
    assert discover(str(server_factory.dir), pattern="nothing*") == []


def test_closed_client_refuses(nudenet_server):
    c = Client(nudenet_server.socket)
    c.close()
    with pytest.raises(ConnectionError, match="closed"):
        c.health()


# --- failures a real server does not produce on demand ----------------------------------------

class ScriptedServer:
    """A fake server on a Unix socket. `script(n)` says what to do with the n-th request of
    a connection (0-based): "answer", "close" (read it, close without answering),
    "half" (send half a length prefix, close), "hang" (never answer) or "shutting_down"
    (answer as a draining server does)."""

    def __init__(self, path: str, script: Callable[[int], str]) -> None:
        self.path = path
        self.script = script
        self.connections = 0
        self.requests = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # OSError: closed by close()
            for n in itertools.count():
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                body = conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
                self.requests += 1
                action = self.script(n)
                if action == "close":
                    return
                if action == "half":
                    conn.sendall(b"\0\0")
                    return
                if action in ("answer", "shutting_down"):
                    out = {"op": orjson.loads(body).get("op"), "n": n, "error_code": None}
                    if action == "shutting_down":
                        out.update(error_code="shutting_down", error="the server is shutting down")
                    out = orjson.dumps(out)
                    conn.sendall(struct.pack(">I", len(out)) + out)

    def close(self) -> None:
        self.listener.close()
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread, which closes it


@pytest.fixture
def scripted(tmp_path):
    servers: list[ScriptedServer] = []

    def start(script: Callable[[int], str]) -> ScriptedServer:
        server = ScriptedServer(str(tmp_path / f"s{len(servers)}.sock"), script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_dead_pooled_connection_is_retried_once(scripted):
    # Answers the first request of each connection and drops the second unanswered: the
    # second request on the pooled connection meets EOF and goes again on a fresh one.
    server = scripted(lambda n: "answer" if n == 0 else "close")
    with Client(server.path) as c:
        assert c.request({"op": "health"})["n"] == 0
        assert c.request({"op": "health"})["n"] == 0
        assert (server.connections, server.requests) == (2, 3)


def test_fresh_connection_failure_is_not_retried(scripted):
    server = scripted(lambda n: "close")
    with Client(server.path) as c, pytest.raises(ConnectionError, match="closed the connection"):
        c.request({"op": "health"})
    assert server.requests == 1


def test_partial_response_is_not_retried(scripted):
    server = scripted(lambda n: "answer" if n == 0 else "half")
    with Client(server.path) as c:
        c.request({"op": "health"})
        with pytest.raises(ConnectionError, match="mid-response"):
            c.request({"op": "health"})
        assert server.requests == 2
        assert c.request({"op": "health"})["n"] == 0  # a fresh connection afterwards


@pytest.mark.timeout(60)  # the hang guard: the client's own timeout would block for an hour
def test_timeout(scripted):
    """A request's timeout overrides the client's."""
    server = scripted(lambda n: "hang")
    with Client(server.path, timeout=3600) as c, pytest.raises(TimeoutError,
                                                               match=re.escape(server.path)):
        c.request({"op": "health"}, timeout=0.3)


def test_draining_server_is_routed_around(scripted):
    """shutting_down from one socket sends the request to another (the server is stateless)
    and drops that socket's pooled connections; pinned, or with no other socket, the
    answer is returned as is."""
    draining = scripted(lambda n: "shutting_down")
    serving = scripted(lambda n: "answer")
    with Client([draining.path, serving.path]) as c:
        for _ in range(6):
            assert c.request({"op": "infer"})["error_code"] is None
        assert serving.requests == 6
        assert 1 <= draining.requests <= 6
        assert c.request({"op": "infer"}, socket=draining.path)["error_code"] == "shutting_down"
        pooled_before = draining.connections
        c.request({"op": "infer"}, socket=draining.path)
        assert draining.connections == pooled_before + 1, "the pooled connection was reused"
    with Client(draining.path) as c, pytest.raises(errors.ShuttingDown):
        c.infer("/dev/shm/x", camera_id="c", model_id="m")
