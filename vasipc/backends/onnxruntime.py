"""The ONNX Runtime backend: CPU and CUDA execution providers.

`onnxruntime` (extra `cpu`) and `onnxruntime-gpu` (extra `gpu`) provide the same module and
must never share an environment, so the package requires neither; `import_onnxruntime`
imports whichever is installed and what is usable is decided from
`get_available_providers()`, never from package names.

Streams on CPU: N runs at once, the usable CPUs split between them (bench/RESULTS.md,
"runtimes in-process": 2 runs of 1 thread beat 1 run of 2 threads by 1.14-1.18x on 2 cores).
Runs of one intra-op thread execute on the calling thread, so they share one session;
runs of several threads get a session each, because concurrent runs of one session share
its one intra-op pool. With several streams, one more session with every thread is the
SOLO layout (a run alone: 30 ms instead of 50 on the 640 model, 2 cores). On CUDA one
session, one stream unless asked: the device is the bottleneck, and the batcher batches.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from vasipc.backends.base import (
    SOLO,
    Backend,
    BackendOptions,
    BackendUnavailable,
    quantized_precision,
    threads_per_stream,
)
from vasipc.errors import ModelError, first_line
from vasipc.heads import TensorFacts
from vasipc.onnx_file import OnnxSummary
from vasipc.runtime import Device, usable_cpus

# Errors after which a CUDA session cannot be trusted again (docs/contract.md 7)
CUDA_STICKY_MARKERS = ("CUDA failure", "cudaError", "CUDNN_STATUS", "CUBLAS_STATUS",
                       "illegal memory access", "device-side assert")
MAX_AUTO_STREAMS = 4  # beyond this, more threads per run instead (larger machines: unmeasured)


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "onnxruntime is not installed: pip install 'vasipc[cpu]' (onnxruntime) or "
            "'vasipc[gpu]' (onnxruntime-gpu), not both") from None
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is not None and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        # onnxruntime-gpu >= 1.21: load CUDA / cuDNN from the nvidia-* wheels when they are
        # installed, so the CUDA provider works without LD_LIBRARY_PATH set by hand.
        with contextlib.suppress(Exception):  # system libraries may still be found as usual
            preload()
    return onnxruntime


def cuda_available() -> bool:
    """Whether an installed onnxruntime lists the CUDA execution provider."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cuda_provider(device: Device) -> tuple[str, dict]:
    return ("CUDAExecutionProvider", {
        "device_id": device.index,
        # DEFAULT falls back to slow kernels; EXHAUSTIVE pays once, at warm-up.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    })


def create_session(path: str, device: Device, ort: Any, threads: int = 0,
                   providers: list | None = None, spinning: bool = True) -> Any:
    """threads 0: one per usable CPU. ONNX Runtime's own default counts the machine's cores
    and ignores affinity, so a server pinned to 2 of 16 cores would run 16 threads on 2
    (bench/RESULTS.md). providers: default the device's (CUDA then CPU, or CPU).
    spinning False: the intra-op pool's threads block between parallel sections instead
    of spinning (slower alone, but they leave the CPU to the runs beside them)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if providers is None:
        providers = ([cuda_provider(device), "CPUExecutionProvider"] if device.kind == "cuda"
                     else ["CPUExecutionProvider"])
    return ort.InferenceSession(path, sess_options=opts, providers=providers)


def auto_streams(device: Device, cpus: int) -> int:
    if device.kind != "cpu":
        return 1
    per_run = -(-cpus // MAX_AUTO_STREAMS)  # ceil: at most MAX_AUTO_STREAMS runs
    return max(1, cpus // per_run)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    _float_precisions = ("fp32",)  # what this runtime runs a float model at

    def __init__(self, path: str, device: Device, summary: OnnxSummary,
                 options: BackendOptions) -> None:
        super().__init__(path, device, summary)
        self.ort = import_onnxruntime()
        self.precision = self._precision(options.precision, summary)
        threads = options.threads or usable_cpus()
        self.streams = options.streams or auto_streams(device, threads)
        self.threads_per_stream = threads_per_stream(threads, self.streams)
        sessions = 1 if device.kind != "cpu" or self.threads_per_stream == 1 else self.streams
        self._sessions = [self._open(self.threads_per_stream) for _ in range(sessions)]
        self.solo = device.kind == "cpu" and self.streams > 1 and threads > self.threads_per_stream
        # the solo session does not spin: its pool would take the CPU from the streams' runs
        # that start beside it (bench/RESULTS.md, "backends")
        self._solo = self._open(threads, spinning=False) if self.solo else None
        first = self._sessions[0]
        self.inputs = _tensors(first.get_inputs())
        self.outputs = _tensors(first.get_outputs())
        self._output_names = [t.name for t in self.outputs]

    def _precision(self, asked: str, summary: OnnxSummary) -> str:
        int8 = quantized_precision(asked, summary.quantized, self.path)
        if int8 is not None:
            return int8
        if asked == "auto":
            return self._float_precisions[0]
        if asked not in self._float_precisions:
            raise BackendUnavailable(
                f"--precision {asked}: the {self.name} backend runs float models at "
                f"{'/'.join(self._float_precisions)} on {self.device.name} (bf16: --backend "
                "openvino on a CPU with BF16; fp16: --backend tensorrt)")
        return asked

    def _providers(self) -> list:
        if self.device.kind == "cuda":
            return [cuda_provider(self.device), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _open(self, threads: int, spinning: bool = True) -> Any:
        try:
            session = create_session(self.path, self.device, self.ort, threads, self._providers(),
                                     spinning)
        except Exception as exc:
            raise ModelError(f"cannot load {self.path}: {first_line(exc)}") from None
        self._check_providers(session)
        return session

    def _check_providers(self, session: Any) -> None:
        wanted = self._providers()[0]
        wanted = wanted if isinstance(wanted, str) else wanted[0]
        if session.get_providers()[0] != wanted:
            raise BackendUnavailable(f"{wanted} was requested but the session runs on "
                                     f"{session.get_providers()[0]}")

    def session(self, stream: int = 0) -> Any:
        """The session stream `stream` (or SOLO) runs on (the device path binds to 0's)."""
        if stream == SOLO:
            return self._solo
        return self._sessions[stream % len(self._sessions)]

    def prepare(self, batch_sizes: tuple[int, ...], width: int, height: int) -> None:
        pass  # the batch dimension is dynamic or fixed by the model: nothing to compile

    def run(self, feeds: dict[str, np.ndarray], size: int, stream: int,
            options: Any = None) -> list[np.ndarray]:
        return self.session(stream).run(self._output_names, feeds, options)

    def quiet_options(self) -> Any:
        quiet = self.ort.RunOptions()
        quiet.log_severity_level = 4
        return quiet

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self._sessions[0].get_providers())

    @property
    def version(self) -> str:
        return self.ort.__version__

    def sticky(self, text: str) -> bool:
        return any(m in text for m in CUDA_STICKY_MARKERS)


def _tensors(items: list) -> tuple[TensorFacts, ...]:
    return tuple(TensorFacts(t.name, tuple(t.shape), t.type) for t in items)
