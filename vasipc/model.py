"""The loaded model: one immutable object that each batch captures once.

`LoadedModel` holds the session and everything derived from the model (input size,
class names, thresholds, version). A hot reload builds a new one and swaps a single
reference; a batch in flight keeps the object it started with.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vasipc.runtime import Device, create_session, import_onnxruntime


class ModelError(ValueError):
    """The model cannot be served (missing, unreadable, not a YOLO-style detector)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load, as resolved from the command line and model.yaml."""

    path: str
    model_id: str
    model_name: str
    model_version: str
    class_names: tuple[str, ...] | None = None  # from --labels or model.yaml, else ONNX metadata
    confidence_threshold: float = 0.25
    nms_iou_threshold: float = 0.45
    max_detections: int = 300
    intra_op_threads: int = 0  # 0: one per usable CPU


@dataclass(frozen=True, slots=True)
class LoadedModel:
    spec: ModelSpec
    session: Any = field(repr=False)
    device: Device
    input_name: str
    output_name: str
    input_width: int
    input_height: int
    num_classes: int
    class_names: tuple[str, ...]
    max_batch: int
    providers: tuple[str, ...]
    fixed_batch: int = 0  # the model's static batch dimension when above 1

    def run(self, batch: np.ndarray, options: Any = None) -> np.ndarray:
        """Run one batch [B,3,H,W] float32; returns [B, 4+nc, N] float32 (C-contiguous)."""
        n = batch.shape[0]
        if self.fixed_batch and n != self.fixed_batch:  # a static batch: pad the run to it
            full = np.zeros((self.fixed_batch, *batch.shape[1:]), dtype=np.float32)
            full[:n] = batch
            batch = full
        out = self.session.run([self.output_name], {self.input_name: batch}, options)[0]
        return np.ascontiguousarray(out[:n], dtype=np.float32)

    def new_input(self, batch: int) -> np.ndarray:
        return np.empty((batch, 3, self.input_height, self.input_width), dtype=np.float32)


def _metadata(session: Any) -> dict[str, str]:
    try:
        return dict(session.get_modelmeta().custom_metadata_map)
    except Exception:  # metadata is optional
        return {}


def _parse_literal(text: str | None) -> Any:
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _input_size(shape: list, meta: dict[str, str]) -> tuple[int, int]:
    """(width, height): static dims of the model, else ONNX metadata `imgsz` ([h, w]), else 640."""
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return w, h
    imgsz = _parse_literal(meta.get("imgsz"))
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2 and all(
            isinstance(v, int) and v > 0 for v in imgsz):
        return imgsz[1], imgsz[0]
    return 640, 640


def _metadata_names(meta: dict[str, str]) -> dict[int, str] | None:
    names = _parse_literal(meta.get("names"))
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        return {k: str(v) for k, v in names.items()}
    if isinstance(names, list):
        return {i: str(v) for i, v in enumerate(names)}
    return None


def class_names_for(nc: int, given: tuple[str, ...] | None, meta: dict[str, str]) -> tuple[str, ...]:
    """--labels / model.yaml names, else ONNX metadata `names`, else class_{id} (CONTRACT 6)."""
    src = dict(enumerate(given)) if given is not None else (_metadata_names(meta) or {})
    return tuple(src.get(i, f"class_{i}") for i in range(nc))


def load_model(spec: ModelSpec, device: Device, max_batch: int | None) -> LoadedModel:
    """Create the session, check it is a YOLO-style detector, and warm it up.

    max_batch None means the device's default (1 on CPU, 16 on CUDA), capped by the
    model's static batch dimension. Warm-up runs every batch size the server will run.
    """
    if not os.path.isfile(spec.path):
        raise ModelError(f"model file {spec.path} does not exist")
    ort = import_onnxruntime()
    try:
        session = create_session(spec.path, device, ort, spec.intra_op_threads)
    except Exception as exc:
        if type(exc).__name__ == "RuntimeUnavailable":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {spec.path}: {first}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, None, "3"):
        raise ModelError(f"{spec.path} is not a YOLO-style detector: expected one NCHW image input")
    if len(outputs[0].shape) != 3:
        raise ModelError(f"{spec.path} is not a YOLO-style detector: "
                         "expected an output [batch, 4+classes, anchors]")
    if inputs[0].type != "tensor(float)":
        raise ModelError(f"{spec.path}: input type {inputs[0].type} is not supported (float32 only)")
    meta = _metadata(session)
    width, height = _input_size(inputs[0].shape, meta)
    batch_dim = inputs[0].shape[0]
    limit = max_batch if max_batch is not None else (1 if device.kind == "cpu" else 16)
    fixed = 0
    if isinstance(batch_dim, int) and batch_dim > 0:
        limit = min(limit, batch_dim)
        fixed = batch_dim if batch_dim > 1 else 0

    probe = LoadedModel(spec, session, device, inputs[0].name, outputs[0].name, width, height,
                        0, (), limit, tuple(session.get_providers()), fixed)
    nc = 0
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed warm-up is our one error line, not ORT's log too
    for b in range(1, limit + 1):  # warm up every batch size it may run
        x = probe.new_input(b)
        x.fill(114 / 255)
        try:
            out = probe.run(x, quiet)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{spec.path}: warm-up inference failed: {first}") from None
        if out.ndim != 3 or out.shape[0] != b or out.shape[1] < 5:
            raise ModelError(f"{spec.path} is not a YOLO-style detector: output shape "
                             f"{list(out.shape)}, expected [{b}, 4+classes, anchors]")
        nc = out.shape[1] - 4
    names = class_names_for(nc, spec.class_names, meta)
    return LoadedModel(spec, session, device, inputs[0].name, outputs[0].name, width, height,
                       nc, names, limit, tuple(session.get_providers()), fixed)
