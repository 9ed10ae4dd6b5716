"""docs/contract.md section 4: the shape of infer responses, error responses, every error_code of the
table, and the precedence order when several apply; raw sockets against real servers."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import wire
from contract_util import (
    ERROR_CODES,
    METADATA_KEYS,
    MODEL_ID,
    RESPONSE_KEYS,
    BackgroundLoad,
    assert_error,
    assert_ok,
    assert_serving,
    gray,
    infer_msg,
    is_number,
    wait_read,
    write_dir,
    write_meta,
    write_raw,
)

from vasipc import frames

DETECTION_KEYS = {"class_id", "class_name", "confidence", "bbox", "track_id"}
RAW_MD = {"width": 64, "height": 64, "format": "RGB24"}


@pytest.fixture(scope="module")
def root(astronaut_rgb) -> Iterator[Path]:
    """A module-wide /dev/shm directory with the frames these tests read."""
    path = Path(tempfile.mkdtemp(prefix="vasipc-resp-", dir="/dev/shm"))
    try:
        write_dir(path / "astronaut", astronaut_rgb, "NV12", frame_id=42)
        write_raw(path / "astronaut.rgb", astronaut_rgb, "RGB24")
        write_raw(path / "gray.rgb", gray(), "RGB24")
        # a header that is consistent except for data_size (frame_invalid, frame_id 42)
        write_dir(path / "short_size", gray(), "RGB24", frame_id=42)
        write_meta(path / "short_size", width=64, height=64, pixel_format=frames.RGB24,
                   stride=192, data_size=100, frame_id=42)
        # pixel_format 10 with zero sizes: unsupported_format and frame_invalid both apply
        write_dir(path / "fmt10_zero", gray(), "RGB24", frame_id=5)
        write_meta(path / "fmt10_zero", width=0, height=0, pixel_format=10, stride=0,
                   data_size=0, frame_id=5)
        write_dir(path / "fmt10", gray(), "RGB24", frame_id=6)
        write_meta(path / "fmt10", width=64, height=64, pixel_format=10, stride=192,
                   data_size=64 * 64 * 3, frame_id=6)
        os.mkfifo(path / "fifo")
        (path / "empty_dir").mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sock(nudenet_server) -> str:
    return nudenet_server.socket


@pytest.fixture(scope="module")
def classes(sock) -> list[str]:
    return wire.roundtrip(sock, {"op": "info"})["classes"]


# --- success -----------------------------------------------------------------------------------

def test_success_response_shape(sock, root):
    msg = infer_msg(root / "astronaut", request_id="r-17", camera_id="camera_7")
    resp = wire.roundtrip(sock, msg)
    assert set(resp) == RESPONSE_KEYS, resp
    assert resp["model_id"] == MODEL_ID
    assert resp["camera_id"] == "camera_7"
    assert resp["frame_id"] == 42
    assert resp["error"] is None and resp["error_code"] is None
    assert resp["request_id"] == "r-17"
    assert isinstance(resp["detections"], list) and resp["detections"]
    md = resp["metadata"]
    assert set(md) >= METADATA_KEYS, md
    for key in ("preprocess_ms", "inference_ms", "postprocess_ms", "queue_ms", "total_ms"):
        assert is_number(md[key]) and md[key] >= 0, (key, md)
    assert md["inference_ms"] > 0 and md["preprocess_ms"] > 0
    assert type(md["batch_size"]) is int and md["batch_size"] == 1
    assert md["model_version"] == "1"
    assert md["device"] == "cpu"
    assert md["total_ms"] >= md["queue_ms"]
    assert md["total_ms"] >= md["inference_ms"]
    assert md["total_ms"] >= md["preprocess_ms"] + md["inference_ms"] + md["postprocess_ms"]


def test_total_ms_includes_queue_time(bench_server, root):
    """Queued behind slow requests: queue_ms grows and total_ms still includes it."""
    slow = infer_msg(root / "astronaut", model_id="bench")
    with BackgroundLoad(bench_server.socket, slow, depth=3):
        resp = wire.roundtrip(bench_server.socket, slow)
    md = resp["metadata"]
    assert_ok(resp)
    assert md["queue_ms"] > 20, md
    assert md["total_ms"] >= md["queue_ms"] + md["inference_ms"], md


def test_detections_shape_sorted_normalized(sock, root, classes):
    resp = wire.roundtrip(sock, infer_msg(root / "astronaut",
                                          config={"confidence_threshold": 0.01}))
    dets = assert_ok(resp)
    assert len(dets) >= 5
    confs = [d["confidence"] for d in dets]
    assert confs == sorted(confs, reverse=True)
    for d in dets:
        assert set(d) == DETECTION_KEYS, d
        assert type(d["class_id"]) is int and 0 <= d["class_id"] < len(classes)
        assert d["class_name"] == classes[d["class_id"]]
        assert is_number(d["confidence"]) and 0.01 <= d["confidence"] <= 1
        assert d["track_id"] is None
        box = d["bbox"]
        assert isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box), d
        assert all(0.0 <= v <= 1.0 for v in box), d
        assert box[0] <= box[2] and box[1] <= box[3], d


def test_bboxes_are_clipped_at_the_frame_edges(sock, shm_dir, astronaut_rgb):
    """The astronaut's face cut by the frame's left and top edges: the boxes touching them
    are clipped to exactly 0, never negative (the model's raw boxes run past the edge)."""
    cut = np.ascontiguousarray(astronaut_rgb[60:, 200:])  # face starts near x=170, y=30
    cut = frames.crop_even(cut)
    write_dir(shm_dir / "cut", cut, "RGB24")
    dets = assert_ok(wire.roundtrip(sock, infer_msg(shm_dir / "cut",
                                                    config={"confidence_threshold": 0.01})))
    assert dets
    assert all(0.0 <= v <= 1.0 for d in dets for v in d["bbox"])
    assert any(d["bbox"][0] == 0.0 or d["bbox"][1] == 0.0 for d in dets), dets


def test_frame_id_sources(sock, root):
    astro = root / "astronaut"
    assert wire.roundtrip(sock, infer_msg(astro))["frame_id"] == 42  # header
    assert wire.roundtrip(sock, infer_msg(astro, {"frame_id": 42}))["frame_id"] == 42
    raw_md = {"width": 512, "height": 512, "format": "RGB24"}
    raw = root / "astronaut.rgb"
    with_id = wire.roundtrip(sock, infer_msg(raw, {**raw_md, "frame_id": 7}))
    assert_ok(with_id)
    assert with_id["frame_id"] == 7
    without = wire.roundtrip(sock, infer_msg(raw, raw_md))
    assert_ok(without)
    assert without["frame_id"] is None


def test_frame_id_in_error_responses_where_known(sock, root):
    # header known: frame_invalid from a header with frame_id 42
    resp = assert_error(wire.roundtrip(sock, infer_msg(root / "short_size")), "frame_invalid")
    assert resp["frame_id"] == 42
    # frame_changed: the header's frame_id (the frame the server actually saw)
    resp = wire.roundtrip(sock, infer_msg(root / "astronaut", {"frame_id": 41}))
    assert_error(resp, "frame_changed")
    assert resp["frame_id"] == 42
    # no header: frame_metadata.frame_id
    resp = wire.roundtrip(sock, infer_msg(root / "missing.rgb", {**RAW_MD, "frame_id": 9}))
    assert_error(resp, "frame_not_found")
    assert resp["frame_id"] == 9
    resp = wire.roundtrip(sock, infer_msg(root / "gray.rgb", {**RAW_MD, "width": 65,
                                                              "frame_id": 3}))
    assert_error(resp, "frame_invalid")
    assert resp["frame_id"] == 3
    resp = wire.roundtrip(sock, infer_msg("/etc/passwd", {**RAW_MD, "frame_id": 5}))
    assert_error(resp, "frame_forbidden")
    assert resp["frame_id"] == 5
    # nothing known
    resp = wire.roundtrip(sock, infer_msg(root / "missing.rgb", RAW_MD))
    assert_error(resp, "frame_not_found")
    assert resp["frame_id"] is None


# --- error responses: echo rules ---------------------------------------------------------------

@pytest.mark.parametrize(("model_id", "camera_id", "want_model", "want_camera"), [
    ("other-model", "cam", "other-model", "cam"),          # model_mismatch: strings echoed
    (MODEL_ID, "", MODEL_ID, ""),                          # invalid camera_id, a string
    (MODEL_ID, "c" * 300, MODEL_ID, "c" * 300),            # too long, still a string
    (17, "cam", MODEL_ID, "cam"),                          # non-string model_id
    (None, 5, MODEL_ID, ""),                               # non-strings
    ([MODEL_ID], {"id": "cam"}, MODEL_ID, ""),
])
def test_error_echo_rules(sock, root, model_id, camera_id, want_model, want_camera):
    msg = infer_msg(root / "astronaut", model_id="x", request_id=3)
    msg["model_id"], msg["camera_id"] = model_id, camera_id
    resp = wire.roundtrip(sock, msg)
    assert resp["error_code"] in ("invalid_request", "model_mismatch"), resp
    assert set(resp) == RESPONSE_KEYS, resp
    assert resp["model_id"] == want_model
    assert resp["camera_id"] == want_camera
    assert resp["detections"] == []
    assert isinstance(resp["error"], str) and resp["error"]
    assert resp["request_id"] == 3


def test_error_echo_for_missing_fields(sock):
    resp = wire.roundtrip(sock, {"request_id": "only"})
    assert_error(resp, "invalid_request")
    assert resp["model_id"] == MODEL_ID and resp["camera_id"] == ""
    assert resp["frame_id"] is None and resp["request_id"] == "only"


def test_error_response_metadata(sock, root):
    resp = assert_error(wire.roundtrip(sock, infer_msg(root / "nope")), "frame_not_found")
    assert set(resp) == RESPONSE_KEYS
    md = resp["metadata"]
    assert set(md) >= METADATA_KEYS, md
    assert md["device"] == "cpu" and md["model_version"] == "1"
    assert md["total_ms"] >= md["queue_ms"] >= 0


# --- every error code --------------------------------------------------------------------------

def _raw_exchange(sock: str, payload: bytes) -> dict:
    with wire.connect(sock) as s:
        s.sendall(payload)
        return wire.recv(s)


# code -> trigger(sock, root) -> response; codes that need their own server are tested below
TRIGGERS: dict[str, Callable[[str, Path], dict]] = {
    "invalid_message": lambda sock, root: _raw_exchange(sock, b"\x00\x00\x00\x00"),
    "invalid_message (not JSON)": lambda sock, root: _raw_exchange(sock, wire.frame(b"{nope")),
    "invalid_message (not an object)": lambda sock, root: _raw_exchange(sock,
                                                                        wire.frame(b"[1]")),
    "message_too_large": lambda sock, root: _raw_exchange(
        sock, struct.pack(">I", 10 * 1024 * 1024 + 1)),
    "invalid_request": lambda sock, root: wire.roundtrip(
        sock, {**infer_msg(root / "astronaut"), "timestamp": -1}),
    "model_mismatch": lambda sock, root: wire.roundtrip(
        sock, infer_msg(root / "astronaut", model_id="yolov8n")),
    "frame_forbidden": lambda sock, root: wire.roundtrip(sock, infer_msg(root / "fifo")),
    "frame_not_found": lambda sock, root: wire.roundtrip(sock, infer_msg(root / "empty_dir")),
    "unsupported_format": lambda sock, root: wire.roundtrip(sock, infer_msg(root / "fmt10")),
    "frame_invalid": lambda sock, root: wire.roundtrip(sock, infer_msg(root / "short_size")),
    "frame_changed": lambda sock, root: wire.roundtrip(
        sock, infer_msg(root / "astronaut", {"frame_id": 43})),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_error_code(sock, root, trigger):
    code = trigger.split(" ")[0]
    resp = TRIGGERS[trigger](sock, root)
    assert_error(resp, code)
    assert set(resp) >= RESPONSE_KEYS - {"request_id"}, resp
    assert resp["model_id"] == ("yolov8n" if code == "model_mismatch" else MODEL_ID)
    if trigger not in ("invalid_message", "message_too_large"):  # not the bad-length answers
        assert resp["metadata"]["total_ms"] > 0, resp  # from the last byte read, as for success
    assert_serving(sock)


def test_every_error_code_has_a_test():
    covered = {t.split(" ")[0] for t in TRIGGERS} | {
        "overloaded", "deadline_exceeded", "shutting_down", "internal"}  # tests below
    assert covered == set(ERROR_CODES)


def test_message_too_large_closes_and_others_keep_the_connection(sock, root):
    with wire.connect(sock) as s:
        s.sendall(struct.pack(">I", 0xFFFFFFFF))
        assert_error(wire.recv(s), "message_too_large")
        assert wire.is_closed(s)
    with wire.connect(sock) as s:  # invalid_request, model_mismatch: the connection stays
        for msg in ({"op": "bogus"}, infer_msg(root / "astronaut", model_id="m"),
                    infer_msg(root / "astronaut")):
            wire.send(s, msg)
            assert wire.recv(s)["error_code"] in ("invalid_request", "model_mismatch", None)


@pytest.mark.slow
def test_shutting_down(server_factory, bench_model, root):
    """SIGTERM with slow work in flight: later infers on open connections get
    shutting_down (after invalid_request and model_mismatch in precedence), health and
    info are still answered, and what was read before the signal is answered normally.
    (overloaded and deadline_exceeded: test_contract_requests.py)"""
    server = server_factory("--drain-timeout", "30", model=bench_model, model_id="bench")
    sock = server.socket
    slow = infer_msg(root / "astronaut", model_id="bench")
    with wire.connect(sock, 60) as s, wire.connect(sock, 60) as busy:
        wire.send(s, {"op": "health"})
        health = wire.recv(s)
        assert health["status"] == "ok"
        busy.sendall(b"".join(wire.encode(slow) for _ in range(6)))
        wait_read(sock, health["requests_total"] + 6)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        wire.send(s, {**slow, "request_id": "late"})
        resp = wire.recv(s)
        assert_error(resp, "shutting_down")
        assert resp["request_id"] == "late" and resp["model_id"] == "bench"
        assert resp["camera_id"] == slow["camera_id"]
        # invalid_request and model_mismatch still win over shutting_down
        wire.send(s, {**slow, "camera_id": ""})
        assert_error(wire.recv(s), "invalid_request")
        wire.send(s, {**slow, "model_id": "other"})
        assert_error(wire.recv(s), "model_mismatch")
        # health and info are answered while draining
        wire.send(s, {"op": "health"})
        h = wire.recv(s)
        assert h["status"] == "draining" and h["ready"] is False, h
        wire.send(s, {"op": "info"})
        assert wire.recv(s)["protocol_version"] == 1
        # the requests read before the signal are answered normally
        for _ in range(6):
            assert_ok(wire.recv(busy))
    assert server.proc.wait(30) == 0


# --- internal ----------------------------------------------------------------------------------

def _failing_model(path: Path) -> None:
    """A tiny YOLO-shaped model whose run fails (ONNX Runtime raises: a Gather index out
    of bounds) when the image's mean is above 0.5, and works otherwise. Warm-up (114/255
    gray) passes, so the server starts; a white frame then fails inside the session: an
    honest `internal`."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Greater", ["mean", "half"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["bright_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["bright_i", "five"], ["index"]),  # 0, or 5: out of bounds
        # a [2, 1, 5, 16] table of zeros computed from the input (nothing to fold)
        helper.make_node("Reshape", ["images", "flat"], ["pixels"]),
        helper.make_node("Slice", ["pixels", "start", "stop"], ["first"]),
        helper.make_node("Mul", ["first", "zero"], ["zeros"]),
        helper.make_node("Reshape", ["zeros", "table_shape"], ["table"]),
        helper.make_node("Gather", ["table", "index"], ["output0"], axis=0),
    ]
    inits = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("five", TensorProto.INT64, [], [5]),
        helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("stop", TensorProto.INT64, [1], [160]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("table_shape", TensorProto.INT64, [4], [2, 1, 5, 16]),
    ]
    graph = helper.make_graph(
        nodes, "fails_on_bright", [helper.make_tensor_value_info(
            "images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_internal_when_inference_fails_and_the_server_keeps_serving(server_factory, tmp_path,
                                                                    root):
    model = tmp_path / "fails.onnx"
    _failing_model(model)
    server = server_factory(model=str(model), model_id="fails")
    sock = server.socket
    dark = root / "dark"
    bright = root / "bright"
    write_dir(dark, gray(value=20), "RGB24", frame_id=1)
    write_dir(bright, gray(value=250), "RGB24", frame_id=2)
    ok = wire.roundtrip(sock, infer_msg(dark, model_id="fails"))
    assert_ok(ok)
    for _ in range(2):
        resp = wire.roundtrip(sock, infer_msg(bright, model_id="fails", request_id="b"))
        assert_error(resp, "internal")
        assert resp["request_id"] == "b" and resp["model_id"] == "fails"
        assert resp["frame_id"] == 2
        assert_serving(sock)
        assert_ok(wire.roundtrip(sock, infer_msg(dark, model_id="fails")))
    assert server.proc.poll() is None


# --- precedence --------------------------------------------------------------------------------

PRECEDENCE_CASES: dict[str, tuple[str, Callable[[Path], dict]]] = {
    "invalid_request > model_mismatch": ("invalid_request", lambda root: {
        **infer_msg(root / "astronaut", model_id="other"), "camera_id": ""}),
    "invalid_request > model_mismatch (relative path)": ("invalid_request", lambda root: {
        **infer_msg(root / "astronaut", model_id="other"), "frame_reference": "x/y"}),
    "invalid_request > frame_forbidden": ("invalid_request", lambda root: {
        **infer_msg("/etc/passwd"), "timestamp": 0}),
    "invalid_request > model_mismatch (raw file without format)": ("invalid_request",
        lambda root: infer_msg(root / "gray.rgb", {"width": 4, "height": 4}, model_id="other")),
    "frame_forbidden for a metadata-less file outside the roots": ("frame_forbidden",
        lambda root: infer_msg("/etc/passwd", {})),
    "model_mismatch > frame_forbidden": ("model_mismatch", lambda root: infer_msg(
        "/etc/passwd", RAW_MD, model_id="other")),
    "model_mismatch > frame_not_found": ("model_mismatch", lambda root: infer_msg(
        root / "nope", model_id="other")),
    "frame_forbidden > frame_not_found (outside)": ("frame_forbidden", lambda root: infer_msg(
        "/tmp/vasipc-surely-missing/frame", RAW_MD)),
    "frame_forbidden > frame_not_found (traversal)": ("frame_forbidden", lambda root: infer_msg(
        "/dev/shm/../vasipc-surely-missing", RAW_MD)),
    "frame_forbidden > unsupported_format": ("frame_forbidden", lambda root: infer_msg(
        root / "fifo", {**RAW_MD, "format": "YUYV"})),
    "frame_not_found > unsupported_format": ("frame_not_found", lambda root: infer_msg(
        root / "nope.raw", {**RAW_MD, "format": "YUYV"})),
    "frame_not_found > frame_invalid": ("frame_not_found", lambda root: infer_msg(
        root / "nope.raw", {**RAW_MD, "width": 0})),
    "unsupported_format > frame_invalid (raw)": ("unsupported_format", lambda root: infer_msg(
        root / "gray.rgb", {**RAW_MD, "format": "YUYV", "width": 0, "stride": 1})),
    "unsupported_format > frame_invalid (header)": ("unsupported_format", lambda root: infer_msg(
        root / "fmt10_zero")),
    "unsupported_format > frame_changed (header)": ("unsupported_format", lambda root: infer_msg(
        root / "fmt10", {"frame_id": 99})),
    "frame_invalid > frame_changed (metadata)": ("frame_invalid", lambda root: infer_msg(
        root / "astronaut", {"frame_id": 41, "width": 100})),
    "frame_invalid > frame_changed (header)": ("frame_invalid", lambda root: infer_msg(
        root / "short_size", {"frame_id": 41})),
}


@pytest.mark.parametrize("case", list(PRECEDENCE_CASES))
def test_precedence(sock, root, case):
    want, build = PRECEDENCE_CASES[case]
    resp = wire.roundtrip(sock, build(root))
    assert_error(resp, want)

