"""docs/contract.md section 3: requests (op, health, info, request_id, infer fields, config,
deadline_ms) and the overload they can cause, over raw sockets against real servers."""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import wire
from contract_util import (
    MODEL_ID,
    BackgroundLoad,
    assert_error,
    assert_ok,
    assert_serving,
    class_ids,
    concurrent,
    health,
    infer,
    infer_msg,
    is_number,
    wait_idle,
    write_dir,
)

HEALTH_KEYS = {"op", "status", "ready", "model_id", "uptime_s", "in_flight", "requests_total"}
INFO_KEYS = {"op", "protocol_version", "server_version", "model_id", "model_name",
             "model_version", "task", "input", "classes", "providers", "max_batch_size",
             "socket"}
NUDENET_CLASSES = [
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
]


@pytest.fixture(scope="module")
def frame_dir(astronaut_rgb) -> Iterator[Path]:
    """The astronaut as an NV12 frame-export directory (frame_id 42), shared by the module."""
    root = Path(tempfile.mkdtemp(prefix="vasipc-req-", dir="/dev/shm"))
    try:
        yield write_dir(root / "astronaut", astronaut_rgb, "NV12", frame_id=42)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sock(nudenet_server) -> str:
    return nudenet_server.socket


@pytest.fixture(scope="module")
def base_dets(sock, frame_dir) -> list[dict]:
    dets = assert_ok(infer(sock, frame_dir))
    assert 1 in [d["class_id"] for d in dets], dets  # FACE_FEMALE
    return dets


# --- op ----------------------------------------------------------------------------------------

def test_op_defaults_to_infer(sock, frame_dir):
    msg = infer_msg(frame_dir)
    assert "op" not in msg
    implicit = wire.roundtrip(sock, msg)
    explicit = wire.roundtrip(sock, {**msg, "op": "infer"})
    for resp in (implicit, explicit):
        assert "op" not in resp
        assert assert_ok(resp), resp
        assert resp["frame_id"] == 42
    assert class_ids(implicit) == class_ids(explicit)


@pytest.mark.parametrize("op", ["predict", "", "HEALTH", "Info", 1, None, True, ["health"]])
def test_unknown_or_bad_op_is_invalid_request(sock, op):
    assert_error(wire.roundtrip(sock, {"op": op}), "invalid_request")
    assert_serving(sock)


# --- health ------------------------------------------------------------------------------------

def test_health_fields_and_types(sock):
    assert wait_idle(sock)
    h = health(sock)
    assert set(h) == HEALTH_KEYS, h
    assert h["op"] == "health"
    assert h["status"] == "ok"
    assert h["ready"] is True
    assert h["model_id"] == MODEL_ID
    assert is_number(h["uptime_s"]) and h["uptime_s"] >= 0
    assert type(h["in_flight"]) is int and h["in_flight"] == 0  # nothing else is running
    assert type(h["requests_total"]) is int and h["requests_total"] >= 0
    time.sleep(0.05)
    assert health(sock)["uptime_s"] > h["uptime_s"]


def test_requests_total_counts_infer_only(sock, frame_dir):
    before = health(sock)["requests_total"]
    for op in ("health", "info", "health"):
        wire.roundtrip(sock, {"op": op})
    assert health(sock)["requests_total"] == before
    assert_ok(infer(sock, frame_dir))
    assert_ok(wire.roundtrip(sock, {**infer_msg(frame_dir), "op": "infer"}))
    assert health(sock)["requests_total"] == before + 2


# --- info --------------------------------------------------------------------------------------

