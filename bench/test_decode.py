"""Detection decode: our `decode_detections` vs numpy + OpenCV, and rotated NMS vs numpy.

    python -m pytest bench/test_decode.py --benchmark-only

One group per input, so each comparison prints side by side:
- `vasipc`: `decode_detections` (one nogil C call: scores, threshold, sort, NMS, top-k,
  geometry undone);
- `opencv` (detect): the same rules as a Python server would write them: numpy best class
  and threshold scan, score sort, xywh -> x, y, w, h rects, `cv2.dnn.NMSBoxesBatched`
  (per-class NMS), top-k, unletterbox + clip in numpy;
- `numpy` (rotated): Ultralytics' `non_max_suppression(rotated=True)` ported to vectorized
  numpy float32: best class, threshold, score sort, ProbIoU over the whole candidate
  matrix with classes offset by 7680 px, fast NMS (upper triangle), top-k.

Inputs: (a) real outputs: nudenet's `320n.onnx` on the astronaut letterboxed to 320
(conf 0.25), and the benchmark model (`_common.bench_model`, random weights) on the
same photo at 640 with a threshold low enough for its tiny scores (5e-4: about a
thousand candidates); (b) a stress case, 8400 anchors x
80 classes, tight clusters of heavily overlapping boxes (conf 0.05); (c) rotated: 2,000
OBB candidates x 15 classes in overlapping clusters, every one above conf 0.05. Each test
first asserts that both give the same detections (rotated: the same kept rows).
"""

from __future__ import annotations

import numpy as np
import pytest
from _common import bench_model, nudenet_model
from reference_decode import numpy_rotated_decode, opencv_decode, rotated_prediction, stress_prediction

from vasipc._fast.decode import NMS_ROTATED, DecodeLayout, decode_detections
from vasipc._fast.letterbox import RGB24, letterbox_geometry, letterbox_into

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
    return np.ascontiguousarray(out[0]).T, (r, r, left, top, w, h)  # [N, 4 + nc] view


CASES = ["nudenet-320", "random-640", "stress-8400x80"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """(name, pred [N, 4 + nc], conf, geometry (scale_x, scale_y, pad_left, pad_top, w, h))."""
    if request.param == "nudenet-320":
        pred, geom = _model_output(nudenet_model(), 320)
        conf = 0.25
    elif request.param == "random-640":
        pred, geom = _model_output(str(bench_model()), 640)
        conf = 5e-4  # random weights: class scores 1e-4 to 1e-3, about 1 in 9 pass
    else:
        pred, geom = stress_prediction().T, (0.5, 0.5, 0.0, 140.0, 1280, 720)
        conf = 0.05
    return request.param, pred, conf, geom


def _run(benchmark, case, fn):
    name, pred, conf, geom = case
    candidates = int((pred[:, 4:].max(axis=1) >= np.float32(conf)).sum())
    benchmark.group = f"decode {name} [{pred.shape[1] - 4} classes x {pred.shape[0]} anchors, " \
                      f"{candidates} candidates]"
    expected = opencv_decode(pred, conf, IOU, MAX_DET, None, *geom)
    got = benchmark(fn, pred, conf, IOU, MAX_DET, None, *geom)
    # the same detections: classes, rows and scores exactly, boxes within float32 rounding
    for i in (1, 2, 3):
        np.testing.assert_array_equal(got[i], expected[i])
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-6)
    assert len(got[1]) > 0


def test_vasipc(benchmark, case):
    layout = DecodeLayout(num_fields=case[1].shape[1], num_classes=case[1].shape[1] - 4)
    _run(benchmark, case, lambda *args: decode_detections(layout, *args))


def test_opencv(benchmark, case):
    _run(benchmark, case, opencv_decode)


ROTATED_NC = 15
ROTATED_GEOM = (0.5, 0.5, 0.0, 140.0, 1280, 720)


@pytest.fixture(scope="module")
def rotated():
    pred = rotated_prediction(n=2000, nc=ROTATED_NC).T  # [2000, 4 + 15 + 1]
    expected = numpy_rotated_decode(pred, 0.05, IOU, MAX_DET)[0]
    assert pred.shape[0] == 2000 and (pred[:, 4:-1].max(axis=1) >= 0.05).all()
    return pred, expected


def _run_rotated(benchmark, rotated, fn):
    pred, expected = rotated
    benchmark.group = f"rotated NMS [{ROTATED_NC} classes x 2000 candidates, " \
                      f"{len(expected)} kept]"
    np.testing.assert_array_equal(benchmark(fn, pred), expected)


def test_rotated_vasipc(benchmark, rotated):
    layout = DecodeLayout(num_fields=4 + ROTATED_NC + 1, num_classes=ROTATED_NC,
                          angle_field=4 + ROTATED_NC, nms=NMS_ROTATED)
    _run_rotated(benchmark, rotated, lambda pred: decode_detections(
        layout, pred, 0.05, IOU, MAX_DET, None, *ROTATED_GEOM).rows)


def test_rotated_numpy(benchmark, rotated):
    _run_rotated(benchmark, rotated, lambda pred: numpy_rotated_decode(pred, 0.05, IOU, MAX_DET)[0])
