"""The OpenVINO backend (extra `openvino`): the ONNX file compiled for the CPU, or for an
Intel GPU (`--device gpu[:N]`, OpenVINO's `GPU.N`) where OpenVINO lists one.

The model is read once and compiled per padded batch size, each with the image input
reshaped to its static [size, 3, H, W] (OpenVINO's CPU plugin runs static shapes fastest)
and the THROUGHPUT hint: the plugin splits the usable CPUs into streams, and the backend
keeps one infer request per stream, `OPTIMAL_NUMBER_OF_INFER_REQUESTS` of them unless
`--streams` says how many (bench/RESULTS.md, "runtimes in-process"). With several
streams each size is compiled once more with the LATENCY hint, one stream with every
thread: the SOLO layout for a run alone. A synchronous `infer` on a request releases the
GIL, so the batcher's workers run them concurrently.

Precision: `INFERENCE_PRECISION_HINT`. auto is the model's own: fp32 for a float file
(within 1e-4 of ONNX Runtime), int8 for a quantized (QDQ) one, its float parts at fp32.
bf16 (1.75-1.9x fp32 on the AVX-512 BF16 EPYC, same detections: bench/RESULTS.md) and
fp16 need a CPU that lists them among its optimization capabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vasipc.backends.base import Backend, BackendOptions, BackendUnavailable, quantized_precision
from vasipc.errors import ModelError, first_line
from vasipc.heads import TensorFacts
from vasipc.onnx_file import OnnxSummary
from vasipc.runtime import Device, usable_cpus

_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
# OpenVINO element type names -> the ONNX type strings the heads read
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)",
          "i32": "tensor(int32)", "u8": "tensor(uint8)", "boolean": "tensor(bool)"}


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("--backend openvino: openvino is not installed "
                                 "(pip install 'vasipc[openvino]')") from None
    return openvino


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


_core: Any = None


def core() -> Any:
    """The process's one openvino.Core (it caches plugins and devices)."""
    global _core
    if _core is None:
        _core = import_openvino().Core()
    return _core


def intel_gpu(text: str) -> Device:
    """`--device gpu[:N]`: Intel GPU N, which OpenVINO must list (else exit 2)."""
    from vasipc.runtime import parse_device

    _, index = parse_device(text)
    devices = list(core().available_devices)
    if f"GPU.{index}" not in devices and not (index == 0 and "GPU" in devices):
        raise BackendUnavailable(f"--device {text}: OpenVINO lists no Intel GPU {index} "
                                 f"(devices: {', '.join(devices)})")
    return Device("gpu", index)


def _facts(ports: list) -> tuple[TensorFacts, ...]:
    out = []
    for port in ports:
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        kind = port.get_element_type().get_type_name()
        out.append(TensorFacts(port.any_name, shape, _TYPES.get(kind, f"tensor({kind})")))
    return tuple(out)


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, path: str, device: Device, summary: OnnxSummary,
                 options: BackendOptions) -> None:
        if device.kind not in ("cpu", "gpu"):
            raise BackendUnavailable(f"--backend openvino serves on cpu or an Intel gpu, not "
                                     f"{device.name}")
        super().__init__(path, device, summary)
        self.ov_device = "CPU" if device.kind == "cpu" else f"GPU.{device.index}"
        self.core = core()
        self.options = options
        self.precision = self._precision(options.precision, summary)
        try:
            self.model = self.core.read_model(path)
        except Exception as exc:
            raise ModelError(f"cannot load {path}: {first_line(exc)}") from None
        self.inputs = _facts(self.model.inputs)
        self.outputs = _facts(self.model.outputs)
        self.streams = options.streams  # 0 until prepare() asks the plugin
        self._requests: dict[int, list[Any]] = {}  # size -> one per stream (+ SOLO's)

    def _capabilities(self) -> list[str]:
        return list(self.core.get_property(self.ov_device, "OPTIMIZATION_CAPABILITIES"))

    def _precision(self, asked: str, summary: OnnxSummary) -> str:
        int8 = quantized_precision(asked, summary.quantized, self.path)
        if int8 is not None:
            return int8
        if asked == "auto":
            return "fp32"
        caps = self._capabilities()
        if asked in _CAPABILITY and _CAPABILITY[asked] not in caps:
            raise BackendUnavailable(f"--precision {asked}: this {self.ov_device} does not run "
                                     f"{asked} (OpenVINO lists {', '.join(caps)})")
        return asked

    def _config(self, hint: str = "THROUGHPUT") -> dict[str, Any]:
        config = {"PERFORMANCE_HINT": hint,
                  "INFERENCE_NUM_THREADS": self.options.threads or usable_cpus(),
                  "INFERENCE_PRECISION_HINT": _HINTS.get(self.precision, "f32")}
        if self.streams and hint == "THROUGHPUT":
            config["NUM_STREAMS"] = self.streams
        return config

    def _compile(self, model: Any, size: int, hint: str) -> Any:
        try:
            return self.core.compile_model(model, self.ov_device, self._config(hint))
        except Exception as exc:
            raise ModelError(f"{self.path}: OpenVINO cannot compile it for batch {size}: "
                             f"{first_line(exc)}") from None

    def prepare(self, batch_sizes: tuple[int, ...], width: int, height: int) -> None:
        image = next(t.name for t in self.inputs if len(t.shape) == 4)
        for size in batch_sizes:
            model = self.model.clone()
            shapes = {}
            for port in model.inputs:
                dims = list(port.get_partial_shape())
                if port.any_name == image:
                    dims = [size, 3, height, width]
                elif dims:
                    dims[0] = size
                shapes[port.any_name] = dims
            try:
                model.reshape(shapes)
            except Exception as exc:
                raise ModelError(f"{self.path}: OpenVINO cannot reshape it to batch {size}: "
                                 f"{first_line(exc)}") from None
            compiled = self._compile(model, size, "THROUGHPUT")
            if not self.streams:
                self.streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self.solo = self.streams > 1
            requests = [compiled.create_infer_request() for _ in range(self.streams)]
            if self.solo:
                requests.append(self._compile(model, size, "LATENCY").create_infer_request())
            self._requests[size] = requests  # the SOLO request last: index -1

    def run(self, feeds: dict[str, np.ndarray], size: int, stream: int,
            options: Any = None) -> list[np.ndarray]:
        request = self._requests[size][stream]
        # share_inputs: the batcher's buffer is read in place; outputs are copied, because
        # the request's own tensors are overwritten by its next run
        return list(request.infer(feeds, share_inputs=True, share_outputs=False).to_tuple())

    def quiet_options(self) -> Any:
        return None

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"OpenVINO:{self.ov_device}",)

    @property
    def version(self) -> str:
        return import_openvino().__version__.split("-")[0]