def test_info_fields(sock, nudenet_server):
    info = wire.roundtrip(sock, {"op": "info"})
    assert set(info) >= INFO_KEYS, info
    assert info["op"] == "info"
    assert type(info["protocol_version"]) is int and info["protocol_version"] == 1
    assert isinstance(info["server_version"], str) and info["server_version"]
    assert info["model_id"] == MODEL_ID
    assert info["model_name"] == "320n"  # the ONNX file's stem (no model.yaml)
    assert info["model_version"] == "1"  # its directory ("nudenet") is not a version
    assert info["task"] == "detect"
    assert info["input"] == {"width": 320, "height": 320}
    assert type(info["input"]["width"]) is int
    assert info["classes"] == NUDENET_CLASSES
    assert isinstance(info["providers"], list) and "CPUExecutionProvider" in info["providers"]
    assert type(info["max_batch_size"]) is int and info["max_batch_size"] == 1  # CPU default
    assert info["socket"] == nudenet_server.socket


@pytest.mark.slow
def test_info_max_batch_size_is_the_effective_max_batch(server_factory):
    server = server_factory("--max-batch", "3", "--device", "cpu")
    info = wire.roundtrip(server.socket, {"op": "info"})
    assert info["max_batch_size"] == 3  # nudenet's batch dimension is dynamic: no cap


# --- request_id --------------------------------------------------------------------------------

def _kinds(frame_dir: Path) -> dict[str, dict]:
    return {
        "health": {"op": "health"},
        "info": {"op": "info"},
        "infer": infer_msg(frame_dir),
        "invalid_request": {**infer_msg(frame_dir), "camera_id": ""},
        "model_mismatch": infer_msg(frame_dir, model_id="other"),
        "frame_not_found": infer_msg("/dev/shm/vasipc-no-such-frame"),
        "frame_forbidden": infer_msg("/etc/passwd", {"width": 2, "height": 2, "format": "NV12"}),
        "unknown_op": {"op": "nope"},
    }


@pytest.mark.parametrize("kind", ["health", "info", "infer", "invalid_request",
                                  "model_mismatch", "frame_not_found", "frame_forbidden",
                                  "unknown_op"])
@pytest.mark.parametrize("rid", ["r-17", "", "x" * 128, 0, -5, 2**63 - 1, "ünï", 2**64,
                                 10**127, -(10**126)])  # integers: up to 128 characters
def test_request_id_is_echoed_in_every_response_kind(sock, frame_dir, kind, rid):
    resp = wire.roundtrip(sock, {**_kinds(frame_dir)[kind], "request_id": rid})
    assert "request_id" in resp, resp
    assert resp["request_id"] == rid and type(resp["request_id"]) is type(rid), resp


def test_response_without_request_id_has_it_null(sock, frame_dir):
    resp = infer(sock, frame_dir)
    assert resp.get("request_id") is None


@pytest.mark.parametrize("rid", ["x" * 129, 1.5, 1.0, True, False, None, [1], {"a": 1},
                                 10**128, -(10**127), 1e20])
@pytest.mark.parametrize("kind", ["infer", "health", "info"])
def test_bad_request_id_is_invalid_request(sock, frame_dir, kind, rid):
    resp = wire.roundtrip(sock, {**_kinds(frame_dir)[kind], "request_id": rid})
    assert_error(resp, "invalid_request")


def test_unknown_top_level_fields_are_ignored(sock, frame_dir):
    extra = {"priority": 5, "frame_hint": {"a": [1, 2]}, "x-trace": None, "deadline": "soon"}
    resp = wire.roundtrip(sock, {**infer_msg(frame_dir), **extra})
    assert assert_ok(resp)
    h = wire.roundtrip(sock, {"op": "health", **extra})
    assert h["status"] == "ok"
    i = wire.roundtrip(sock, {"op": "info", **extra})
    assert i["protocol_version"] == 1


# --- infer fields: missing / wrong type / out of range -----------------------------------------

Mutation = Callable[[dict], None]


def _drop(key: str) -> Mutation:
    return lambda m: m.pop(key)


def _set(key: str, value: object) -> Mutation:
    return lambda m: m.__setitem__(key, value)


def _set_in(outer: str, key: str, value: object) -> Mutation:
    def mutate(m: dict) -> None:
        m.setdefault(outer, {})
        m[outer][key] = value
    return mutate


