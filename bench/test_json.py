"""JSON codecs on vasipc's messages: decode a typical infer request, encode a typical
response (10 detections). The measurement behind the server's choice of orjson.

    python -m pytest bench/test_json.py --benchmark-only

pysimdjson has no encoder of its own (`simdjson.dumps` is the standard library's), so it
appears in the decode group only. msgspec appears twice in decode: untyped (to dicts, like
the others) and into a typed Struct (validation included, the way msgspec is meant to be used).
"""

from __future__ import annotations

import json
import random

import msgspec
import orjson
import pytest
import simdjson

REQUEST = orjson.dumps({
    "op": "infer", "frame_reference": "/dev/shm/vas/camera_17/frame_000042",
    "frame_metadata": {}, "camera_id": "camera_17", "model_id": "yolov8n",
    "timestamp": 1732719321.123456, "config": {"confidence_threshold": 0.3, "classes": [0, 2]},
    "deadline_ms": 200, "request_id": "r-1732719321-17",
})


def _response() -> dict:
    rnd = random.Random(17)
    dets = []
    for _ in range(10):
        x0, y0 = round(rnd.random() * 0.8, 6), round(rnd.random() * 0.8, 6)
        dets.append({"class_id": rnd.randrange(80), "class_name": "person",
                     "confidence": round(rnd.random(), 6),
                     "bbox": [x0, y0, round(x0 + 0.1, 6), round(y0 + 0.15, 6)], "track_id": None})
    return {"model_id": "yolov8n", "camera_id": "camera_17", "frame_id": 42, "detections": dets,
            "metadata": {"preprocess_ms": 1.234567, "inference_ms": 41.234567,
                         "postprocess_ms": 0.123456, "queue_ms": 0.012345, "total_ms": 43.1234,
                         "batch_size": 1, "model_version": "1", "device": "cpu"},
            "error": None, "error_code": None, "request_id": "r-1732719321-17"}


RESPONSE = _response()


class Config(msgspec.Struct, omit_defaults=True):
    confidence_threshold: float | None = None
    nms_iou_threshold: float | None = None
    max_detections: int | None = None
    classes: list[int] | None = None


class InferRequest(msgspec.Struct):
    frame_reference: str
    frame_metadata: dict
    camera_id: str
    model_id: str
    timestamp: float
    op: str = "infer"
    config: Config | None = None
    deadline_ms: float | None = None
    request_id: str | int | None = None


_simdjson = simdjson.Parser()
_msgspec_dec = msgspec.json.Decoder()
_msgspec_typed = msgspec.json.Decoder(InferRequest)
_msgspec_enc = msgspec.json.Encoder()

DECODERS = {
    "json": json.loads,
    "orjson": orjson.loads,
    "msgspec": _msgspec_dec.decode,
    "msgspec_typed": _msgspec_typed.decode,
    "simdjson": lambda b: _simdjson.parse(b, recursive=True),
}
ENCODERS = {
    "json": lambda o: json.dumps(o, separators=(",", ":")).encode(),
    "orjson": orjson.dumps,
    "msgspec": _msgspec_enc.encode,
}


@pytest.mark.parametrize("name", DECODERS)
def test_decode_request(benchmark, name):
    benchmark.group = f"decode infer request ({len(REQUEST)} B)"
    got = benchmark(DECODERS[name], REQUEST)
    if name == "msgspec_typed":
        got = msgspec.to_builtins(got)
    assert got["frame_reference"] == orjson.loads(REQUEST)["frame_reference"]


@pytest.mark.parametrize("name", ENCODERS)
def test_encode_response(benchmark, name):
    benchmark.group = f"encode response, 10 detections ({len(orjson.dumps(RESPONSE))} B)"
    got = benchmark(ENCODERS[name], RESPONSE)
    assert json.loads(got) == RESPONSE
