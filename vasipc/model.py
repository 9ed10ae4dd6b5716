"""The loaded model: one immutable object that each batch captures once.

`LoadedModel` holds the session and everything derived from the model (input size,
class names, thresholds, version). A hot reload builds a new one and swaps a single
reference; a batch in flight keeps the object it started with.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vasipc.device_path import DevicePath, resolve_preprocess
from vasipc.errors import first_line
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
    class_names_source: str | None = None  # where class_names came from, for error messages
    expected_resolution: tuple[int, int] | None = None  # model.yaml's (w, h): must be the input's


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakly referenced: tests see it freed
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

    batch_sizes: tuple[int, ...] = (1,)  # the padded sizes runs use (batch_sizes_for)
    preprocess: str = "cpu"  # "cpu": the C kernel into numpy buffers; "graph": device_path
    device_path: Any = field(default=None, repr=False, compare=False)  # DevicePath in graph mode

    def run_size(self, n: int) -> int:
        """The padded batch size a batch of n requests runs at: the smallest size >= n."""
        for size in self.batch_sizes:
            if size >= n:
                return size
        raise ValueError(f"batch of {n} exceeds the largest run size {self.batch_sizes[-1]}")

    def run(self, batch: np.ndarray, options: Any = None) -> np.ndarray:
        """Run one batch [n,3,H,W] float32 (padded with copies to its run size when n is
        not one); returns [n, 4+nc, N] float32 (C-contiguous)."""
        n = batch.shape[0]
        size = self.run_size(n)
        if size != n:
            full = np.full((size, *batch.shape[1:]), _PAD, dtype=np.float32)
            full[:n] = batch
            batch = full
        out = self.session.run([self.output_name], {self.input_name: batch}, options)[0]
        return np.ascontiguousarray(out[:n], dtype=np.float32)

    def new_input(self, batch: int | None = None) -> np.ndarray:
        """A numpy input buffer of `batch` slots (default: the largest run size)."""
        return np.empty((self.batch_sizes[-1] if batch is None else batch, 3,
                         self.input_height, self.input_width), dtype=np.float32)

    def new_buffer(self) -> Any:
        """One batcher worker's input buffer, with a slot for every request of the largest
        run size (indexing gives a slot): a numpy array (cpu mode, padding slots start at
        114/255) or a device_path.DeviceBatch (graph mode)."""
        if self.device_path is not None:
            return self.device_path.new_batch(self)
        x = self.new_input()
        x.fill(_PAD)
        return x

    def run_batch(self, buffer: Any, n: int, options: Any = None) -> np.ndarray:
        """Run the first n slots of a `new_buffer()` buffer at the padded size for n (the
        pad slots hold whatever was there: their outputs are dropped); [n, 4+nc, N]."""
        if self.device_path is not None:
            return self.device_path.run(self, buffer, n, options)
        size = self.run_size(n)
        out = self.session.run([self.output_name], {self.input_name: buffer[:size]}, options)[0]
        return np.ascontiguousarray(out[:n], dtype=np.float32)


_PAD = np.float32(114) / np.float32(255)


def batch_sizes_for(max_batch: int, fixed_batch: int = 0) -> tuple[int, ...]:
    """The batch sizes the session runs: 1, 2, 4, ... below max_batch, then max_batch
    itself (a batch of n runs at the smallest size >= n, padded); a model with a static
    batch dimension above 1 runs only that."""
    if fixed_batch:
        return (fixed_batch,)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


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
    """--labels / model.yaml names, else ONNX metadata `names`, else class_{id} (CONTRACT 6).

    load_model refuses given names whose count is not nc; the metadata is the model's own
    and may leave ids unnamed (class_{id})."""
    src = dict(enumerate(given)) if given is not None else (_metadata_names(meta) or {})
    return tuple(src.get(i, f"class_{i}") for i in range(nc))


def load_model(spec: ModelSpec, device: Device, max_batch: int | None,
               preprocess: str = "auto") -> LoadedModel:
    """Create the session, check it is a YOLO-style detector, and warm it up.

    max_batch None means the device's default (1 on CPU, 16 on CUDA), capped by the
    model's static batch dimension. Batches run padded to a few sizes (`batch_sizes_for`:
    1, 2, 4, ... and max_batch); warm-up runs each of them once (cuDNN's algorithm search
    runs per shape). preprocess: "auto" (graph on CUDA, the C kernel on CPU), "cpu" or
    "graph" (see device_path); in graph mode the warm-up goes through the device path.
    """
    try:
        mode = resolve_preprocess(preprocess, device)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if not os.path.isfile(spec.path):
        raise ModelError(f"model file {spec.path} does not exist")
    ort = import_onnxruntime()
    try:
        session = create_session(spec.path, device, ort, spec.intra_op_threads)
    except Exception as exc:
        if type(exc).__name__ == "RuntimeUnavailable":
            raise
        raise ModelError(f"cannot load {spec.path}: {first_line(exc)}") from None
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
    if spec.expected_resolution is not None and spec.expected_resolution != (width, height):
        # The input size comes from the model (CONTRACT 6): a model.yaml that disagrees
        # describes another export, so it is refused rather than obeyed.
        w, h = spec.expected_resolution
        raise ModelError(f"{spec.path}: model.yaml expected_resolution [{w}, {h}] does not "
                         f"match the model's input size {width}x{height}")
    batch_dim = inputs[0].shape[0]
    limit = max_batch if max_batch is not None else (1 if device.kind == "cpu" else 16)
    fixed = 0
    if isinstance(batch_dim, int) and batch_dim > 0:
        limit = min(limit, batch_dim)
        fixed = batch_dim if batch_dim > 1 else 0
    sizes = batch_sizes_for(limit, fixed)

    probe = LoadedModel(spec, session, device, inputs[0].name, outputs[0].name, width, height,
                        0, (), limit, tuple(session.get_providers()), fixed, sizes, mode)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed warm-up is our one error line, not ORT's log too
    buffer = None
    if mode == "graph":
        try:
            probe = dataclasses.replace(probe, device_path=DevicePath(
                device, width, height, spec.intra_op_threads))
            buffer = probe.new_buffer()
            probe.device_path.warm_up(probe, buffer)
        except Exception as exc:
            raise ModelError(f"{spec.path}: device path setup failed: {first_line(exc)}") from None
    else:
        buffer = probe.new_buffer()
    nc = 0
    for b in sizes:  # warm up every batch size it will run
        try:
            out = probe.run_batch(buffer, b, quiet)
        except Exception as exc:
            raise ModelError(f"{spec.path}: warm-up inference failed: {first_line(exc)}") from None
        if out.ndim != 3 or out.shape[0] != b or out.shape[1] < 5:
            raise ModelError(f"{spec.path} is not a YOLO-style detector: output shape "
                             f"{list(out.shape)}, expected [{b}, 4+classes, anchors]")
        nc = out.shape[1] - 4
    if spec.class_names is not None and len(spec.class_names) != nc:
        # A names file for another model would name every detection wrongly: refuse it.
        raise ModelError(f"{spec.class_names_source or 'the class names'} has "
                         f"{len(spec.class_names)} class names but the model {spec.path} has "
                         f"{nc} classes ({nc + 4} output channels - 4)")
    names = class_names_for(nc, spec.class_names, meta)
    return dataclasses.replace(probe, num_classes=nc, class_names=names)