INVALID = {
    "frame_reference missing": _drop("frame_reference"),
    "frame_reference relative": _set("frame_reference", "dev/shm/frame"),
    "frame_reference dot-relative": _set("frame_reference", "./frame"),
    "frame_reference empty": _set("frame_reference", ""),
    "frame_reference int": _set("frame_reference", 5),
    "frame_reference list": _set("frame_reference", ["/dev/shm/x"]),
    "frame_reference null": _set("frame_reference", None),
    "frame_metadata missing": _drop("frame_metadata"),
    "frame_metadata list": _set("frame_metadata", []),
    "frame_metadata string": _set("frame_metadata", "{}"),
    "frame_metadata null": _set("frame_metadata", None),
    "camera_id missing": _drop("camera_id"),
    "camera_id empty": _set("camera_id", ""),
    "camera_id 257 chars": _set("camera_id", "c" * 257),
    "camera_id int": _set("camera_id", 1),
    "camera_id null": _set("camera_id", None),
    "model_id missing": _drop("model_id"),
    "model_id int": _set("model_id", 1),
    "model_id null": _set("model_id", None),
    "model_id list": _set("model_id", [MODEL_ID]),
    "timestamp missing": _drop("timestamp"),
    "timestamp 0": _set("timestamp", 0),
    "timestamp 0.0": _set("timestamp", 0.0),
    "timestamp -1": _set("timestamp", -1),
    "timestamp true": _set("timestamp", True),
    "timestamp string": _set("timestamp", "x"),
    "timestamp numeric string": _set("timestamp", "1700000000"),
    "timestamp null": _set("timestamp", None),
    "config list": _set("config", []),
    "config string": _set("config", "x"),
    "config int": _set("config", 1),
    "config null": _set("config", None),
    "confidence_threshold 1.5": _set_in("config", "confidence_threshold", 1.5),
    "confidence_threshold -0.1": _set_in("config", "confidence_threshold", -0.1),
    "confidence_threshold true": _set_in("config", "confidence_threshold", True),
    "confidence_threshold string": _set_in("config", "confidence_threshold", "0.5"),
    "confidence_threshold null": _set_in("config", "confidence_threshold", None),
    "nms_iou_threshold -0.1": _set_in("config", "nms_iou_threshold", -0.1),
    "nms_iou_threshold 1.01": _set_in("config", "nms_iou_threshold", 1.01),
    "nms_iou_threshold false": _set_in("config", "nms_iou_threshold", False),
    "max_detections -1": _set_in("config", "max_detections", -1),
    "max_detections 1.5": _set_in("config", "max_detections", 1.5),
    "max_detections 1.0": _set_in("config", "max_detections", 1.0),
    "max_detections true": _set_in("config", "max_detections", True),
    "max_detections string": _set_in("config", "max_detections", "3"),
    "classes string": _set_in("config", "classes", "1"),
    "classes int": _set_in("config", "classes", 1),
    "classes [true]": _set_in("config", "classes", [True]),
    "classes [-1]": _set_in("config", "classes", [-1]),
    "classes [1.0]": _set_in("config", "classes", [1.0]),
    "classes [[1]]": _set_in("config", "classes", [[1]]),
    "classes [null]": _set_in("config", "classes", [None]),
    "classes object": _set_in("config", "classes", {"1": True}),
    "classes unknown name": _set_in("config", "classes", ["NOT_A_CLASS"]),
    "classes name of another case": _set_in("config", "classes", ["face_female"]),
    "classes [name, object]": _set_in("config", "classes", ["FACE_FEMALE", {}]),
    "deadline_ms 0": _set("deadline_ms", 0),
    "deadline_ms -5": _set("deadline_ms", -5),
    "deadline_ms true": _set("deadline_ms", True),
    "deadline_ms string": _set("deadline_ms", "10"),
    "deadline_ms null": _set("deadline_ms", None),
    "metadata width -1": _set_in("frame_metadata", "width", -1),
    "metadata width string": _set_in("frame_metadata", "width", "x"),
    "metadata width true": _set_in("frame_metadata", "width", True),
    "metadata width 1.5": _set_in("frame_metadata", "width", 1.5),
    "metadata height -2": _set_in("frame_metadata", "height", -2),
    "metadata height float": _set_in("frame_metadata", "height", 512.0),
    "metadata offset -1": _set_in("frame_metadata", "offset", -1),
    "metadata offset true": _set_in("frame_metadata", "offset", True),
    "metadata stride string": _set_in("frame_metadata", "stride", "x"),
    "metadata stride -512": _set_in("frame_metadata", "stride", -512),
    "metadata frame_id 1.5": _set_in("frame_metadata", "frame_id", 1.5),
    "metadata frame_id -1": _set_in("frame_metadata", "frame_id", -1),
    "metadata frame_id true": _set_in("frame_metadata", "frame_id", True),
    "metadata frame_id string": _set_in("frame_metadata", "frame_id", "42"),
    "metadata format int": _set_in("frame_metadata", "format", 0),
    "metadata format null": _set_in("frame_metadata", "format", None),
    "metadata timestamp string": _set_in("frame_metadata", "timestamp", "x"),
    "metadata timestamp true": _set_in("frame_metadata", "timestamp", True),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_infer_field_is_invalid_request(sock, frame_dir, case):
    msg = infer_msg(frame_dir, request_id=case)
    INVALID[case](msg)
    resp = wire.roundtrip(sock, msg)
    assert_error(resp, "invalid_request")
    assert resp["request_id"] == case


VALID = {
    "camera_id 256 chars": _set("camera_id", "c" * 256),
    "camera_id 1 char": _set("camera_id", "c"),
    "timestamp int": _set("timestamp", 1),
    "timestamp tiny": _set("timestamp", 1e-9),
    "config empty": _set("config", {}),
    "config unknown keys": _set("config", {"tracker": "x", "imgsz": 640}),
    "confidence_threshold 0": _set_in("config", "confidence_threshold", 0),
    "confidence_threshold 1": _set_in("config", "confidence_threshold", 1),
    "nms_iou_threshold 0.0": _set_in("config", "nms_iou_threshold", 0.0),
    "nms_iou_threshold 1": _set_in("config", "nms_iou_threshold", 1),
    "max_detections 10**6": _set_in("config", "max_detections", 10**6),
    "max_detections 2**62": _set_in("config", "max_detections", 2**62),
    "classes unknown ids": _set_in("config", "classes", [1, 17, 18, 1000, 2**40]),
    # JSON integers have no size limit: beyond 64 bits they are still integers
    "max_detections 10**20": _set_in("config", "max_detections", 10**20),
    "classes beyond 64 bits": _set_in("config", "classes", [0, 1, 2, 3, 10**20]),
    "classes names and ids": _set_in("config", "classes", ["FACE_FEMALE", 0, "FACE_FEMALE"]),
    "deadline_ms float": _set("deadline_ms", 60000.5),
    "deadline_ms huge": _set("deadline_ms", 1e300),
    "metadata extra keys": _set("frame_metadata", {"offset": 0, "timestamp": 1.5, "x": [1]}),
    "metadata consistent": _set("frame_metadata",
                                {"width": 512, "height": 512, "format": "nv12",
                                 "stride": 512, "frame_id": 42}),
}


@pytest.mark.parametrize("case", list(VALID))
def test_valid_edge_values_are_accepted(sock, frame_dir, case):
    msg = infer_msg(frame_dir)
    VALID[case](msg)
    resp = wire.roundtrip(sock, msg)
    assert_ok(resp)
    assert resp["frame_id"] == 42
    assert resp["camera_id"] == msg["camera_id"]


def test_field_errors_do_not_break_the_connection(sock, frame_dir):
    """Errors are answers, not disconnects: one pooled connection, bad and good requests."""
    good = infer_msg(frame_dir)
    bad = {**good, "timestamp": True}
    with wire.connect(sock) as s:
        for msg in (bad, good, bad, good):
            wire.send(s, msg)
            resp = wire.recv(s)
            assert resp["error_code"] == (None if msg is good else "invalid_request"), resp


# --- config overrides --------------------------------------------------------------------------

def _with_config(frame_dir: Path, **config: object) -> dict:
    return infer_msg(frame_dir, config=config)


def test_config_confidence_threshold(sock, frame_dir, base_dets):
    high = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, confidence_threshold=0.99)))
    assert len(high) < len(base_dets)
    assert all(d["confidence"] >= 0.99 for d in high)
    low = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, confidence_threshold=0.05)))
    assert len(low) > len(base_dets)
    assert min(d["confidence"] for d in low) >= 0.05
    assert min(d["confidence"] for d in base_dets) >= 0.25  # the default threshold


