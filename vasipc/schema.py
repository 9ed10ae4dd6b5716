"""Request validation and response shapes (docs/contract.md sections 3 and 4).

Validation turns a decoded JSON object into a typed request or raises InvalidRequest /
ModelMismatch; nothing here touches the filesystem or the model. Responses are plain
dicts handed to the JSON encoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from vasipc.errors import InvalidRequest, ModelMismatch, VasipcError

MAX_REQUEST_ID_CHARS = 128
MAX_CAMERA_ID_CHARS = 256
OPS = ("infer", "health", "info")
MASK_FORMATS = ("rle", "polygon", "none")


# Immutable records as NamedTuples: a frozen dataclass costs ~2 µs per construction
# (object.__setattr__ per field), a NamedTuple ~0.3 µs, and three are built per request.
class InferConfig(NamedTuple):
    """Per-request overrides (`config`); None means "the server's default"."""

    confidence_threshold: float | None = None
    nms_iou_threshold: float | None = None
    max_detections: int | None = None
    classes: tuple[int, ...] | None = None
    mask_format: str | None = None  # segment: "rle" (default), "polygon" or "none"
    top_k: int | None = None  # classify: how many classes (default 5, at most the model's)


class FrameMetadata(NamedTuple):
    """`frame_metadata`, typed; which keys are required depends on the frame's form (5.1/5.2)."""

    width: int | None = None
    height: int | None = None
    format: str | None = None
    stride: int | None = None
    offset: int | None = None
    frame_id: int | None = None


class InferRequest(NamedTuple):
    frame_reference: str
    frame_metadata: FrameMetadata
    camera_id: str
    model_id: str
    timestamp: float
    config: InferConfig
    deadline_ms: float | None
    request_id: str | int | None


NO_CONFIG = InferConfig()
NO_CLASS_NAMES: Mapping[str, tuple[int, ...]] = MappingProxyType({})


