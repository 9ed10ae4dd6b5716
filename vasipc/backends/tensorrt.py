"""The TensorRT backend: ONNX Runtime's TensorRT execution provider, on NVIDIA GPUs.

FP16 by default (`--precision fp32` keeps float32). TensorRT builds an engine per
optimization profile, which takes minutes, so the engines and the timing cache live in a
cache directory (`--cache-dir`, default `$XDG_CACHE_HOME/vasipc/tensorrt`), in a
subdirectory keyed by everything an engine depends on: the model file's SHA-256, the
precision, the padded batch sizes and input size, the ONNX Runtime and TensorRT versions
and the GPU. There is one explicit profile per padded batch size (min = opt = max), and the
session is created in `prepare`, during warm-up, so the socket is bound only once every
engine is built. The provider list must then start with TensorRT: a session that fell back
to CUDA is refused (exit code 2), never served slower than asked.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
from typing import Any

from vasipc.backends.base import BackendOptions, BackendUnavailable
from vasipc.backends.onnxruntime import (
    OnnxRuntimeBackend,
    create_session,
    cuda_provider,
    import_onnxruntime,
)
from vasipc.errors import ModelError, first_line
from vasipc.model_yaml import sha256_file
from vasipc.onnx_file import OnnxSummary
from vasipc.runtime import Device

PROVIDER = "TensorrtExecutionProvider"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vasipc", "tensorrt")


def tensorrt_version() -> str:
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-libs", "tensorrt-cu12-libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def gpu_name(index: int) -> str:
    """The CUDA device's name and compute capability, from the driver API."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), index) \
                or cuda.cuDeviceGetName(name, 256, dev):
            return "unknown-gpu"
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # COMPUTE_CAPABILITY_MINOR
        return f"{name.value.decode(errors='replace')} sm{major.value}{minor.value}"
    except OSError:
        return "unknown-gpu"


def cache_key(model_sha256: str, precision: str, batch_sizes: tuple[int, ...], width: int,
              height: int, ort_version: str, trt_version: str, gpu: str) -> str:
    """The cache subdirectory's name: readable where it can be, hashed where it must be."""
    parts = "|".join([model_sha256, precision, ",".join(map(str, batch_sizes)),
                      f"{width}x{height}", ort_version, trt_version, gpu])
    return f"{model_sha256[:16]}-{precision}-{hashlib.sha256(parts.encode()).hexdigest()[:16]}"


def profile_shapes(name: str, batch_sizes: tuple[int, ...], width: int, height: int) -> str:
    """One profile per padded batch size, as the provider option spells a list of them."""
    return ",".join(f"{name}:{b}x3x{height}x{width}" for b in batch_sizes)


def provider_options(device: Device, precision: str, cache_dir: str, image: str,
                     batch_sizes: tuple[int, ...], width: int, height: int) -> dict[str, Any]:
    shapes = profile_shapes(image, batch_sizes, width, height)
    return {
        "device_id": device.index,
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache_dir,
        "trt_profile_min_shapes": shapes,
        "trt_profile_opt_shapes": shapes,
        "trt_profile_max_shapes": shapes,
    }


class TensorRtBackend(OnnxRuntimeBackend):
    name = "tensorrt"
    _float_precisions = ("fp16", "fp32")

    def __init__(self, path: str, device: Device, summary: OnnxSummary,
                 options: BackendOptions) -> None:
        if device.kind != "cuda":
            raise BackendUnavailable(f"--backend tensorrt needs a CUDA GPU, not {device.name}")
        available = import_onnxruntime().get_available_providers()
        if PROVIDER not in available:  # before any session is made
            raise BackendUnavailable(f"--backend tensorrt: onnxruntime lists no {PROVIDER} "
                                     f"(available: {', '.join(available)}); install "
                                     "onnxruntime-gpu with TensorRT's libraries")
        self._trt: dict[str, Any] | None = None  # the provider options, once prepared
        self.cache_root = options.cache_dir or default_cache_dir()
        super().__init__(path, device, summary, options)

    def _providers(self) -> list:
        if self._trt is None:  # before prepare: the session that reads the model's tensors
            return ["CPUExecutionProvider"]
        return [(PROVIDER, self._trt), cuda_provider(self.device), "CPUExecutionProvider"]

    def prepare(self, batch_sizes: tuple[int, ...], width: int, height: int) -> None:
        image = next(t.name for t in self.inputs if len(t.shape) == 4)
        key = cache_key(sha256_file(self.path), self.precision, batch_sizes, width, height,
                        self.ort.__version__, tensorrt_version(), gpu_name(self.device.index))
        cache_dir = os.path.join(self.cache_root, key)
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"--cache-dir {self.cache_root}: {exc.strerror or exc}") from None
        self._trt = provider_options(self.device, self.precision, cache_dir, image,
                                     batch_sizes, width, height)
        self.cache_dir = cache_dir
        try:  # the engines are built here, during warm-up
            session = create_session(self.path, self.device, self.ort, self.threads_per_stream,
                                     self._providers())
        except Exception as exc:
            raise ModelError(f"{self.path}: TensorRT cannot build it: {first_line(exc)}") from None
        self._check_providers(session)
        self._sessions = [session]
