"""Inference runtimes behind one seam (base.Backend): which one serves, and opening it.

`select_device` resolves `--device` once, at start; `choose_backend` picks the runtime
for each load (a new version's model.yaml may ask for another precision). auto picks by
measurement (bench/RESULTS.md, "runtimes in-process", "backends" and "INT8
quantization"): at the model's own float precision ONNX Runtime, whose CPU streams match
or beat OpenVINO fp32 and whose CUDA provider serves GPUs; OpenVINO (extra `openvino`)
when bf16 is asked, which only it runs on a CPU (1.75-1.9x fp32), or for int8 (asked, or
a quantized file), which it runs 2.4-2.6x today's float server where ONNX Runtime's CPU
kernels run the same file at 0.73x; TensorRT for fp16 on a GPU. So installing a runtime
never changes the answers of a server that was not told to trade precision for speed.
"""

from __future__ import annotations

from vasipc.backends.base import (
    BACKENDS,
    PRECISIONS,
    Backend,
    BackendOptions,
    BackendUnavailable,
)
from vasipc.errors import ModelError
from vasipc.onnx_file import OnnxFileError, read_summary
from vasipc.runtime import Device, resolve_device

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "BackendOptions", "BackendUnavailable",
           "choose_backend", "open_backend", "select_device"]


def select_device(backend: str, device: str) -> Device:
    """The device for `--device` under `--backend` (or model.yaml's backend)."""
    from vasipc.backends.onnxruntime import cuda_available

    if backend not in BACKENDS:
        raise BackendUnavailable(f"invalid backend {backend!r}: expected {', '.join(BACKENDS)}")
    if backend == "openvino":
        from vasipc.backends.openvino import intel_gpu

        if device.startswith("cuda"):
            raise BackendUnavailable(f"--backend openvino serves on cpu or an Intel gpu, not "
                                     f"--device {device}")
        return intel_gpu(device) if device.startswith("gpu") else Device("cpu")
    dev = resolve_device(device, cuda_available())
    if backend == "tensorrt" and dev.kind != "cuda":
        raise BackendUnavailable("--backend tensorrt needs a CUDA GPU (onnxruntime lists no "
                                 "CUDA provider here)")
    return dev


def choose_backend(backend: str, device: Device, precision: str = "auto",
                   preprocess: str = "auto", weights: str | None = None) -> str:
    """The runtime to serve with: `backend` unless it is auto (see the module doc); auto
    takes ONNX Runtime for `--preprocess graph` (an ONNX Runtime graph bound to the run).
    `weights`, when given, is read for quantization: auto precision on a quantized file
    is int8."""
    from vasipc.backends.openvino import openvino_available

    if backend != "auto":
        return backend
    if precision == "auto" and weights is not None and _quantized(weights):
        precision = "int8"
    if device.kind == "cuda":
        return "tensorrt" if precision == "fp16" else "onnxruntime"
    if preprocess == "graph" or precision in ("auto", "fp32"):
        return "onnxruntime"
    if precision in ("bf16", "fp16") and not openvino_available():
        raise BackendUnavailable(f"--precision {precision} on a CPU needs OpenVINO: pip "
                                 "install 'vasipc[openvino]'")
    return "openvino" if openvino_available() else "onnxruntime"


def _quantized(path: str) -> bool:
    try:
        return read_summary(path).quantized
    except (OSError, OnnxFileError):
        return False  # refused when it is opened, with the reason


def open_backend(name: str, path: str, device: Device, options: BackendOptions) -> Backend:
    """Open `path` with the named runtime (not yet prepared for batch sizes)."""
    try:
        summary = read_summary(path)
    except (OSError, OnnxFileError) as exc:
        raise ModelError(f"cannot load {path}: not an ONNX model ({exc})") from None
    if name == "openvino":
        from vasipc.backends.openvino import OpenVinoBackend as cls
    elif name == "tensorrt":
        from vasipc.backends.tensorrt import TensorRtBackend as cls
    elif name == "onnxruntime":
        from vasipc.backends.onnxruntime import OnnxRuntimeBackend as cls
    else:
        raise BackendUnavailable(f"invalid backend {name!r}: expected {', '.join(BACKENDS[1:])}")
    return cls(path, device, summary, options)
