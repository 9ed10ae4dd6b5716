"""Where inference runs: the `--device` choice and the CPUs this process may use."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


class RuntimeUnavailable(RuntimeError):
    """The requested runtime or device cannot be used here (exit code 2)."""


@dataclass(frozen=True, slots=True)
class Device:
    """Where the model runs: kind 'cpu', 'cuda' (NVIDIA, through ONNX Runtime) or 'gpu'
    (Intel, through OpenVINO), and the device index."""

    kind: str
    index: int = 0

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|gpu)(?::(\d+))?$")


def parse_device(text: str) -> tuple[str, int]:
    m = _DEVICE_RE.match(text)
    if not m or (m.group(2) is not None and m.group(1) not in ("cuda", "gpu")):
        raise ValueError(f"invalid device {text!r}: expected auto, cpu, cuda[:N] or gpu[:N] "
                         "(an Intel GPU, with --backend openvino)")
    return m.group(1), int(m.group(2) or 0)


def resolve_device(text: str, has_cuda: bool) -> Device:
    """The device for `--device`; raises RuntimeUnavailable for cuda without a GPU. auto
    without a CUDA provider is the CPU, silently: a CPU-only install is not a mistake to
    warn about at every start (the startup line says the device)."""
    kind, index = parse_device(text)
    if kind == "gpu":
        raise RuntimeUnavailable(f"--device {text} is an Intel GPU: it needs --backend openvino")
    if kind == "cpu":
        return Device("cpu")
    if kind == "cuda":
        if not has_cuda:
            raise RuntimeUnavailable(
                f"--device {text}: no usable CUDA GPU (onnxruntime lists no CUDA provider)")
        return Device("cuda", index)
    return Device("cuda", index) if has_cuda else Device("cpu")


def usable_cpus() -> int:
    """CPUs this process may run on (affinity / cpuset), not the machine's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