def test_config_max_detections(sock, frame_dir, base_dets):
    many = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, confidence_threshold=0.01)))
    assert len(many) >= 3
    for n in (1, 2, 3):
        top = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, max_detections=n,
                                                          confidence_threshold=0.01)))
        assert [d["class_id"] for d in top] == [d["class_id"] for d in many[:n]]
        assert [d["confidence"] for d in top] == pytest.approx(
            [d["confidence"] for d in many[:n]], abs=1e-6)
    assert assert_ok(wire.roundtrip(sock, _with_config(frame_dir, max_detections=0))) == []
    one = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, max_detections=1)))
    assert len(one) == 1 and one[0]["class_id"] == base_dets[0]["class_id"]


def test_config_classes(sock, frame_dir, base_dets):
    only_face = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, classes=[1])))
    assert only_face and {d["class_id"] for d in only_face} == {1}
    assert {d["class_name"] for d in only_face} == {"FACE_FEMALE"}
    assert assert_ok(wire.roundtrip(sock, _with_config(frame_dir, classes=[]))) == []
    present = sorted({d["class_id"] for d in base_dets})
    all_listed = assert_ok(wire.roundtrip(sock, _with_config(frame_dir, classes=present)))
    assert [d["class_id"] for d in all_listed] == [d["class_id"] for d in base_dets]


