"""The device path: preprocessing as an ONNX graph and IO-bound model runs (issue 4).

Used when serving on CUDA (``--preprocess auto``), and on the CPU provider only when asked
(``--preprocess graph``), so that CI runs this path. One :class:`DevicePath` per
`LoadedModel` owns:

- one preprocessing session per pixel format met (``build_preprocess_graph`` for the
  model family's :class:`~vasipc.preprocess.Preprocess`, created on first use; NV12's at
  warm-up), with the model's providers;
- the IO-bound model runs on :class:`DeviceBatch` buffers.

A :class:`DeviceBatch` is one worker's input buffer: an ``OrtValue`` ``[S, 3, H, W]``
float32 on the model's device (S the largest padded batch size), plus that worker's
staging buffers and IO bindings. A request goes through it in two steps:

1. :meth:`DevicePath.stage`: the frame's bytes are copied from the read-only mapping into
   a host staging ``OrtValue`` (pinned memory on CUDA where this onnxruntime can allocate
   it, else pageable), by ``copy_frame_guarded``: no GIL, under the SIGBUS guard, so a
   frame file truncated while it is copied raises ``FrameBusError``, never a crash.
2. :meth:`DevicePath.preprocess_into`: the preprocessing graph (the family's resize
   mode) runs from the staging buffer
   (ORT uploads it: the raw frame, 1.5 bytes a pixel for NV12) and writes its ``images``
   output straight into the request's slot of the device batch buffer (the output is
   bound to the slot's address), so the float tensor never travels to the host.

:meth:`DevicePath.run` runs the first ``size`` slots (``size`` the padded batch size) with
the image input bound to the batch buffer, the model's other inputs (D-FINE's
``orig_target_sizes``) fed from the host, and every output bound to the device, then
copies the outputs to the host (``copy_outputs_to_cpu``) for the CPU decode, each cut to
the batch's n images.

Threads: the two batcher workers each own one DeviceBatch (its bindings and staging
buffers are used by one thread at a time); the sessions are shared (ORT's ``Run`` is
thread-safe). Each ``run_with_iobinding`` returns when its results are in memory (ORT
synchronizes the device at the end of a run), so a slot written by the preprocessing
session is complete before the model's run reads it, and a staging buffer may be reused
as soon as the preprocessing run has returned.

CUDA graphs (ORT's ``enable_cuda_graph``) are not used yet. ORT captures a graph with
``cudaStreamCaptureModeGlobal``, so a capture fails when another thread calls into CUDA
meanwhile (the other worker's preprocessing run, a hot reload's warm-up). They would need
every (worker buffer, batch size) captured while nothing else runs, at start and again at
each reload, with fixed output buffers; whether they pay at batch 1 is for a GPU to
measure (bench/gpu_check.sh's c1 figure against gpu_ref.py's IO-binding run).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from vasipc._fast.letterbox import copy_frame_guarded, frame_nbytes
from vasipc.backends.onnxruntime import cuda_provider, import_onnxruntime
from vasipc.errors import first_line
from vasipc.frames import NV12
from vasipc.preprocess import LETTERBOX, Geometry, Preprocess
from vasipc.preprocess_graph import (
    INPUT_FRAME,
    INPUT_GEOMETRY,
    OUTPUT,
    build_preprocess_graph,
    geometry_input,
)
from vasipc.runtime import Device, usable_cpus

if TYPE_CHECKING:
    from vasipc.frame_source import OpenFrame
    from vasipc.model import LoadedModel

log = logging.getLogger("vasipc")

PREPROCESS_MODES = ("auto", "cpu", "graph")
STAGING_CACHE = 4  # staging buffers kept per worker, one per frame size (LRU)


def resolve_preprocess(mode: str, device: Device) -> str:
    """'cpu' (the C kernel) or 'graph' (this module) for `--preprocess` on `device`."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"invalid preprocess mode {mode!r}: expected auto, cpu or graph")
    if mode == "auto":
        return "graph" if device.kind == "cuda" else "cpu"
    return mode


class DeviceSlot:
    """Slot `index` of a DeviceBatch (what ``batch[index]`` gives the batcher)."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: DeviceBatch, index: int) -> None:
        self.batch, self.index = batch, index

    @property
    def address(self) -> int:
        return self.batch.address + self.index * self.batch.slot_bytes


class Staged:
    """A frame's bytes in a staging buffer, with what the preprocessing graph needs."""

    __slots__ = ("height", "pixel_format", "stride", "value", "width")

    def __init__(self, value: Any, pixel_format: int, width: int, height: int,
                 stride: int) -> None:
        self.value, self.pixel_format = value, pixel_format
        self.width, self.height, self.stride = width, height, stride


