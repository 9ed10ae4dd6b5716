"""The loaded model: one immutable object that each batch captures once.

`LoadedModel` holds the backend (the runtime serving it, vasipc/backends/) and everything
derived from the model (input size, class names, thresholds, version). A hot reload
builds a new one and swaps a single reference; a batch in flight keeps the object it
started with.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vasipc.backends import Backend, BackendOptions, BackendUnavailable, open_backend
from vasipc.backends.base import SOLO
from vasipc.device_path import DevicePath, resolve_preprocess
from vasipc.errors import ModelError, first_line
from vasipc.heads import Declared, Family, Head, ModelFacts, family_for
from vasipc.runtime import Device

__all__ = ["CLASSES_SOURCE", "LoadedModel", "ModelError", "ModelSpec", "batch_sizes_for",
           "load_model"]

CLASSES_SOURCE = "model.yaml output_schema.classes"  # a class names source, in messages


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
    backend: str = "onnxruntime"  # resolved by backends.select_backend
    precision: str = "auto"
    streams: int = 0  # concurrent runs; 0: the backend's choice for the device
    threads: int = 0  # inference threads in all; 0: one per usable CPU
    cache_dir: str | None = None  # compiled engines (tensorrt)
    class_names_source: str | None = None  # where class_names came from, for error messages
    expected_resolution: tuple[int, int] | None = None  # model.yaml's (w, h): must be the input's
    # model.yaml output_schema.classes: the class count, or the names by id (must be the
    # names served from a names file, else the ONNX metadata's; with no such names, the
    # names served: then class_names_source is CLASSES_SOURCE)
    declared_classes: int | tuple[str, ...] | None = None
    declared: Declared = field(default_factory=Declared)  # model.yaml: architecture, task, ...
    # (its class_names are this spec's, filled in at load)


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakly referenced: tests see it freed
class LoadedModel:
    spec: ModelSpec
    backend: Backend = field(repr=False)
    device: Device
    input_name: str
    output_names: tuple[str, ...]
    input_width: int
    input_height: int
    max_batch: int
    family: Family = field(repr=False, compare=False)
    head: Head | None = field(default=None, repr=False, compare=False)  # set once outputs were seen
    fixed_batch: int = 0  # the model's static batch dimension when above 1

    batch_sizes: tuple[int, ...] = (1,)  # the padded sizes runs use (batch_sizes_for)
    preprocess: str = "cpu"  # "cpu": the C kernel into numpy buffers; "graph": device_path
    device_path: Any = field(default=None, repr=False, compare=False)  # DevicePath in graph mode

    @property
    def providers(self) -> tuple[str, ...]:
        return self.backend.providers

    @property
    def streams(self) -> int:
        return self.backend.streams

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.head.class_names

    @property
    def class_ids(self) -> dict[str, tuple[int, ...]]:
        return self.head.class_ids

    def run_size(self, n: int) -> int:
        """The padded batch size a batch of n requests runs at: the smallest size >= n."""
        for size in self.batch_sizes:
            if size >= n:
                return size
        raise ValueError(f"batch of {n} exceeds the largest run size {self.batch_sizes[-1]}")

    def extra_inputs(self, size: int) -> dict[str, np.ndarray]:
        """The inputs besides the image for a run of `size` (D-FINE's target sizes)."""
        return self.family.extra_inputs(size)

    def new_input(self, batch: int | None = None) -> np.ndarray:
        """A numpy input buffer of `batch` slots (default: the largest run size)."""
        return np.empty((self.batch_sizes[-1] if batch is None else batch, 3,
                         self.input_height, self.input_width), dtype=np.float32)

    def new_buffer(self) -> Any:
        """One batcher worker's input buffer, with a slot for every request of the largest
        run size (indexing gives a slot): a numpy array (cpu mode, padding slots start at
        the pad value) or a device_path.DeviceBatch (graph mode)."""
        if self.device_path is not None:
            return self.device_path.new_batch(self)
        x = self.new_input()
        x[:] = self.family.preprocess.pad_pixel[:, None, None]
        return x

    def run_batch(self, buffer: Any, n: int, stream: int = 0,
                  options: Any = None) -> list[np.ndarray]:
        """Run the first n slots of a `new_buffer()` buffer at the padded size for n, on
        stream `stream` of the backend (the pad slots hold whatever was there: their
        outputs are dropped); every output, in `output_names` order, sliced to the n
        images (float outputs as C-contiguous float32)."""
        if self.device_path is not None:
            return self.device_path.run(self, buffer, n, options)
        size = self.run_size(n)
        feeds = {self.input_name: buffer[:size], **self.extra_inputs(size)}
        outs = self.backend.run(feeds, size, stream, options)
        return [np.ascontiguousarray(o[:n], dtype=np.float32) if o.dtype.kind == "f" else o[:n]
                for o in outs]


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


def check_declared_classes(spec: ModelSpec, facts: ModelFacts, head: Head) -> None:
    """model.yaml's output_schema.classes against the model: its count against the model's
    classes, its names against the names a names file gives, else the ONNX metadata's (a
    model.yaml that disagrees describes another model)."""
    declared = spec.declared_classes
    if declared is None:
        return
    count = declared if isinstance(declared, int) else len(declared)
    if count != head.num_classes:
        raise ModelError(f"{spec.path}: {CLASSES_SOURCE} says {count} classes but the model "
                         f"has {head.num_classes}")
    if isinstance(declared, int):
        return
    other, what = ((facts.metadata_names, "the model's ONNX metadata")
                   if spec.class_names_source == CLASSES_SOURCE
                   else (head.class_names, spec.class_names_source))
    if other is None or tuple(other) == declared:
        return
    if len(other) != count:
        raise ModelError(f"{spec.path}: {CLASSES_SOURCE} names {count} classes, {what} {len(other)}")
    i = next(i for i, (a, b) in enumerate(zip(declared, other, strict=True)) if a != b)
    raise ModelError(f"{spec.path}: {CLASSES_SOURCE} does not match {what}: class {i} is "
                     f"{declared[i]!r} in model.yaml, {other[i]!r} there")


def load_model(spec: ModelSpec, device: Device, max_batch: int | None,
               preprocess: str = "auto") -> LoadedModel:
    """Open the model with its backend, recognize its family (heads/), compile it for its
    batch sizes, check its outputs on a probe run and warm it up; ModelError for anything
    it cannot serve, BackendUnavailable for a runtime or precision this machine lacks.

    max_batch None means the device's default (1 on CPU, 16 on CUDA), capped by the
    model's static batch dimension. Batches run padded to a few sizes (`batch_sizes_for`:
    1, 2, 4, ... and max_batch); warm-up runs each of them once on every stream (cuDNN's
    algorithm search runs per shape). preprocess: "auto" (graph on CUDA, the C kernel on
    CPU), "cpu" or "graph" (see device_path; ONNX Runtime backends only); in graph mode
    the warm-up goes through the device path.
    """
    try:
        mode = resolve_preprocess(preprocess, device)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if mode == "graph" and spec.backend == "openvino":
        raise BackendUnavailable("--preprocess graph runs on ONNX Runtime backends, not openvino")
    if not os.path.isfile(spec.path):
        raise ModelError(f"model file {spec.path} does not exist")
    backend = open_backend(spec.backend, spec.path, device, BackendOptions(
        precision=spec.precision, streams=spec.streams, threads=spec.threads,
        cache_dir=spec.cache_dir))
    facts = ModelFacts(spec.path, backend.inputs, backend.outputs, backend.metadata,
                       dataclasses.replace(spec.declared, class_names=spec.class_names,
                                           class_names_source=spec.class_names_source))
    family = family_for(facts)
    image = facts.image_input()
    if image.shape[1] not in (3, None) and not isinstance(image.shape[1], str):
        raise facts.refuse("the image input must have 3 channels")
    if image.type != "tensor(float)":
        raise ModelError(f"{spec.path}: input type {image.type} is not supported (float32 only)")
    width, height = facts.input_size
    if spec.expected_resolution is not None and spec.expected_resolution != (width, height):
        # The input size comes from the model (docs/contract.md 6): a model.yaml that
        # disagrees describes another export, so it is refused rather than obeyed.
        w, h = spec.expected_resolution
        raise ModelError(f"{spec.path}: model.yaml expected_resolution [{w}, {h}] does not "
                         f"match the model's input size {width}x{height}")
    batch_dim = image.shape[0]
    limit = max_batch if max_batch is not None else (1 if device.kind == "cpu" else 16)
    fixed = 0
    if isinstance(batch_dim, int) and batch_dim > 0:
        limit = min(limit, batch_dim)
        fixed = batch_dim if batch_dim > 1 else 0
    sizes = batch_sizes_for(limit, fixed)
    backend.prepare(sizes, width, height)

    model = LoadedModel(spec, backend, device, image.name, tuple(t.name for t in facts.outputs),
                        width, height, limit, family, fixed_batch=fixed, batch_sizes=sizes,
                        preprocess=mode)
    quiet = backend.quiet_options()  # a failed warm-up is our one error line, not the runtime's
    if mode == "graph":
        try:
            model = dataclasses.replace(model, device_path=DevicePath(
                device, width, height, spec.threads, family.preprocess))
            buffer = model.new_buffer()
            model.device_path.warm_up(model, buffer)
        except Exception as exc:
            raise ModelError(f"{spec.path}: device path setup failed: {first_line(exc)}") from None
    else:
        buffer = model.new_buffer()
    streams = [*range(backend.streams), *([SOLO] if backend.solo else [])]
    for b in sizes:  # warm up every batch size on every stream; the first run shows the outputs
        for stream in streams:
            try:
                outs = model.run_batch(buffer, b, stream, quiet)
            except Exception as exc:
                raise ModelError(f"{spec.path}: warm-up inference failed: {first_line(exc)}") from None
            shapes = [tuple(o.shape) for o in outs]
            if any(not s or s[0] != b for s in shapes):
                raise facts.refuse(f"the outputs of a batch of {b} are {shapes}, not batch-first")
            if model.head is None:
                model = dataclasses.replace(model, head=family.build([(1, *s[1:]) for s in shapes]))
                check_declared_classes(spec, facts, model.head)
    return model