def class_index(class_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Class name -> the ids of that name (a names list may repeat one), for
    `config.classes` given by name."""
    index: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        index.setdefault(name, []).append(i)
    return {name: tuple(ids) for name, ids in index.items()}


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is a subclass of int; JSON booleans are never numbers


def _is_number(v: Any) -> bool:
    return (type(v) is int) or (type(v) is float and math.isfinite(v))


def _unit_interval(obj: dict, key: str, where: str) -> float | None:
    v = obj.get(key)
    if v is None and key not in obj:
        return None
    if not _is_number(v) or not 0.0 <= v <= 1.0:
        raise InvalidRequest(f"{where}{key} must be a number in [0, 1]")
    return float(v)


def _non_negative_int(obj: dict, key: str, where: str) -> int | None:
    if key not in obj:
        return None
    v = obj[key]
    if not _is_int(v) or v < 0:
        raise InvalidRequest(f"{where}{key} must be a non-negative integer")
    return v


_INT_FIELDS = {"frame_metadata": ("width", "height", "stride", "offset", "frame_id"),
               "config": ("max_detections",)}


def has_inexact_ints(msg: dict) -> bool:
    """True when a field this server reads as an integer decoded as a float.

    The fast JSON decoder reads integers beyond 64 bits as floats; JSON allows them, and
    `request_id` must echo exactly, `max_detections` or a class id of 10**20 is valid. Only
    such a request needs the exact (slower) decoder, and only these fields can tell.
    """
    if type(msg.get("request_id")) is float:
        return True
    for name, keys in _INT_FIELDS.items():
        obj = msg.get(name)
        if type(obj) is dict:
            for k in keys:
                if type(obj.get(k)) is float:
                    return True
    cfg = msg.get("config")
    if type(cfg) is dict and type(cfg.get("classes")) is list:
        return any(type(c) is float for c in cfg["classes"])
    return False


def request_id_of(msg: dict) -> str | int | None:
    """The request's `request_id` when it is valid (echoed even in error responses)."""
    rid = msg.get("request_id")
    if type(rid) is str and len(rid) <= MAX_REQUEST_ID_CHARS:
        return rid
    if type(rid) is int and len(str(rid)) <= MAX_REQUEST_ID_CHARS:
        return rid
    return None


def parse_op(msg: dict) -> str:
    """The request's op; raises InvalidRequest for a bad `op` or `request_id`."""
    if "request_id" in msg and request_id_of(msg) is None:
        raise InvalidRequest(
            f"request_id must be a string or integer of at most {MAX_REQUEST_ID_CHARS} characters")
    op = msg.get("op", "infer")
    if type(op) is not str:
        raise InvalidRequest("op must be a string")
    if op not in OPS:
        raise InvalidRequest(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    return op


def _parse_frame_metadata(fm: Any) -> FrameMetadata:
    if type(fm) is not dict:
        raise InvalidRequest("frame_metadata must be an object")
    w = "frame_metadata."
    fmt = fm.get("format")
    if "format" in fm and type(fmt) is not str:
        raise InvalidRequest("frame_metadata.format must be a string")
    if "timestamp" in fm and not _is_number(fm["timestamp"]):
        raise InvalidRequest("frame_metadata.timestamp must be a number")
    return FrameMetadata(
        width=_non_negative_int(fm, "width", w),
        height=_non_negative_int(fm, "height", w),
        format=fmt,
        stride=_non_negative_int(fm, "stride", w),
        offset=_non_negative_int(fm, "offset", w),
        frame_id=_non_negative_int(fm, "frame_id", w),
    )


def _class_ids(cl: Any, class_ids: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """`config.classes`: class ids and names (the model's, as `info.classes` lists them),
    mixed at will, as ids; an id the model lacks matches nothing, an unknown name is an
    error (a typo would silently keep nothing)."""
    if type(cl) is not list:
        raise InvalidRequest("config.classes must be a list of class ids or class names")
    if all(_is_int(c) and c >= 0 for c in cl):
        return tuple(cl)
    ids: list[int] = []
    for i, c in enumerate(cl):
        if type(c) is str:
            named = class_ids.get(c)
            if named is None:
                raise InvalidRequest(f"config.classes[{i}]: no class named {_show(c)} (info lists "
                                     "the model's classes)")
            ids += named
        elif _is_int(c) and c >= 0:
            ids.append(c)
        else:
            raise InvalidRequest(f"config.classes[{i}] must be a class id (an integer >= 0) or a "
                                 f"class name, not {_show(c)}")
    return tuple(ids)


def _show(value: Any) -> str:
    """A request's value in an error message: as JSON, cut short."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_config(cfg: Any, num_classes: int, class_ids: Mapping[str, tuple[int, ...]]) -> InferConfig:
    if type(cfg) is not dict:  # present but null is a wrong type too (docs/contract.md 3)
        raise InvalidRequest("config must be an object")
    classes = _class_ids(cfg["classes"], class_ids) if "classes" in cfg else None
    w = "config."
    mask_format = cfg.get("mask_format")
    if "mask_format" in cfg and mask_format not in MASK_FORMATS:
        raise InvalidRequest(f"config.mask_format must be one of {', '.join(MASK_FORMATS)}")
    top_k = cfg.get("top_k")
    if "top_k" in cfg and (not _is_int(top_k) or top_k < 1 or top_k > num_classes):
        raise InvalidRequest(f"config.top_k must be an integer in 1..{num_classes} (the model's classes)")
    return InferConfig(
        confidence_threshold=_unit_interval(cfg, "confidence_threshold", w),
        nms_iou_threshold=_unit_interval(cfg, "nms_iou_threshold", w),
        max_detections=_non_negative_int(cfg, "max_detections", w),
        classes=classes,
        mask_format=mask_format,
        top_k=top_k,
    )


def parse_infer(msg: dict, server_model_id: str,
                is_raw_file: Callable[[str], bool] | None = None,
                num_classes: int = 1 << 31,
                class_ids: Mapping[str, tuple[int, ...]] = NO_CLASS_NAMES) -> InferRequest:
    """Validate an `infer` request (docs/contract.md 3.1). Field errors come before
    model_mismatch; `num_classes` bounds `config.top_k`, `class_ids` (class name -> its
    ids, `class_index`) turns the names in `config.classes` into ids.

    Whether `width`, `height` and `format` are required depends on the frame's form, so
    when one is missing `is_raw_file(frame_reference)` (the server's cheap stat) decides.
    """
    ref = msg.get("frame_reference")
    if type(ref) is not str or not ref:
        raise InvalidRequest("frame_reference is required and must be a non-empty string")
    if not ref.startswith("/"):
        raise InvalidRequest("frame_reference must be an absolute path")
    if "\x00" in ref:
        raise InvalidRequest("frame_reference must not contain NUL")
    if "frame_metadata" not in msg:
        raise InvalidRequest("frame_metadata is required (use {} for a frame-export directory)")
    metadata = _parse_frame_metadata(msg["frame_metadata"])
    cam = msg.get("camera_id")
    if type(cam) is not str or not 1 <= len(cam) <= MAX_CAMERA_ID_CHARS:
        raise InvalidRequest(f"camera_id is required: a string of 1-{MAX_CAMERA_ID_CHARS} characters")
    model_id = msg.get("model_id")
    if type(model_id) is not str:
        raise InvalidRequest("model_id is required and must be a string")
    ts = msg.get("timestamp")
    if not _is_number(ts) or ts <= 0:
        raise InvalidRequest("timestamp is required: a number > 0 (Unix seconds)")
    config = _parse_config(msg["config"], num_classes, class_ids) if "config" in msg else NO_CONFIG
    deadline = msg.get("deadline_ms")
    if "deadline_ms" in msg and (not _is_number(deadline) or deadline <= 0):
        raise InvalidRequest("deadline_ms must be a number > 0")
    if (is_raw_file is not None and None in (metadata.width, metadata.height, metadata.format)
            and is_raw_file(ref)):
        raise InvalidRequest("a raw frame file needs frame_metadata width, height and format",
                             frame_id=metadata.frame_id)
    if model_id != server_model_id:
        raise ModelMismatch(f"this server serves model {server_model_id!r}, not {model_id!r}")
    return InferRequest(
        frame_reference=ref, frame_metadata=metadata, camera_id=cam, model_id=model_id,
        timestamp=float(ts), config=config,
        deadline_ms=None if deadline is None else float(deadline),
        request_id=request_id_of(msg),
    )


def error_response(err: VasipcError, msg: dict | None, server_model_id: str,
                   metadata: dict) -> dict:
    """An infer-shaped error response; echoes what the request carried where it was valid."""
    msg = msg if type(msg) is dict else {}
    model_id = msg.get("model_id")
    camera_id = msg.get("camera_id")
    frame_id = err.frame_id
    if frame_id is None:
        fm = msg.get("frame_metadata")
        if type(fm) is dict and _is_int(fm.get("frame_id")) and fm["frame_id"] >= 0:
            frame_id = fm["frame_id"]
    return {
        "model_id": model_id if type(model_id) is str else server_model_id,
        "camera_id": camera_id if type(camera_id) is str else "",
        "frame_id": frame_id,
        "detections": [],
        "metadata": metadata,
        "error": err.message,
        "error_code": err.code,
        "request_id": request_id_of(msg),
    }