class DeviceBatch:
    """One worker's input batch buffer on the device, its staging buffers and bindings."""

    def __init__(self, path: DevicePath, model: LoadedModel) -> None:
        self.path = path
        self.model = model
        self.size = model.batch_sizes[-1]
        shape = [self.size, 3, model.input_height, model.input_width]
        if min(shape) < 1:
            raise ValueError(f"invalid input batch shape {shape}")
        self.slot_shape = [1, *shape[1:]]
        self.slot_bytes = 3 * model.input_height * model.input_width * 4
        ort = path.ort
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(
            shape, np.float32, path.device_type, path.device_index)
        # Pad slots are never read back, but start them as padding rather than garbage.
        pad = np.empty(shape, np.float32)
        pad[...] = path.preprocess.pad_pixel[:, None, None]
        self.value.update_inplace(pad)
        self.address = self.value.data_ptr()
        self._runs: dict[int, Any] = {}  # padded size -> the model's IO binding
        self._pre: dict[int, Any] = {}   # pixel format -> the preprocessing IO binding
        self._staging: OrderedDict[int, Any] = OrderedDict()  # nbytes -> OrtValue

    def __getitem__(self, index: int) -> DeviceSlot:
        if not 0 <= index < self.size:
            raise IndexError(f"slot {index} out of range 0..{self.size - 1}")
        return DeviceSlot(self, index)

    def __len__(self) -> int:
        return self.size

    def staging(self, nbytes: int) -> Any:
        """A host staging OrtValue of exactly `nbytes` bytes (kept for reuse)."""
        value = self._staging.get(nbytes)
        if value is None:
            value = self.path.new_staging(nbytes)
            self._staging[nbytes] = value
            while len(self._staging) > STAGING_CACHE:
                self._staging.popitem(last=False)
        else:
            self._staging.move_to_end(nbytes)
        return value

    def run_binding(self, size: int) -> Any:
        """The model's IO binding for a run of `size` slots: the image input bound to the
        buffer, every output to the device (the extra inputs are bound per run)."""
        binding = self._runs.get(size)
        if binding is None:
            m, p = self.model, self.path
            binding = m.backend.session().io_binding()
            binding.bind_input(m.input_name, p.device_type, p.device_index, np.float32,
                               [size, *self.slot_shape[1:]], self.address)
            for name in m.output_names:
                binding.bind_output(name, p.device_type, p.device_index)
            self._runs[size] = binding
        return binding

    def preprocess_binding(self, pixel_format: int) -> Any:
        binding = self._pre.get(pixel_format)
        if binding is None:
            binding = self.path.preprocess_session(pixel_format).io_binding()
            self._pre[pixel_format] = binding
        return binding


