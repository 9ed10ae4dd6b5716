"""INT8 post-training quantization: ONNX Runtime's quantize_static vs NNCF (issue 11).

    python bench/quantize_compare.py [--duration 5] [--repeats 3] [--calibration 20]
                                     [--no-speed] [--no-accuracy]

Quantizers, each keeping the same nodes in float (`vasipc.quantize.float_nodes`: the
head's decode and every Sigmoid, as Ultralytics' OpenVINO int8 export):
- `ort`: `vasipc.quantize.quantize_qdq` as `vasipc quantize` runs it: ONNX Runtime's
  `quantize_static`, QDQ, per-channel int8 weights, uint8 activations, MinMax, Q/DQ on
  the convolutions' inputs only (their outputs excluded);
- `ort all ops`: the same with every op type ONNX Runtime quantizes (its default: conv
  outputs, SiLU's Mul, Concat, MaxPool, Resize, Split ... get Q/DQ too);
- `ort percentile`, `ort entropy`: `ort` with other calibration methods (accuracy only:
  their histograms of the 640 model's activations are slow);
- `nncf`: `nncf.quantize` on the ONNX model (`pip install nncf`; measurement only), preset
  MIXED as Ultralytics' exporter, an IgnoredScope of the same node names.

Speed, on the 640 bench model calibrated on `--calibration` letterboxed 1080p NV12 frames
(bench/runtimes.py's frames): frames/s of the float model and each int8 one in the same
layouts, in the same run, `--repeats` rounds of `--duration` s each (runtimes.py's
helpers): ONNX Runtime as the server opens it today (1 session, 1 intra-op thread per
usable CPU), ONNX Runtime 2 sessions x 1 thread run at once, OpenVINO THROUGHPUT hint with
an AsyncInferQueue of OPTIMAL_NUMBER_OF_INFER_REQUESTS at INFERENCE_PRECISION_HINT f32 and
bf16 (for an int8 model: the precision of its float parts). Ratios to today's layout on
the float model, per round.

Accuracy, on nudenet's 320n (trained): the same photos are calibration and evaluation
frames (skimage's astronaut, chelsea, coffee, rocket, immunohistochemistry, each as is,
mirrored, cropped and shrunk: 20 NV12 frame directories); the float and each int8 model
answer every frame through the server's path (`vasipc.quantize.answers`), agreement as
`vasipc quantize` reports it, at the server's confidence 0.25 and at 0.05 (more
detections). The test zoo (random weights whose detections are not meaningful, but whose
graphs are every Ultralytics head) gets the `ort` and `nncf` rows too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from _common import ZOO, bench_model, machine, nudenet_model
from runtimes import Run, frames_in, ort_session, ov_queue, report, threaded

from vasipc import quantize as vq
from vasipc.backends.onnxruntime import create_session, import_onnxruntime
from vasipc.frames import crop_even, rgb_to_nv12, write_frame_dir
from vasipc.model import ModelSpec, load_model
from vasipc.runtime import Device, usable_cpus

LOW_CONFIDENCE = 0.05  # nudenet finds few things in these photos at 0.25: more pairs to compare
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")

Quantizer = Callable[[str, str, list[dict], list[str]], None]


def nncf_quantize(src: str, dst: str, feeds: list[dict], keep_float: list[str]) -> None:
    import nncf

    q = nncf.quantize(onnx.load(src), nncf.Dataset(feeds), subset_size=len(feeds),
                      preset=nncf.QuantizationPreset.MIXED,
                      ignored_scope=nncf.IgnoredScope(names=keep_float, validate=False))
    onnx.save(q, dst)


def ort_quantizers() -> dict[str, Quantizer]:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "ort": vq.quantize_qdq,
        "ort all ops": lambda s, d, f, k: vq.quantize_qdq(s, d, f, k, op_types_to_quantize=None,
                                                          extra_options={}),
        "ort percentile": lambda s, d, f, k: vq.quantize_qdq(
            s, d, f, k, calibrate_method=CalibrationMethod.Percentile),
        "ort entropy": lambda s, d, f, k: vq.quantize_qdq(
            s, d, f, k, calibrate_method=CalibrationMethod.Entropy),
    }


def build(quantizers: dict[str, Quantizer], src: str, feeds: list[dict], out: str
          ) -> dict[str, str]:
    """Each quantizer's int8 model of `src` (path by name), with the time it took."""
    keep_float = vq.float_nodes(onnx.load(src))
    paths = {}
    for name, quantize in quantizers.items():
        dst = os.path.join(out, f"{Path(src).stem}-{name.replace(' ', '-')}.onnx")
        t0 = time.perf_counter()
        quantize(src, dst, feeds, keep_float)
        qdq = sum(n.op_type == "QuantizeLinear" for n in onnx.load(dst).graph.node)
        print(f"# {Path(src).name} {name}: {time.perf_counter() - t0:.1f} s, {qdq} "
              f"QuantizeLinear nodes, {len(keep_float)} nodes kept float", flush=True)
        paths[name] = dst
    return paths


# --- speed ----------------------------------------------------------------------------------