def test_config_nms_iou_threshold(sock, frame_dir):
    def count(iou: float) -> int:
        return len(assert_ok(wire.roundtrip(
            sock, _with_config(frame_dir, confidence_threshold=0.01, nms_iou_threshold=iou))))
    none_suppressed, default, all_overlaps_suppressed = count(1.0), count(0.45), count(0.0)
    assert none_suppressed > default >= all_overlaps_suppressed


def test_config_is_per_request(sock, frame_dir, base_dets):
    """An override changes its own request only: the next one gets the server's defaults."""
    assert_ok(wire.roundtrip(sock, _with_config(frame_dir, confidence_threshold=0.99,
                                                 max_detections=0)))
    again = assert_ok(infer(sock, frame_dir))
    assert [d["class_id"] for d in again] == [d["class_id"] for d in base_dets]


# --- deadline_ms and overload (the slow benchmark model) -----------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("every_backend")
def test_deadline_exceeded_when_queued_behind_others(server_factory, bench_model, frame_dir):
    sock = server_factory(model=bench_model, model_id="bench").socket
    slow = infer_msg(frame_dir, model_id="bench")
    with BackgroundLoad(sock, slow, depth=8) as load:
        h = health(sock)
        assert h["in_flight"] >= 2, h  # queued infer requests are in flight
        late = wire.roundtrip(sock, {**slow, "deadline_ms": 1, "request_id": "d1"})
        patient = wire.roundtrip(sock, {**slow, "deadline_ms": 600_000})
    assert_error(late, "deadline_exceeded")
    assert late["request_id"] == "d1"
    assert late["model_id"] == "bench" and late["camera_id"] == slow["camera_id"]
    assert late["metadata"]["queue_ms"] > 1
    assert late["frame_id"] is None  # answered before its frame was opened
    assert_ok(patient)
    assert all(r["error_code"] is None for r in load.responses), load.responses
    assert wait_idle(sock)


