"""YOLOv8 decode + per-class NMS: our `decode_yolo` vs numpy + cv2.dnn.NMSBoxesBatched.

    python -m pytest bench/test_decode.py --benchmark-only

One group per input, so each comparison prints side by side:
- `vasipc`: `decode_yolo` (one nogil C call: best class, threshold, sort, NMS, top-k,
  letterbox undone);
- `opencv`: the same rules as a Python server would write them: numpy best class and
  threshold scan, score sort, xywh -> x, y, w, h rects, `cv2.dnn.NMSBoxesBatched` (per-class
  NMS), top-k, unletterbox + clip in numpy.

Inputs: (a) real outputs: nudenet's `320n.onnx` on the astronaut letterboxed to 320
(conf 0.25), and the benchmark model (`yolov8n-640-random.onnx`, random weights) on the
same photo at 640 with a threshold low enough for its tiny scores (2e-5: about a
thousand candidates, 120x120 boxes on the anchor grid); (b) a stress case,
8400 anchors x 80 classes, tight clusters of heavily overlapping boxes (conf 0.05). Each
test first asserts that both give the same detections.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _common import BENCH_MODEL, nudenet_model
from reference_kernels import opencv_decode, stress_prediction

from vasipc._fast.letterbox import RGB24, letterbox_geometry, letterbox_into
from vasipc._fast.yolo import decode_yolo

IOU = 0.45
MAX_DET = 300


def _model_output(model: str, size: int):
    ort = pytest.importorskip("onnxruntime")
    skimage_data = pytest.importorskip("skimage.data")
    rgb = np.ascontiguousarray(skimage_data.astronaut())
    h, w = rgb.shape[:2]
    r, nw, nh, left, top = letterbox_geometry(w, h, size, size)
    x = np.empty((1, 3, size, size), np.float32)
    letterbox_into(rgb, RGB24, w, h, 3 * w, x[0], nw, nh, left, top)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return np.ascontiguousarray(out[0]), (r, left, top, w, h)


CASES = ["nudenet-320", "yolov8n-random-640", "stress-8400x80"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """(name, pred, conf, geometry (scale, pad_left, pad_top, src_w, src_h))."""
    if request.param == "nudenet-320":
        pred, geom = _model_output(nudenet_model(), 320)
        conf = 0.25
    elif request.param == "yolov8n-random-640":
        if not os.path.exists(BENCH_MODEL):
            pytest.skip(f"no benchmark model at {BENCH_MODEL}")
        pred, geom = _model_output(str(BENCH_MODEL), 640)
        conf = 2e-5  # random weights: every class score is below 2e-4
    else:
        pred, geom = stress_prediction(), (0.5, 0.0, 140.0, 1280, 720)
        conf = 0.05
    return request.param, pred, conf, geom


def _run(benchmark, case, fn):
    name, pred, conf, geom = case
    candidates = int((pred[4:].max(axis=0) >= np.float32(conf)).sum())
    benchmark.group = f"decode {name} [{pred.shape[0] - 4} classes x {pred.shape[1]} anchors, " \
                      f"{candidates} candidates]"
    expected = opencv_decode(pred, conf, IOU, MAX_DET, None, *geom)
    got = benchmark(fn, pred, conf, IOU, MAX_DET, None, *geom)
    # the same detections: classes and scores exactly, boxes within float32 rounding
    np.testing.assert_array_equal(got[2], expected[2])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-6)
    assert len(got[1]) > 0


def test_vasipc(benchmark, case):
    _run(benchmark, case, decode_yolo)


def test_opencv(benchmark, case):
    _run(benchmark, case, opencv_decode)