class DevicePath:
    """Graph preprocessing and IO-bound runs for one LoadedModel (see the module doc)."""

    def __init__(self, device: Device, in_w: int, in_h: int, threads: int = 0,
                 preprocess: Preprocess = LETTERBOX) -> None:
        self.ort = import_onnxruntime()
        self.device = device
        self.preprocess = preprocess
        self.device_type = "cuda" if device.kind == "cuda" else "cpu"
        self.device_index = device.index if device.kind == "cuda" else 0
        self.in_w, self.in_h = in_w, in_h
        self.threads = threads
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        # "pinned" (CUDA, page-locked host memory), "pageable" or "cpu" (the CPU provider)
        self.staging_kind = "cpu" if device.kind == "cpu" else self._probe_pinned()

    # ---- sessions and buffers --------------------------------------------------------
    def _providers(self) -> list:
        """The preprocessing graph's: CUDA (under TensorRT too: a resize gains nothing
        from an engine) or the CPU."""
        if self.device.kind == "cuda":
            return [cuda_provider(self.device), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _pinned_memory_info(self) -> Any:
        """The CUDA EP's host-accessible (pinned) memory info, where this onnxruntime
        exposes it (EP devices, onnxruntime >= 1.23), else None."""
        ort = self.ort
        kind = getattr(ort, "OrtDeviceMemoryType", None)
        get_devices = getattr(ort, "get_ep_devices", None)
        if kind is None or get_devices is None:
            return None
        for ep_device in get_devices():
            if ep_device.ep_name != "CUDAExecutionProvider":
                continue
            try:
                info = ep_device.memory_info(kind.HOST_ACCESSIBLE)
            except Exception:
                continue
            if info is not None:
                return info
        return None

    def _probe_pinned(self) -> str:
        self._pinned = self._pinned_memory_info()
        if self._pinned is not None:
            try:
                self._alloc_pinned(1)
                return "pinned"
            except Exception as exc:
                log.debug("pinned staging memory unavailable: %s", exc)
                self._pinned = None
        return "pageable"

    def _alloc_pinned(self, nbytes: int) -> Any:
        return self.ort.OrtValue.ortvalue_from_shape_and_type(
            [nbytes], np.uint8, memory_info=self._pinned)

    def new_staging(self, nbytes: int) -> Any:
        if self.staging_kind == "pinned":
            return self._alloc_pinned(nbytes)
        return self.ort.OrtValue.ortvalue_from_shape_and_type([nbytes], np.uint8, "cpu", 0)

    def use_pageable_staging(self, why: str) -> None:
        """Fall back to pageable staging memory (a pinned buffer the session refused)."""
        if self.staging_kind == "pinned":
            log.warning("pinned staging memory does not work here (%s): using pageable memory",
                        why)
            self.staging_kind = "pageable"

    def preprocess_session(self, pixel_format: int) -> Any:
        session = self._sessions.get(pixel_format)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(pixel_format)
            if session is None:
                ort = self.ort
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                opts.intra_op_num_threads = self.threads or usable_cpus()
                opts.log_severity_level = 3
                graph = build_preprocess_graph(pixel_format, self.in_w, self.in_h,
                                               self.preprocess)
                session = ort.InferenceSession(graph.SerializeToString(), sess_options=opts,
                                               providers=self._providers())
                self._sessions[pixel_format] = session
        return session

    def formats(self) -> tuple[int, ...]:
        """The pixel formats whose preprocessing session exists."""
        return tuple(sorted(self._sessions))

    def new_batch(self, model: LoadedModel) -> DeviceBatch:
        return DeviceBatch(self, model)

    # ---- per request -----------------------------------------------------------------
    def stage(self, frame: OpenFrame, batch: DeviceBatch) -> Staged:
        """Copy the frame's bytes to a staging buffer of `batch` (guarded: FrameBusError
        if the file is truncated meanwhile). The caller checks the frame is unchanged."""
        nbytes = frame_nbytes(frame.pixel_format, frame.width, frame.height, frame.stride)
        value = batch.staging(nbytes)
        copy_frame_guarded(frame.view, value.data_ptr(), nbytes)
        return Staged(value, frame.pixel_format, frame.width, frame.height, frame.stride)

    def preprocess_into(self, staged: Staged, slot: DeviceSlot) -> Geometry:
        """Run the preprocessing graph from the staging buffer into `slot`; returns the
        frame's Geometry (``Preprocess.placement``)."""
        geom, placement = self.preprocess.placement(staged.width, staged.height, self.in_w,
                                                    self.in_h)
        geometry = geometry_input(staged.width, staged.height, staged.stride, placement)
        batch = slot.batch
        session = self.preprocess_session(staged.pixel_format)
        binding = batch.preprocess_binding(staged.pixel_format)
        binding.bind_ortvalue_input(INPUT_FRAME, staged.value)
        binding.bind_cpu_input(INPUT_GEOMETRY, geometry)
        binding.bind_output(OUTPUT, self.device_type, self.device_index, np.float32,
                            batch.slot_shape, slot.address)
        session.run_with_iobinding(binding)
        return geom

    # ---- per batch -------------------------------------------------------------------
    def run(self, model: LoadedModel, batch: DeviceBatch, n: int,
            options: Any = None) -> list[np.ndarray]:
        """Run slots [0, n) of `batch`, padded to the model's run size for n, with the
        model's extra inputs (``model.extra_inputs(size)``: name -> host array); returns
        every output in ``model.output_names`` order, each cut to the first n images, on
        the host, C-contiguous, in its own dtype (float outputs as float32, integer ones
        as they are)."""
        size = model.run_size(n)
        binding = batch.run_binding(size)
        # Kept referenced until the run returns: the binding may point at their memory.
        feeds = {name: np.ascontiguousarray(v) for name, v in model.extra_inputs(size).items()}
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        model.backend.session().run_with_iobinding(binding, options)
        outs = []
        for out in binding.copy_outputs_to_cpu():
            dtype = np.float32 if out.dtype.kind == "f" else out.dtype
            outs.append(np.ascontiguousarray(out[:n], dtype=dtype))
        return outs

    def warm_up(self, model: LoadedModel, batch: DeviceBatch) -> None:
        """Run NV12 preprocessing once (its session made now, and the staging memory
        checked: a pinned buffer the session refuses falls back to pageable memory) into
        slot 0 of `batch`. The model's sizes are warmed by the caller."""
        w, h = 64, 48
        frame = np.full(frame_nbytes(NV12, w, h, w), 128, np.uint8)
        for attempt in (0, 1):
            value = self.new_staging(frame.nbytes)
            copy_frame_guarded(frame, value.data_ptr(), frame.nbytes)
            try:
                self.preprocess_into(Staged(value, NV12, w, h, w), batch[0])
                return
            except Exception as exc:
                if attempt or self.staging_kind != "pinned":
                    raise
                self.use_pageable_staging(first_line(exc))
