"""The backend seam: what the server needs of an inference runtime.

A backend opens one ONNX file for a device, says what the model's tensors are, compiles it
for the padded batch sizes the batcher runs (`prepare`) and then runs batches on any of
its `streams` at once: `run(feeds, size, stream)` with host numpy inputs, returning host
outputs the caller owns. On a CPU the streams split the threads between them, which pays
under load and doubles the time of a run alone; so a backend with several streams also
has a SOLO layout, one run with every thread, that the batcher uses when nothing else is
running or waiting (bench/RESULTS.md, "backends": concurrency 1 at the latency of one
full-width run, concurrency 4 at the streams' throughput). One module per runtime
(`onnxruntime`, `openvino`, `tensorrt`); the batcher and the heads know none of them.
Every problem a machine or a model causes at open or prepare is a `BackendUnavailable`
(the runtime, device or precision cannot serve here) or a `ModelError` (the runtime
refuses this file): one line, exit code 2.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vasipc.runtime import Device, RuntimeUnavailable

if TYPE_CHECKING:  # kept light: the command line imports BACKENDS and PRECISIONS
    import numpy as np

    from vasipc.heads import TensorFacts
    from vasipc.onnx_file import OnnxSummary

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
SOLO = -1  # the stream index of the solo layout: one run with every thread (Backend.solo)
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


class BackendUnavailable(RuntimeUnavailable):
    """The backend, device or precision asked for cannot run on this machine (exit code 2)."""


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """How to run: the command line's and model.yaml's choices, resolved by the backend."""

    precision: str = "auto"
    streams: int = 0   # 0: as many concurrent runs as pay on the device
    threads: int = 0   # inference threads in all; 0: one per usable CPU
    cache_dir: str | None = None  # compiled engines (TensorRT); None: the backend's default


class Backend(ABC):
    """One model opened by one runtime; `run` is safe from `streams` threads at once, each
    on its own stream index."""

    name: str                 # "onnxruntime", "openvino", "tensorrt"
    device: Device
    precision: str            # resolved: "fp32", "fp16", "bf16" or "int8"
    streams: int              # runs that may be in flight at once
    solo: bool = False        # has a SOLO layout: a run alone on the device gets every thread
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    metadata: dict[str, str]  # the ONNX file's metadata_props

    def __init__(self, path: str, device: Device, summary: OnnxSummary) -> None:
        self.path = path
        self.device = device
        self.metadata = summary.metadata

    @abstractmethod
    def prepare(self, batch_sizes: tuple[int, ...], width: int, height: int) -> None:
        """Make ready to run the image input at [size, 3, height, width] for each size."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray], size: int, stream: int,
            options: Any = None) -> list[np.ndarray]:
        """Every output for these inputs (batch `size`), in `outputs` order, as host
        arrays the caller may keep. `stream`: 0..streams-1, or SOLO where `solo` is set.
        `options`: runtime-specific (quiet warm-up runs)."""

    @abstractmethod
    def quiet_options(self) -> Any:
        """Run options that keep a failing warm-up run out of the runtime's own log."""

    @property
    @abstractmethod
    def providers(self) -> tuple[str, ...]:
        """What executes the model, as the runtime names it."""

    @property
    @abstractmethod
    def version(self) -> str:
        """The runtime's version."""

    def sticky(self, text: str) -> bool:
        """Whether an error with this text leaves the runtime unusable (the server stops
        being ready and exits 1, docs/contract.md 7)."""
        return False

    def describe(self) -> dict[str, Any]:
        """For `info`, `vasipc check` and the metrics' model info."""
        return {"backend": self.name, "runtime_version": self.version, "device": self.device.name,
                "precision": self.precision, "streams": self.streams, "providers": list(self.providers)}


def quantized_precision(asked: str, quantized: bool, path: str) -> str | None:
    """"int8" for a quantized (QDQ) file, None for a float one, whose precision the
    backend decides; BackendUnavailable when `asked` does not fit the file."""
    if quantized:
        if asked not in ("auto", "int8"):
            raise BackendUnavailable(f"{path} is quantized (int8): --precision {asked} "
                                     "needs its float model")
        return "int8"
    if asked == "int8":
        raise BackendUnavailable(f"{path} is not quantized: make an int8 version with "
                                 "`vasipc quantize`, or serve it at another precision")
    return None


def threads_per_stream(threads: int, streams: int) -> int:
    return max(1, threads // max(1, streams))
