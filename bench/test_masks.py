"""Segment post-processing: our `segment_masks` vs the numpy + OpenCV code a user would write.

    python -m pytest bench/test_masks.py --benchmark-only

A 1280x720 frame, 30 instances, prototypes [32, 160, 160] (a 640x640 input letterboxed:
rows 35..125 hold the frame). Prototypes are smooth random fields (Gaussian-blurred noise,
as real prototypes are smooth), boxes 40-400 px. One group per output:
- `rle`: `vasipc` = `segment_masks(..., MASK_RLE)` (the logits of the cells each box reads,
  bilinear inside the box, runs straight to the COCO string, nogil C); `opencv` = logits
  `coeffs @ protos`, the pad cut, `cv2.resize` (INTER_LINEAR) of each logit map to the
  frame, sigmoid > 0.5 inside the box, a vectorized numpy RLE and pycocotools' string
  encoding in Python;
- `polygon`: `vasipc` = `segment_masks(..., MASK_POLYGON)`; `opencv` = the same masks,
  `cv2.connectedComponentsWithStats` (8-connected), the largest part's
  `cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)`.
Each test first asserts that both give the same masks (RLE strings, polygons).

`zoo`: the workload that made masks dominate, `vasipc` only: the random-weight zoo segment
model (`yolo11n-320-seg.onnx` of `VASIPC_ZOO`, ONNX Runtime) on skimage's astronaut
resized to 1920x1080, letterboxed to 320, conf 0.25, NMS 0.45: ~260 instances whose boxes
cover ~42 million source pixels, prototypes [32, 80, 80] that are nearly noise (random
weights), so most blocks are mixed. Skipped with the reason where the zoo or skimage is
absent. A few masks are first checked against the numpy reference.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from _common import ZOO  # (also puts tests/ on sys.path for reference_masks)
from reference_masks import pad_cut, rle_counts, rle_string
from reference_masks import segment_masks as reference_segment_masks

from vasipc._fast.masks import MASK_POLYGON, MASK_RLE, segment_masks

W, H, K, C, MH, MW = 1280, 720, 30, 32, 160, 160


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(2026)
    noise = rng.standard_normal((C, MH, MW)).astype(np.float32)
    protos = np.stack([cv2.GaussianBlur(p, (0, 0), 4) for p in noise])
    protos /= protos.std()
    coeffs = rng.standard_normal((K, C)).astype(np.float32) * np.float32(0.4)
    size = rng.uniform(40, 400, (K, 2))
    x0 = rng.uniform(0, W - size[:, 0])
    y0 = rng.uniform(0, H - size[:, 1])
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1).astype(np.float32)
    return protos, coeffs, boxes


def opencv_masks(protos, coeffs, boxes):
    """Each instance's H x W uint8 mask, the numpy + OpenCV way."""
    logits = (coeffs @ protos.reshape(C, -1)).reshape(-1, MH, MW)
    top, bottom, left, right = pad_cut(MH, MW, H, W)
    for logit, box in zip(logits, boxes, strict=True):
        full = cv2.resize(logit[top:bottom, left:right], (W, H), interpolation=cv2.INTER_LINEAR)
        x0, y0, x1, y1 = (min(max(math.ceil(v), 0), n) for v, n in zip(box, (W, H, W, H), strict=True))
        mask = np.zeros((H, W), np.uint8)
        mask[y0:y1, x0:x1] = 1 / (1 + np.exp(-full[y0:y1, x0:x1])) > 0.5
        yield mask


def opencv_rle(protos, coeffs, boxes):
    return [rle_string(rle_counts(m)) for m in opencv_masks(protos, coeffs, boxes)]


def opencv_polygons(protos, coeffs, boxes):
    out = []
    for mask in opencv_masks(protos, coeffs, boxes):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n == 1:
            out.append(np.zeros((0, 2), np.float32))
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        contours, _ = cv2.findContours((labels == best).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        out.append(contours[0].reshape(-1, 2).astype(np.float32) / np.array([W, H], np.float32))
    return out


def vasipc_rle(protos, coeffs, boxes):
    return segment_masks(protos, coeffs, boxes, W, H, MASK_RLE)


def vasipc_polygons(protos, coeffs, boxes):
    return segment_masks(protos, coeffs, boxes, W, H, MASK_POLYGON)


def _box_area(boxes: np.ndarray) -> float:
    return float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum())


