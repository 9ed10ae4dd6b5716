"""`vasipc quantize MODEL_DIR --calibration FRAMES_DIR`: INT8 post-training quantization.

MODEL_DIR is ROOT/ID with numeric version subdirectories (what `--models-root ROOT
--model-id ID` serves); the source is its highest version (or `--model-version`), loaded
exactly as the server loads it. FRAMES_DIR holds calibration frames: frame-export
directories as a pipeline writes them (docs/contract.md 5.1, found at any depth), raw
frame files with their `frame_metadata` in a `FILE.json` beside them (5.2) and images
(.png/.jpg/.jpeg/.bmp, encoded as NV12 like a pipeline's frames). Each frame goes through
the family's own `Preprocess.into`, as the server's batcher does, so calibration sees
what serving sees.

The quantizer is ONNX Runtime's `quantize_static` (bench/RESULTS.md "Issue 11: INT8
quantization" says why): QDQ format, MinMax calibration, Q/DQ on the convolutions' inputs
(uint8 activations) and weights (int8, per channel), not on their outputs. The head's own
operations (the DFL, box and score decode: every node directly in the last `/model.N/`
module or its `dfl`) and every Sigmoid stay in float, as Ultralytics' OpenVINO int8 export
keeps them; the head's convolution branches are quantized. The result is a plain ONNX file
that both backends serve; OpenVINO runs its convolutions in int8.

The float and the int8 model then answer every calibration frame through the server's
load, preprocess, run and decode path on CPU, and the agreement (detections matched by
class and IoU >= 0.5, greedily by score; their mean IoU and score drift) is written with
the model as the next version directory (`vasipc.versions.install_version`), whose
model.yaml says `precision: int8` and its `source`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from vasipc.errors import first_line
from vasipc.frames import FRAME_META, NV12, crop_even, rgb_to_nv12

PROG = "vasipc quantize"
USAGE = ("vasipc quantize MODEL_DIR --calibration FRAMES_DIR [--model-version V] "
         "[--max-frames N] [--json]")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
RAW_METADATA_SUFFIX = ".json"  # FILE.json beside a raw frame FILE: its frame_metadata
DEFAULT_MAX_FRAMES = 100
MAX_FRAME_DIM = 8192  # the server's --max-frame-dim default
MATCH_IOU = 0.5
CALIBRATION_CHUNK = 8  # frames whose activations ONNX Runtime keeps before merging their ranges
WEIGHTS_NAME = "model.onnx"
# model.yaml keys the new version writes itself; the source's others are carried over
_REWRITTEN = frozenset({"model_version", "model_weights", "weights_sha256", "precision", "source",
                        "quantization_report"})
_MODULE = re.compile(r"^(.*?/model\.(\d+))/")  # (the module, N): /model.22/..., /model/model.23/...


class QuantizeError(Exception):
    """A problem reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from vasipc.cli import Parser

    p = Parser(prog=PROG, usage=USAGE,
               description="Quantize the model's highest version to INT8 on calibration "
                           "frames and install it as the next version.")
    p.add_argument("path", metavar="MODEL_DIR", help="ROOT/ID with numeric version subdirectories")
    p.add_argument("--calibration", metavar="FRAMES_DIR", required=True,
                   help="frame-export directories, raw frames with FILE.json metadata, images")
    p.add_argument("--model-version", metavar="V", help="the source version (default: highest)")
    p.add_argument("--max-frames", metavar="N", type=_positive_int, default=DEFAULT_MAX_FRAMES,
                   help=f"calibration frames used at most, in name order (default {DEFAULT_MAX_FRAMES})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


# --- the graph ------------------------------------------------------------------------------

def float_nodes(model: Any) -> list[str]:
    """The names of the nodes that stay in float (an onnx.ModelProto): every node directly
    in the last `/model.N/` module (the head's decode: DFL softmax, anchors, box
    arithmetic, score concat, an end-to-end head's top-k) or in its `dfl`, every node
    outside the `/model.N/` modules (an `nms=True` export's NMS around `/model/model.N/`),
    and every Sigmoid. The head's convolution branches (`/model.N/cv2.0/...`) are
    quantized. QuantizeError for a graph without Ultralytics' module names."""
    modules = {n.name: m for n in model.graph.node if (m := _MODULE.match(n.name))}
    if not modules:
        raise QuantizeError("the graph has no /model.N/ node names (an Ultralytics export), so "
                            "its detection head cannot be kept in float")
    last = max(modules.values(), key=lambda m: int(m.group(2))).group(1) + "/"
    keep = []
    for node in model.graph.node:
        inner = node.name[len(last):] if node.name.startswith(last) else None
        if (node.op_type == "Sigmoid" or node.name not in modules
                or (inner is not None and ("/" not in inner or inner.startswith("dfl/")))):
            keep.append(node.name)
    return keep


def is_quantized(model: Any) -> bool:
    from vasipc.onnx_file import QUANTIZED_OPS

    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def quantize_qdq(src: str, dst: str, feeds: Sequence[dict[str, np.ndarray]],
                 keep_float: Sequence[str], **options: Any) -> None:
    """ONNX Runtime's static QDQ quantization of `src` into `dst`, calibrated on `feeds`
    (one input mapping per run), the nodes named in `keep_float` left in float; `options`
    override quantize_static's arguments (bench/quantize_compare.py tries others)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    kwargs = {"quant_format": QuantFormat.QDQ, "per_channel": True,
              "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8,
              "calibrate_method": CalibrationMethod.MinMax, "nodes_to_exclude": list(keep_float),
              # Q/DQ pairs on the convolutions' inputs (and their weights) only: OpenVINO then
              # fuses each conv with its SiLU and the next conv's quantization into one int8
              # op; quantized conv outputs or SiLUs leave a standalone eltwise and layout
              # reorders after every conv, and cost int8 precision where it buys nothing.
              "op_types_to_quantize": ["Conv"],
              "extra_options": {"OpTypesToExcludeOutputQuantization": ["Conv"],
                                # ranges merged every few frames: memory stays bounded
                                "CalibMaxIntermediateOutputs": CALIBRATION_CHUNK},
              **options}
    quiet = logging.getLogger()  # its "consider pre-processing" advice goes to the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(src, dst, Reader(), **kwargs)
    finally:
        quiet.setLevel(level)


# --- calibration frames ---------------------------------------------------------------------

class _Pixels(NamedTuple):
    """An image's pixels as `Preprocess.into` reads an open frame."""

    view: np.ndarray
    pixel_format: int
    width: int
    height: int
    stride: int

    def close(self) -> None:
        pass


@dataclass
class Frames:
    """Calibration frames, preprocessed for one model: input slots and their geometry."""

    names: list[str] = field(default_factory=list)
    inputs: list[np.ndarray] = field(default_factory=list)  # [3, H, W] float32 each
    geometries: list[Any] = field(default_factory=list)  # preprocess.Geometry
    skipped: list[str] = field(default_factory=list)  # "name: why"


def _candidates(frames_dir: str) -> list[tuple[str, str]]:
    """(kind, path) sorted by path: "dir" (a frame-export directory, not descended into),
    "raw" (a file with FILE.json beside it), "image"."""
    found = []
    for top, dirs, files in os.walk(frames_dir):
        if FRAME_META in files:
            dirs.clear()
            found.append(("dir", top))
            continue
        for name in files:
            path = os.path.join(top, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(("image", path))
            elif not name.endswith(RAW_METADATA_SUFFIX) and os.path.isfile(path + RAW_METADATA_SUFFIX):
                found.append(("raw", path))
    return sorted(found, key=lambda c: c[1].split(os.sep))


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (height, width, 3) of an image file, with Pillow if importable, else OpenCV."""
    try:
        from PIL import Image
    except ImportError:
        import cv2

        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError("OpenCV cannot decode it") from None
        return np.ascontiguousarray(bgr[:, :, ::-1])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _image_frame(path: str) -> _Pixels:
    rgb = crop_even(read_image(path))
    height, width = rgb.shape[:2]
    if not width or not height:
        raise ValueError("smaller than 2x2 pixels")
    return _Pixels(rgb_to_nv12(rgb), NV12, width, height, width)


def _raw_metadata(path: str) -> Any:
    from vasipc.schema import _parse_frame_metadata  # a request's frame_metadata, same checks

    with open(path + RAW_METADATA_SUFFIX, encoding="utf-8") as f:
        return _parse_frame_metadata(json.load(f))


def load_frames(frames_dir: str, model: Any, max_frames: int) -> Frames:
    """Up to `max_frames` usable frames of `frames_dir`, each preprocessed by the family's
    `Preprocess.into` into a [3, H, W] slot of `model` (a LoadedModel); unusable ones are
    listed in `skipped`."""
    from vasipc._fast.letterbox import FrameBusError  # the file truncated while read
    from vasipc.errors import VasipcError
    from vasipc.frame_source import FrameOpener, FrameRoots
    from vasipc.schema import FrameMetadata

    if not os.path.isdir(frames_dir):
        raise QuantizeError(f"calibration directory {frames_dir} does not exist")
    root = os.path.realpath(frames_dir)
    opener = FrameOpener(FrameRoots([root]), MAX_FRAME_DIM)
    out = Frames()
    for kind, path in _candidates(root):
        if len(out.inputs) >= max_frames:
            break
        name = os.path.relpath(path, root)
        try:
            if kind == "image":
                frame = _image_frame(path)
            else:
                frame = opener.open(path, FrameMetadata() if kind == "dir" else _raw_metadata(path))
            try:
                slot = np.empty((3, model.input_height, model.input_width), np.float32)
                geometry = model.family.preprocess.into(frame, slot)
            finally:
                frame.close()
        except (VasipcError, OSError, ValueError, FrameBusError) as exc:  # JSON: a ValueError
            out.skipped.append(f"{name}: {first_line(exc)}")
            continue
        out.names.append(name)
        out.inputs.append(slot)
        out.geometries.append(geometry)
    return out


# --- agreement ------------------------------------------------------------------------------

def answers(model: Any, frames: Frames) -> list[list[dict]]:
    """Each frame's detections (a classifier's classifications), as the server decodes
    them with the model's own thresholds."""
    from vasipc.schema import NO_CONFIG

    buffer = model.new_buffer()
    result = []
    for x, geometry in zip(frames.inputs, frames.geometries, strict=True):
        buffer[0] = x
        out = model.run_batch(buffer, 1)
        decoded = model.head.decode(out, 0, geometry, NO_CONFIG, model.spec)
        result.append(decoded.get("classifications") or decoded["detections"])
    return result


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(reference: list[dict], candidate: list[dict]) -> list[tuple[dict, dict, float | None]]:
    """Greedy by the reference's confidence: each reference detection takes the unmatched
    candidate of its class with the highest IoU >= MATCH_IOU (IoU None for classifications,
    matched by class alone)."""
    free = list(candidate)
    pairs = []
    for ref in sorted(reference, key=lambda d: -d["confidence"]):
        best, best_iou = None, None
        for cand in free:
            if cand["class_id"] != ref["class_id"]:
                continue
            if "bbox" not in ref:
                best, best_iou = cand, None
                break
            iou = _iou(ref["bbox"], cand["bbox"])
            if iou >= MATCH_IOU and (best_iou is None or iou > best_iou):
                best, best_iou = cand, iou
        if best is not None:
            free.remove(best)
            pairs.append((ref, best, best_iou))
    return pairs


def agreement(reference: list[list[dict]], candidate: list[list[dict]]) -> dict[str, Any]:
    """The report of model.yaml's `quantization_report` over frames answered by both."""
    pairs = [p for r, c in zip(reference, candidate, strict=True) for p in match(r, c)]
    ious = [iou for _, _, iou in pairs if iou is not None]
    drift = [abs(c["confidence"] - r["confidence"]) for r, c, _ in pairs]
    return {
        "frames": len(reference),
        "float_detections": sum(map(len, reference)),
        "int8_detections": sum(map(len, candidate)),
        "matched": len(pairs),
        "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
        "max_score_drift": round(max(drift), 4) if drift else None,
        "mean_score_drift": round(float(np.mean(drift)), 4) if drift else None,
    }


# --- the command ----------------------------------------------------------------------------

def _load_cpu(source: Any, model_id: str, precision: str) -> Any:
    """The model as the server loads it, on CPU with ONNX Runtime (one run at a time)."""
    from vasipc import model_yaml as my
    from vasipc.model import load_model
    from vasipc.runtime import Device

    cpu = Device("cpu")
    spec = my.model_spec(source, cpu, model_id, device_arg="cpu", backend="onnxruntime",
                         precision=precision)
    return load_model(spec, cpu, 1)


def quantize(path: str, calibration: str, *, version: str | None = None,
             max_frames: int = DEFAULT_MAX_FRAMES) -> dict[str, Any]:
    """Quantize the source version of `path` on the frames of `calibration` and install the
    result as the next version; what was done (see `--json`). Raises QuantizeError,
    ModelSourceError, ModelError or RuntimeUnavailable (one line each)."""
    import onnx
    import onnxruntime

    from vasipc import model_yaml as my
    from vasipc.check import resolve_source
    from vasipc.versions import install_version

    if not os.path.isdir(path) or not my.version_dirs(path):
        raise QuantizeError(f"{path} is not a directory of numeric versions (ROOT/ID/<n>/, as "
                            "--models-root ROOT --model-id ID serves)")
    source, layout_id = resolve_source(path, version)
    version_dir = os.path.join(os.path.abspath(path), version or my.version_dirs(path)[-1])
    if source.precision == "int8":
        raise QuantizeError(f"version {source.model_version} ({version_dir}) is already "
                            "quantized (model.yaml precision: int8)")
    try:
        graph = onnx.load(source.weights)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise QuantizeError(f"cannot read {source.weights} as ONNX: {first_line(exc)}") from None
    if is_quantized(graph):
        raise QuantizeError(f"{source.weights} is already quantized (it has QuantizeLinear / "
                            "DequantizeLinear nodes)")
    keep_float = float_nodes(graph)
    model_id = my.model_id_for(source, layout_id)
    reference_model = _load_cpu(source, model_id, "fp32")
    frames = load_frames(calibration, reference_model, max_frames)
    if not frames.inputs:
        why = f" ({len(frames.skipped)} unusable: {frames.skipped[0]})" if frames.skipped else ""
        raise QuantizeError(f"no usable calibration frames in {calibration}{why}")

    feeds = [{reference_model.input_name: x[None], **reference_model.extra_inputs(1)}
             for x in frames.inputs]
    work = tempfile.mkdtemp(prefix="vasipc-quantize-")
    try:
        int8_path = os.path.join(work, WEIGHTS_NAME)
        # quantize_static writes a shape-inferred copy beside its input: a copy here keeps
        # the source version untouched (a --watch server would reload it; it may be read-only)
        float_path = os.path.join(work, "float.onnx")
        shutil.copyfile(source.weights, float_path)
        t0 = time.perf_counter()
        quantize_qdq(float_path, int8_path, feeds, keep_float)
        quantize_s = time.perf_counter() - t0
        int8_model = _load_cpu(dataclasses.replace(source, weights=int8_path), model_id, "int8")
        report = agreement(answers(reference_model, frames), answers(int8_model, frames))
        doc, files = _new_version(version_dir, source, model_id, int8_path, report)
        new_dir = install_version(os.path.abspath(path), files, doc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model_id": model_id, "model_version": os.path.basename(new_dir), "directory": new_dir,
        "source": doc["source"],
        "weights": os.path.join(new_dir, WEIGHTS_NAME), "precision": "int8",
        "quantizer": f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ on the "
                     "convolutions' inputs: uint8 activations, MinMax; int8 per-channel weights)",
        "float_nodes": len(keep_float), "quantize_s": round(quantize_s, 1),
        "calibration": {"frames": frames.names, "skipped": frames.skipped},
        "quantization_report": report,
    }


def _new_version(version_dir: str, source: Any, model_id: str, weights: str,
                 report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The new version's model.yaml mapping (the source's keys carried over, those that
    describe the weights written anew) and its files: the int8 weights and the class names
    file, if the source has one."""
    from vasipc.model_yaml import sha256_file, written_doc

    doc = {k: v for k, v in written_doc(version_dir).items() if k not in _REWRITTEN}
    doc.setdefault("model_id", model_id)  # without model.yaml the source was named by its
    doc.setdefault("model_name", source.model_name)  # weights' stem, now WEIGHTS_NAME
    files = {WEIGHTS_NAME: weights}
    doc["model_weights"] = WEIGHTS_NAME
    doc["weights_sha256"] = sha256_file(weights)
    if source.class_names_file is not None:
        name = os.path.basename(source.class_names_file)
        files[name] = source.class_names_file
        doc["output_schema"] = {**(doc.get("output_schema") or {}), "class_names_file": name}
    doc["precision"] = "int8"
    doc["source"] = {"version": os.path.basename(version_dir), "path": version_dir,
                     "weights_sha256": sha256_file(source.weights)}
    doc["quantization_report"] = report
    return doc, files


def format_result(r: dict[str, Any]) -> str:
    rep = r["quantization_report"]
    cal = r["calibration"]
    rows = [
        ("model", r["model_id"]),
        ("source", f"version {r['source']['version']} ({r['source']['path']}), sha256 "
                   f"{r['source']['weights_sha256'][:16]}..."),
        ("quantizer", r["quantizer"]),
        ("float", f"{r['float_nodes']} nodes (the head's decode, every Sigmoid)"),
        ("calibration", f"{rep['frames']} frames" + (f", {len(cal['skipped'])} skipped"
                                                     if cal["skipped"] else "")),
        ("agreement", f"{rep['matched']} of {rep['float_detections']} float detections matched "
                      f"({rep['int8_detections']} int8), mean IoU {_num(rep['mean_iou'])}, "
                      f"score drift mean {_num(rep['mean_score_drift'])} max "
                      f"{_num(rep['max_score_drift'])}"),
        ("written", f"version {r['model_version']}: {r['directory']}"),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows) + "\nok"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vasipc.cli import run_command

    return run_command(PROG, lambda: quantize(
        args.path, args.calibration, version=args.model_version, max_frames=args.max_frames),
        format_result, args.json, (QuantizeError,))


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
