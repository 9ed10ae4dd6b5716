"""ONNX Runtime: import, device choice, session creation.

`onnxruntime` (extra `cpu`) and `onnxruntime-gpu` (extra `gpu`) provide the same module and
must never share an environment, so the package requires neither; this module imports
whichever is installed and decides what is usable from `get_available_providers()`, never
from package names.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any


class RuntimeUnavailable(RuntimeError):
    """No usable ONNX Runtime, or the requested device cannot be used (exit code 2)."""


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailable(
            "onnxruntime is not installed: pip install 'vasipc[cpu]' (onnxruntime) or "
            "'vasipc[gpu]' (onnxruntime-gpu), not both") from None
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is not None and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        # onnxruntime-gpu >= 1.21: load CUDA / cuDNN from the nvidia-* wheels when they are
        # installed, so the CUDA provider works without LD_LIBRARY_PATH set by hand.
        with contextlib.suppress(Exception):  # system libraries may still be found as usual
            preload()
    return onnxruntime


@dataclass(frozen=True, slots=True)
class Device:
    """Where the session runs: kind 'cpu' or 'cuda', and the CUDA device index."""

    kind: str
    index: int = 0

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def providers(self) -> list:
        if self.kind == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {
            "device_id": self.index,
            # DEFAULT falls back to slow kernels; EXHAUSTIVE pays once, at warm-up.
            "cudnn_conv_algo_search": "EXHAUSTIVE",
        })
        return [cuda, "CPUExecutionProvider"]


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(text: str) -> tuple[str, int]:
    m = _DEVICE_RE.match(text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"invalid device {text!r}: expected auto, cpu, cuda or cuda:N")
    return m.group(1), int(m.group(2) or 0)


def resolve_device(text: str, ort: Any) -> tuple[Device, str | None]:
    """(device, warning) for `--device`; raises RuntimeUnavailable for cuda without a GPU."""
    kind, index = parse_device(text)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if kind == "cpu":
        return Device("cpu"), None
    if kind == "cuda":
        if not has_cuda:
            raise RuntimeUnavailable(
                f"--device {text}: no usable CUDA GPU (onnxruntime providers: "
                f"{', '.join(ort.get_available_providers())})")
        return Device("cuda", index), None
    if has_cuda:
        return Device("cuda", index), None
    return Device("cpu"), "no usable CUDA GPU: serving on CPU"


def usable_cpus() -> int:
    """CPUs this process may run on (affinity / cpuset), not the machine's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def create_session(path: str, device: Device, ort: Any, intra_op_threads: int = 0) -> Any:
    """intra_op_threads 0: one per usable CPU. ONNX Runtime's own default counts the
    machine's cores and ignores affinity, so a server pinned to 2 of 16 cores would run 16
    threads on 2 (bench/RESULTS.md)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads or usable_cpus()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, sess_options=opts, providers=device.providers())
    if device.kind == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeUnavailable(
            f"CUDA was requested but the session runs on {session.get_providers()[0]}")
    return session