def _group(case) -> str:
    area = _box_area(case[2])
    return f"{W}x{H}, {K} instances, protos [{C}, {MH}, {MW}], {area / (W * H):.1f} frames of box"


@pytest.mark.parametrize("fn", [vasipc_rle, opencv_rle], ids=["vasipc", "opencv"])
def test_rle(benchmark, case, fn):
    benchmark.group = f"masks rle: {_group(case)}"
    expected = opencv_rle(*case)
    assert sum(len(s) for s in expected) > K * 20  # real masks, not empty ones
    assert benchmark(fn, *case) == expected


@pytest.mark.parametrize("fn", [vasipc_polygons, opencv_polygons], ids=["vasipc", "opencv"])
def test_polygon(benchmark, case, fn):
    benchmark.group = f"masks polygon: {_group(case)}"
    expected = opencv_polygons(*case)
    got = benchmark(fn, *case)
    assert sum(len(p) for p in expected) > K * 4
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, e)


ZW, ZH = 1920, 1080


@pytest.fixture(scope="module")
def zoo():
    """(protos, coeffs, boxes) of the zoo segment model on the astronaut at 1920x1080."""
    seg = ZOO / "yolo11n-320-seg.onnx" if ZOO else None
    if seg is None or not seg.is_file():
        pytest.skip(f"needs the zoo's yolo11n-320-seg.onnx in VASIPC_ZOO (now {ZOO}): bench/README.md")
    ort = pytest.importorskip("onnxruntime")
    astronaut = pytest.importorskip("skimage.data").astronaut()
    import reference_heads  # the tests' numpy letterbox geometry and NMS

    rgb = cv2.resize(astronaut, (ZW, ZH), interpolation=cv2.INTER_LINEAR)
    g = reference_heads.input_geometry("letterbox", ZW, ZH, 320, 320)
    nw, nh, top, left = round(ZW * g.scale_x), round(ZH * g.scale_y), int(g.pad_top), int(g.pad_left)
    canvas = np.full((320, 320, 3), 114, np.uint8)
    canvas[top:top + nh, left:left + nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    x = np.ascontiguousarray(canvas.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255))
    session = ort.InferenceSession(str(seg), providers=["CPUExecutionProvider"])
    preds, protos = (o[0] for o in session.run(None, {session.get_inputs()[0].name: x}))
    rows = preds.T
    nc = rows.shape[1] - 4 - protos.shape[0]
    scores, classes = rows[:, 4:4 + nc].max(1), rows[:, 4:4 + nc].argmax(1)
    xy, wh = rows[:, :2], rows[:, 2:4]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    idx = np.flatnonzero(scores >= np.float32(0.25))
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    idx = idx[reference_heads.greedy_nms(boxes[idx].astype(np.float32), scores[idx], classes[idx], 0.45)]
    src_boxes = reference_heads._to_source(boxes[idx], g).astype(np.float32)
    return np.ascontiguousarray(protos), np.ascontiguousarray(rows[idx, 4 + nc:]), src_boxes


def _zoo_group(zoo) -> str:
    boxes = zoo[2]
    return (f"{ZW}x{ZH}, zoo yolo11n-320-seg, {len(boxes)} instances, "
            f"{_box_area(boxes) / 1e6:.1f} Mpx of box")


@pytest.mark.parametrize("fmt", [MASK_RLE, MASK_POLYGON], ids=["rle", "polygon"])
def test_zoo(benchmark, zoo, fmt):
    benchmark.group = f"masks zoo: {_zoo_group(zoo)}"
    protos, coeffs, boxes = zoo
    some = slice(0, len(boxes), max(1, len(boxes) // 6))
    assert len(boxes) > 100
    if fmt == MASK_RLE:
        assert segment_masks(protos, coeffs[some], boxes[some], ZW, ZH, fmt) == \
            reference_segment_masks(protos, coeffs[some], boxes[some], ZW, ZH, fmt)
    got = benchmark(segment_masks, protos, coeffs, boxes, ZW, ZH, fmt)
    assert len(got) == len(boxes)