def speed_layouts(models: dict[str, str], tensors: list[np.ndarray], d: float
                  ) -> dict[str, Callable[[], Run]]:
    import openvino as ov

    ort = import_onnxruntime()
    core = ov.Core()
    n = usable_cpus()
    layouts: dict[str, Callable[[], Run]] = {}
    for name, path in models.items():
        today = create_session(path, Device("cpu"), ort)
        pair = [ort_session(ort, 1, path=path), ort_session(ort, 1, path=path)]
        feed = today.get_inputs()[0].name
        layouts[f"{name}: ort 1x{n}" + (" (today)" if not layouts else "")] = (
            lambda s=today, f=feed: threaded(lambda w, x: s.run(None, {f: x}), tensors, 1, d))
        layouts[f"{name}: ort 2 sessions x 1"] = (
            lambda s=pair, f=feed: threaded(lambda w, x: s[w].run(None, {f: x}), tensors, 2, d))
        for precision in ("f32", "bf16"):
            c = core.compile_model(path, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                 "INFERENCE_PRECISION_HINT": precision})
            nreq = int(c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            layouts[f"{name}: ov THROUGHPUT {precision} x{nreq} req"] = (
                lambda c=c, r=nreq: ov_queue(c, tensors, r, d))
    return layouts


def speed(args: argparse.Namespace, out: str) -> None:
    tensors = frames_in(args.calibration)
    feeds = [{"images": t} for t in tensors]
    quantizers = {k: v for k, v in ort_quantizers().items() if k in ("ort", "ort all ops")}
    quantizers["nncf"] = nncf_quantize
    models = {"float": str(bench_model()), **build(quantizers, str(bench_model()), feeds, out)}
    layouts = speed_layouts(models, tensors[:4], args.duration)
    results: dict[str, list[Run]] = {name: [] for name in layouts}
    for rnd in range(args.repeats):
        for name, measure in layouts.items():
            r = measure()
            results[name].append(r)
            print(f"round {rnd + 1} {name:40s} {r.fps:6.2f} frames/s  p50 {r.p50_ms:7.1f} ms",
                  flush=True)
    report(results)


# --- accuracy -------------------------------------------------------------------------------

def photo_frames(directory: str) -> None:
    """20 NV12 frame directories of the PHOTOS: as is, mirrored, the centre 2/3, halved."""
    from skimage import data

    i = 0
    for name in PHOTOS:
        rgb = getattr(data, name)()[:, :, :3]
        h, w = rgb.shape[:2]
        for variant, img in (("", rgb), ("-mirror", rgb[:, ::-1]),
                             ("-crop", rgb[h // 6: h - h // 6, w // 6: w - w // 6]),
                             ("-half", rgb[::2, ::2])):
            img = crop_even(np.ascontiguousarray(img))
            write_frame_dir(os.path.join(directory, f"{name}{variant}"), rgb_to_nv12(img),
                            width=img.shape[1], height=img.shape[0], pixel_format="NV12",
                            frame_id=i)
            i += 1


def load_cpu(path: str, precision: str, conf: float = 0.25) -> object:
    spec = ModelSpec(path=path, model_id="q", model_name="q", model_version="1",
                     precision=precision, confidence_threshold=conf)
    return load_model(spec, Device("cpu"), 1)


def accuracy_rows(src: str, frames_dir: str, quantizers: dict[str, Quantizer], out: str,
                  conf: float = 0.25) -> list[tuple[str, dict]]:
    reference = load_cpu(src, "fp32", conf)
    frames = vq.load_frames(frames_dir, reference, 100)
    feeds = [{reference.input_name: x[None], **reference.extra_inputs(1)} for x in frames.inputs]
    want = vq.answers(reference, frames)
    rows = []
    for name, path in build(quantizers, src, feeds, out).items():
        rows.append((name, vq.agreement(want, vq.answers(load_cpu(path, "int8", conf), frames))))
    return rows


def accuracy(args: argparse.Namespace, out: str) -> None:
    frames_dir = os.path.join(out, "photos")
    photo_frames(frames_dir)
    quantizers = {**ort_quantizers(), "nncf": nncf_quantize}
    table = [(f"nudenet 320n, {q}" + ("" if conf == 0.25 else f" (confidence {conf})"), r)
             for conf in (0.25, LOW_CONFIDENCE)
             for q, r in accuracy_rows(nudenet_model(), frames_dir, quantizers, out, conf)]
    for path in sorted(ZOO.glob("*.onnx")) if ZOO else []:
        table += [(f"zoo {path.stem}, {q}", r) for q, r in accuracy_rows(
            str(path), frames_dir, {"ort": vq.quantize_qdq, "nncf": nncf_quantize}, out)]
    keys = ("frames", "float_detections", "int8_detections", "matched", "mean_iou",
            "mean_score_drift", "max_score_drift")
    print("\n| model, quantizer | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in table:
        print(f"| {name} | " + " | ".join("-" if r[k] is None else str(r[k]) for k in keys) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per layout per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=20, help="calibration frames (speed)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    import nncf
    import onnxruntime
    import openvino

    print(f"# quantize_compare: {machine()}\n# ONNX Runtime {onnxruntime.__version__}, OpenVINO "
          f"{openvino.__version__}, NNCF {nncf.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vasipc-qbench-") as out:
        if not args.no_accuracy:
            accuracy(args, out)
        if not args.no_speed:
            speed(args, out)


if __name__ == "__main__":
    sys.exit(main())
