"""`vasipc check DIR` (or `python -m vasipc.check DIR`): validate a model without serving it.

It loads the model as the server does (`model_yaml` -> `model_spec` -> `load_model`: the
same checks, the same one-line errors, exit code 2), then answers a few requests for a
synthetic NV12 frame through the server's own request path (a `Batcher`: frame open,
letterbox kernel or device graph, session, YOLO decode), and prints what onboarding a
model needs to know: id, version, weights, input size, classes, providers, device, the
warmed batch sizes, load time, one run's time and the detections on the synthetic frame.

DIR is a model directory (model.yaml, or one .onnx file; as `--model-dir`), a `DIR/ID/`
with numeric version subdirectories (as `--models-root DIR --model-id ID`: the highest
version unless --model-version) or an .onnx file (as `--model`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

PROG = "vasipc check"
USAGE = ("vasipc check DIR [--device auto|cpu|cuda[:N]] [--backend B] [--precision P] "
         "[--model-version V] [--labels FILE] [--json]")
RUNS = 5  # timed requests; the time reported is their median
FRAME_WIDTH, FRAME_HEIGHT = 1280, 720
SHOWN_CHARS = 100  # of class names on the text report's line; --json lists them all
ANSWER_TIMEOUT_S = 120.0


class CheckError(Exception):
    """A problem reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from vasipc.backends.base import BACKENDS, PRECISIONS
    from vasipc.cli import Parser, choice, device

    p = Parser(prog=PROG, usage=USAGE,
               description="Load a model as the server would, run it once on a synthetic "
                           "frame and report; nothing is served.")
    p.add_argument("path", metavar="DIR",
                   help="model directory (model.yaml or one .onnx), DIR/ID/ with numeric "
                        "version subdirectories, or an .onnx file")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--model-version", metavar="V", help="version subdirectory (default: highest)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (over model.yaml's)")
    p.add_argument("--backend", type=choice("backend", BACKENDS),
                   help="auto (default) | onnxruntime | openvino | tensorrt, as the server's")
    p.add_argument("--precision", type=choice("precision", PRECISIONS),
                   help="auto (default) | fp32 | fp16 | bf16 | int8, as the server's")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def resolve_source(path: str, version: str | None) -> tuple[Any, str | None]:
    """(ModelSource, the model id the layout gives or None): a version layout DIR/ID/<n>/
    is what `--models-root DIR --model-id ID` serves, so its id is ID; a model directory
    or file gets model.yaml's id or the weights' stem, as `--model-dir` / `--model` do."""
    from vasipc import model_yaml as my

    if os.path.isfile(path):
        if version is not None:
            raise CheckError(f"--model-version needs a directory of versions, {path} is a file")
        return my.from_model_file(path), None
    if version is not None or my.version_dirs(path):
        parent, name = os.path.split(os.path.abspath(path))
        return my.from_models_root(parent, name, version), name
    return my.from_model_dir(path), None


def synthetic_nv12(width: int, height: int) -> np.ndarray:
    """An NV12 frame: a horizontal grey ramp (64..192) with neutral chroma, so that the
    letterbox has something to resample and a detector little to find."""
    frame = np.empty((height * 3 // 2, width), dtype=np.uint8)
    frame[:height] = np.linspace(64, 192, width).astype(np.uint8)
    frame[height:] = 128
    return frame


def run_synthetic(model: Any, runs: int = RUNS) -> tuple[list[dict[str, float]], int]:
    """Answer `runs` requests for a synthetic frame, one at a time, on the server's request
    path; returns each run's stage timings (plus `total_ms`, submit to answer) and the
    detections of the last one."""
    from vasipc.batcher import Batcher, Pending
    from vasipc.errors import VasipcError
    from vasipc.frame_source import FrameOpener, FrameRoots
    from vasipc.frames import write_frame_dir
    from vasipc.schema import NO_CONFIG, FrameMetadata, InferRequest

    def respond(p: Pending, result: dict | VasipcError, stage: dict, _model: Any) -> None:
        p.complete({"result": result, "stage": stage})

    # /dev/shm, where the server's frames live (a tmpfs); elsewhere the temp directory
    tmp = tempfile.mkdtemp(prefix="vasipc-check-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        frame_dir = os.path.join(tmp, "frame")
        write_frame_dir(frame_dir, synthetic_nv12(FRAME_WIDTH, FRAME_HEIGHT), width=FRAME_WIDTH,
                        height=FRAME_HEIGHT, pixel_format="NV12", frame_id=1)
        opener = FrameOpener(FrameRoots([tmp]), max(FRAME_WIDTH, FRAME_HEIGHT))
        batcher = Batcher(model, opener, max_queue=1, batch_timeout_s=0.0, respond=respond,
                          on_fatal=lambda text: None)  # its request fails too: reported below
        request = InferRequest(frame_dir, FrameMetadata(), "vasipc-check", model.spec.model_id,
                               time.time(), NO_CONFIG, None, None)
        timings: list[dict[str, float]] = []
        detections = 0
        batcher.start()
        try:
            for _ in range(runs):
                t0 = time.perf_counter()
                p = Pending({}, request, t0)
                batcher.submit(p)
                if not p.wait(ANSWER_TIMEOUT_S):
                    raise CheckError(f"no answer for the synthetic frame in {ANSWER_TIMEOUT_S:g} s")
                total_ms = (time.perf_counter() - t0) * 1e3
                result, stage = p.response["result"], p.response["stage"]
                if isinstance(result, VasipcError):
                    raise CheckError(f"inference on a synthetic {FRAME_WIDTH}x{FRAME_HEIGHT} NV12 "
                                     f"frame failed: {result.message.splitlines()[0]}")
                timings.append({**stage, "total_ms": total_ms})
                detections = len(result.get("classifications", result["detections"]))
        finally:
            batcher.stop()
            # the workers let go of the model before the process ends: a runtime torn down
            # at interpreter exit under a live thread's model aborts (OpenVINO does)
            batcher.join(ANSWER_TIMEOUT_S)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return timings, detections


def check(path: str, *, device: str = "auto", version: str | None = None,
          labels: str | None = None, model_id: str | None = None, backend: str | None = None,
          precision: str | None = None, runs: int = RUNS) -> dict[str, Any]:
    """Load and run the model at `path` as the server would; the report (see `--json`).
    `model_id` is the id it will be served under (`vasipc register --model-id`; default as
    the server's). Raises CheckError, ModelSourceError, ModelError or RuntimeUnavailable
    (one line each)."""
    from vasipc import model_yaml as my
    from vasipc.backends import select_device
    from vasipc.model import load_model

    source, layout_id = resolve_source(path, version)
    model_id = my.model_id_for(source, model_id or layout_id)
    dev = select_device(backend or source.backend or "auto", device)
    spec = my.model_spec(source, dev, model_id, device_arg=device, labels=labels,
                         backend=backend, precision=precision)
    t0 = time.perf_counter()
    model = load_model(spec, dev, None)  # max batch: the device's default, as the server's
    load_ms = (time.perf_counter() - t0) * 1e3
    timings, detections = run_synthetic(model, runs)

    def median(key: str) -> float:
        return round(statistics.median(t[key] for t in timings), 3)

    return {
        "model_id": model_id, "model_name": spec.model_name, "model_version": spec.model_version,
        "weights": spec.path,
        **model.head.info(),  # architecture, task, nms (+ keypoints)
        "input": {"width": model.input_width, "height": model.input_height},
        "transform": model.family.preprocess.describe(),  # how a frame becomes the input
        "num_classes": model.num_classes, "classes": list(model.class_names),
        "class_names_source": spec.class_names_source,  # null: the model's metadata / class_{id}
        "confidence_threshold": spec.confidence_threshold,
        "nms_iou_threshold": spec.nms_iou_threshold, "max_detections": spec.max_detections,
        "device": dev.name, **model.backend.describe(),
        "preprocess": model.preprocess, "max_batch": model.max_batch,
        "batch_sizes": list(model.batch_sizes),
        "load_ms": round(load_ms, 1), "runs": runs, "run_ms": median("total_ms"),
        "stages_ms": {k: median(f"{k}_ms") for k in ("preprocess", "inference", "postprocess")},
        "synthetic_frame": {"width": FRAME_WIDTH, "height": FRAME_HEIGHT, "format": "NV12"},
        "detections": detections, "ignored_yaml_keys": list(source.ignored_keys),
        "ignored_version_dirs": list(source.ignored_versions),
    }


def describe_transform(t: dict[str, Any]) -> str:
    """`letterbox (pad 114), RGB, /255`, `center crop (antialias), ...`; mean and std when
    they are not 0 and 1."""
    resize = f"letterbox (pad {t['pad_value']})" if t["resize"] == "letterbox" else t["resize"]
    if t.get("filter", "bilinear") != "bilinear":
        resize += f" ({t['filter']})"
    values = "/255" if t["mean"] == [0.0, 0.0, 0.0] and t["std"] == [1.0, 1.0, 1.0] else (
        f"(v/255 - mean {t['mean']}) / std {t['std']}")
    return f"{resize.replace('_', ' ')}, {t['channel_order'].upper()}, {values}"


def format_report(r: dict[str, Any]) -> str:
    names, k, width = r["classes"], 0, 0
    while k < len(names) and (k == 0 or width + len(names[k]) <= SHOWN_CHARS):
        width += len(names[k]) + 2
        k += 1
    shown = ", ".join(names[:k]) + (f", ... (+{len(names) - k} more)" if k < len(names) else "")
    st = r["stages_ms"]
    rows = [
        ("model", f"{r['model_id']} (name {r['model_name']}, version {r['model_version']})"),
        ("weights", r["weights"]),
        ("family", f"{r['architecture']}, task {r['task']}, NMS in the "
                   f"{'server' if r['nms'] == 'server' else 'model'}"),
        ("input", f"{r['input']['width']}x{r['input']['height']}"),
        ("transform", describe_transform(r["transform"])),
        ("classes", f"{r['num_classes']}: {shown}"),
        ("class names", r["class_names_source"] or "the model's ONNX metadata (else class_{id})"),
        ("thresholds", f"confidence {r['confidence_threshold']:g}, NMS IoU "
                       f"{r['nms_iou_threshold']:g}, max detections {r['max_detections']}"),
        ("device", r["device"]),
        ("runtime", f"{r['backend']} {r['runtime_version']}, precision {r['precision']}, "
                    f"{r['streams']} stream(s)"),
        ("providers", ", ".join(r["providers"])),
        ("batch sizes", f"{'/'.join(map(str, r['batch_sizes']))} warmed (max batch "
                        f"{r['max_batch']}), preprocess {r['preprocess']}"),
        ("load", f"{r['load_ms']:.1f} ms (session and warm-up)"),
        ("one run", f"{r['run_ms']:.2f} ms, median of {r['runs']} (preprocess "
                    f"{st['preprocess']:.2f}, inference {st['inference']:.2f}, postprocess "
                    f"{st['postprocess']:.2f} ms)"),
        ("classifications" if r["task"] == "classify" else "detections",
         f"{r['detections']} on a synthetic {r['synthetic_frame']['width']}x"
         f"{r['synthetic_frame']['height']} NV12 frame"),
    ]
    kp = r.get("keypoints")
    if kp is not None:
        rows.insert(4, ("keypoints", f"{kp['count']}: " + (", ".join(kp["names"]) if kp["names"]
                                                            else "unnamed (no kpt_names)")
                        + (f"; skeleton of {len(kp['skeleton'])} edges" if kp["skeleton"] else "")))
    if r["ignored_yaml_keys"]:
        rows.append(("note", "model.yaml keys not used: " + ", ".join(r["ignored_yaml_keys"])))
    if r["ignored_version_dirs"]:
        rows.append(("note", "only numeric directory names are versions; not versions: "
                             + ", ".join(r["ignored_version_dirs"])))
    return "\n".join(f"{k:<12} {v}" for k, v in rows) + "\nok"


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vasipc.cli import run_command

    return run_command(PROG, lambda: check(
        args.path, device=args.device, version=args.model_version, labels=args.labels,
        backend=args.backend, precision=args.precision), format_report, args.json, (CheckError,))


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