@pytest.mark.slow
def test_deadline_is_checked_before_the_frame_is_opened(bench_server):
    """A request that misses its deadline is answered deadline_exceeded even when its frame
    would be refused: the queue check comes first (and precedes frame_* in docs/contract.md 4)."""
    sock = bench_server.socket
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        root = Path(d)
        write_dir(root / "f", np.full((64, 64, 3), 90, np.uint8), "RGB24")
        slow = infer_msg(root / "f", model_id="bench")
        with BackgroundLoad(sock, slow, depth=6):
            forbidden, missing = concurrent(sock, [
                infer_msg("/etc/passwd", {"width": 2, "height": 2, "format": "NV12"},
                          model_id="bench", deadline_ms=1),
                infer_msg(root / "nope", model_id="bench", deadline_ms=0.5)])
    assert_error(forbidden, "deadline_exceeded")
    assert_error(missing, "deadline_exceeded")
    assert_serving(sock)


@pytest.mark.slow
@pytest.mark.usefixtures("every_backend")
def test_overloaded_when_the_queue_is_full(server_factory, bench_model, frame_dir):
    server = server_factory("--max-queue", "1", model=bench_model, model_id="bench")
    msg = infer_msg(frame_dir, model_id="bench")
    results = concurrent(server.socket, [{**msg, "request_id": i} for i in range(12)])
    codes = [r["error_code"] for r in results]
    assert codes.count("overloaded") >= 1, codes
    assert codes.count(None) >= 1, codes
    assert set(codes) <= {None, "overloaded"}, codes
    for i, r in enumerate(results):
        assert r["request_id"] == i
        if r["error_code"] == "overloaded":
            assert_error(r, "overloaded")
            assert r["model_id"] == "bench" and r["camera_id"] == msg["camera_id"]
    # still serving, and the queue is usable again
    assert_serving(server.socket)
    assert_ok(wire.roundtrip(server.socket, msg))
    assert wait_idle(server.socket)


@pytest.mark.usefixtures("every_backend")
def test_overloaded_from_one_pipelined_connection(server_factory, bench_model, frame_dir):
    """Pipelined requests fill the queue as well; every one is answered, in order."""
    server = server_factory("--max-queue", "1", model=bench_model, model_id="bench")
    msgs = [infer_msg(frame_dir, model_id="bench", request_id=f"p{i}") for i in range(8)]
    with wire.connect(server.socket, 60) as s:
        s.sendall(b"".join(wire.encode(m) for m in msgs))
        results = [wire.recv(s) for _ in msgs]
    assert [r["request_id"] for r in results] == [m["request_id"] for m in msgs]
    codes = [r["error_code"] for r in results]
    assert "overloaded" in codes and None in codes, codes
    assert_ok(wire.roundtrip(server.socket, msgs[0]))


def test_concurrent_clients_get_their_own_answers(sock, frame_dir):
    """Under concurrency each response belongs to its request (request_id, camera_id)."""
    msgs = [{**infer_msg(frame_dir), "request_id": f"c{i}", "camera_id": f"cam-{i}"}
            for i in range(16)]
    results = concurrent(sock, copy.deepcopy(msgs))
    for m, r in zip(msgs, results, strict=True):
        assert r["request_id"] == m["request_id"] and r["camera_id"] == m["camera_id"], r
        assert_ok(r)


def test_threads_do_not_share_request_state(sock, frame_dir):
    """Different configs at the same time each get their own result."""
    outcomes: dict[str, list] = {}

    def run(name: str, cfg: dict) -> None:
        outcomes[name] = [len(assert_ok(wire.roundtrip(sock, infer_msg(frame_dir, config=cfg))))
                          for _ in range(5)]

    threads = [threading.Thread(target=run, args=("none", {"max_detections": 0})),
               threading.Thread(target=run, args=("one", {"max_detections": 1}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes == {"none": [0] * 5, "one": [1] * 5}
