"""Pure numpy reference of the compiled detection decoder, vasipc._fast.decode.

Written from the formulas (the contract, Ultralytics 8.4's non_max_suppression, its
TorchNMS.fast_nms and metrics.batch_probiou), not from the C, and with no OpenCV: it
exposes the module's names (constants, DecodeLayout, decode_detections, Decoded) so the
tests run one set of assertions against both, and each pins the other. Rotated NMS here
is Ultralytics' own algorithm, the whole upper-triangular ProbIoU matrix with classes
offset by 7680 px; the C compares per class on the fly. Slow and clear; nothing in the
product uses it.

Also the baselines the tests and bench/test_decode.py compare against: opencv_decode
(numpy + cv2.dnn.NMSBoxesBatched), numpy_rotated_decode (vectorized numpy ProbIoU NMS
as a user would write it), and the synthetic inputs stress_prediction and
rotated_prediction.
"""

from __future__ import annotations

import collections
import math

import numpy as np

BOX_CXCYWH, BOX_XYXY = 0, 1
SCORE_MAX_CLASS, SCORE_OBJ_X_CLASS, SCORE_FIELD, SCORE_PAIRS = 0, 1, 2, 3
NMS_NONE, NMS_CLASS, NMS_ROTATED = 0, 1, 2
MAX_NMS = 30000
MAX_WH = 7680  # Ultralytics' class offset in NMS

Decoded = collections.namedtuple(
    "Decoded", ["boxes", "scores", "class_ids", "rows", "rotated", "corners"])

_F32 = np.float32


class DecodeLayout:
    """The same checks and attributes as the compiled DecodeLayout."""

    def __init__(self, *, num_fields: int, num_classes: int, box_format: int = BOX_CXCYWH,
                 box_offset: int = 0, box_scale: tuple[float, float] = (1.0, 1.0),
                 score_mode: int = SCORE_MAX_CLASS, class_offset: int = 4, obj_field: int = -1,
                 score_field: int = -1, class_field: int = -1, sigmoid: bool = False,
                 angle_field: int = -1, nms: int = NMS_CLASS, max_nms: int = MAX_NMS) -> None:
        def inside(name: str, index: int, count: int = 1) -> None:
            if index < 0 or index + count > num_fields:
                raise ValueError(f"{name} {index} is outside the {num_fields} fields of a row")

        if num_fields < 1 or num_classes < 1:
            raise ValueError("num_fields and num_classes must be >= 1")
        if box_format not in (BOX_CXCYWH, BOX_XYXY):
            raise ValueError(f"bad box_format {box_format}")
        if score_mode not in (SCORE_MAX_CLASS, SCORE_OBJ_X_CLASS, SCORE_FIELD, SCORE_PAIRS):
            raise ValueError(f"bad score_mode {score_mode}")
        if nms not in (NMS_NONE, NMS_CLASS, NMS_ROTATED):
            raise ValueError(f"bad nms {nms}")
        if max_nms < 1:
            raise ValueError("max_nms must be >= 1")
        sx, sy = box_scale
        if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
            raise ValueError(f"bad box_scale {box_scale!r}")
        inside("box_offset", box_offset, 4)
        if score_mode == SCORE_FIELD:
            inside("score_field", score_field)
            inside("class_field", class_field)
        else:
            inside("class_offset", class_offset, num_classes)
        if score_mode == SCORE_OBJ_X_CLASS:
            inside("obj_field", obj_field)
        if sigmoid and score_mode not in (SCORE_MAX_CLASS, SCORE_PAIRS):
            raise ValueError("sigmoid applies to class scores")
        if angle_field != -1:
            inside("angle_field", angle_field)
            if box_format != BOX_CXCYWH or nms == NMS_CLASS:
                raise ValueError("rotated boxes are BOX_CXCYWH with NMS_ROTATED or NMS_NONE")
        elif nms == NMS_ROTATED:
            raise ValueError("NMS_ROTATED needs an angle_field")
        self.num_fields, self.num_classes = num_fields, num_classes
        self.box_format, self.box_offset = box_format, box_offset
        self.box_scale = (float(_F32(sx)), float(_F32(sy)))
        self.score_mode, self.class_offset, self.obj_field = score_mode, class_offset, obj_field
        self.score_field, self.class_field = score_field, class_field
        self.sigmoid, self.angle_field, self.nms, self.max_nms = bool(sigmoid), angle_field, nms, max_nms


# --- arithmetic shared by the reference and the baselines -----------------------------------

def _f32_of_f64(fn, x: np.ndarray) -> np.ndarray:
    """A float32 transcendental as the C computes it: the double function, rounded."""
    return fn(np.asarray(x, np.float64)).astype(_F32)


def sigmoid32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _F32(1) / (_F32(1) + _f32_of_f64(np.exp, -np.asarray(x, _F32)))


def _covariance(boxes: np.ndarray, exact: bool):
    """Ultralytics' _get_covariance_matrix in float32: a, b, c of each xywhr box."""
    cos, sin = ((lambda v: _f32_of_f64(np.cos, v), lambda v: _f32_of_f64(np.sin, v)) if exact
                else (np.cos, np.sin))
    a, b = boxes[:, 2] ** 2 / _F32(12), boxes[:, 3] ** 2 / _F32(12)
    c_, s_ = cos(boxes[:, 4]), sin(boxes[:, 4])
    cos2, sin2 = c_ ** 2, s_ ** 2
    return a * cos2 + b * sin2, a * sin2 + b * cos2, (a - b) * c_ * s_


def batch_probiou(obb1: np.ndarray, obb2: np.ndarray, exact: bool = True) -> np.ndarray:
    """Ultralytics' batch_probiou in float32 numpy: [N, 5] x [M, 5] xywhr -> [N, M].

    exact: cos, sin, log and exp as the compiled kernel computes them (double, rounded to
    float32); otherwise numpy's float32 functions, as a user would call them."""
    log, exp = ((lambda v: _f32_of_f64(np.log, v), lambda v: _f32_of_f64(np.exp, v)) if exact
                else (np.log, np.exp))
    eps = _F32(1e-7)
    x1, y1 = obb1[:, 0:1], obb1[:, 1:2]
    x2, y2 = obb2[None, :, 0], obb2[None, :, 1]
    a1, b1, c1 = (v[:, None] for v in _covariance(obb1, exact))
    a2, b2, c2 = (v[None, :] for v in _covariance(obb2, exact))
    with np.errstate(all="ignore"):
        t1 = (((a1 + a2) * (y1 - y2) ** 2 + (b1 + b2) * (x1 - x2) ** 2)
              / ((a1 + a2) * (b1 + b2) - (c1 + c2) ** 2 + eps)) * _F32(0.25)
        t2 = (((c1 + c2) * (x2 - x1) * (y1 - y2))
              / ((a1 + a2) * (b1 + b2) - (c1 + c2) ** 2 + eps)) * _F32(0.5)
        t3 = log(((a1 + a2) * (b1 + b2) - (c1 + c2) ** 2)
                 / (_F32(4) * np.sqrt(np.maximum(a1 * b1 - c1 ** 2, _F32(0))
                                      * np.maximum(a2 * b2 - c2 ** 2, _F32(0))) + eps)
                 + eps) * _F32(0.5)
        bd = np.clip(t1 + t2 + t3, eps, _F32(100))
        hd = np.sqrt(_F32(1) - exp(-bd) + eps)
    return _F32(1) - hd


def fast_nms_rotated(rboxes: np.ndarray, classes: np.ndarray, iou_threshold: float,
                     exact: bool = True, strict_classes: bool = True,
                     block: int = 2048) -> np.ndarray:
    """TorchNMS.fast_nms(iou_func=batch_probiou) on boxes already in score order, classes
    offset by 7680 px as non_max_suppression(rotated=True) does: the positions kept.
    Candidate j is dropped when ProbIoU >= threshold (float32) with any i < j (the upper
    triangle), suppressed or not. Column blocks bound the memory.

    strict_classes: only pairs of one class count. The offset alone separates classes for
    every box but the degenerate: two boxes of zero size have a ProbIoU of ~1 however far
    apart, so Ultralytics lets them suppress each other across classes; we do not."""
    boxes = rboxes.astype(_F32)
    offset = classes.astype(_F32) * _F32(MAX_WH)
    boxes[:, 0] += offset
    boxes[:, 1] += offset
    thr = _F32(iou_threshold)
    m = len(boxes)
    suppressed = np.zeros(m, bool)
    for j0 in range(0, m, block):
        j1 = min(m, j0 + block)
        ious = batch_probiou(boxes[:j1], boxes[j0:j1], exact)
        ious[np.arange(j1)[:, None] >= np.arange(j0, j1)[None, :]] = 0  # triu_(diagonal=1)
        if strict_classes:
            ious[classes[:j1, None] != classes[None, j0:j1]] = 0
        suppressed[j0:j1] = (ious >= thr).any(axis=0)
    return np.flatnonzero(~suppressed)


def xywhr_corners(rotated: np.ndarray) -> np.ndarray:
    """Ultralytics' xywhr2xyxyxyxy in float64: [k, 5] -> [k, 4, 2]."""
    r = rotated.astype(np.float64)
    cx, cy, w, h, t = (r[:, i] for i in range(5))
    cos, sin = np.cos(t), np.sin(t)
    v1x, v1y = w / 2 * cos, w / 2 * sin
    v2x, v2y = -h / 2 * sin, h / 2 * cos
    xs = np.stack([cx + v1x + v2x, cx + v1x - v2x, cx - v1x - v2x, cx - v1x + v2x], axis=1)
    ys = np.stack([cy + v1y + v2y, cy + v1y - v2y, cy - v1y - v2y, cy - v1y + v2y], axis=1)
    return np.stack([xs, ys], axis=2)


# --- the reference decoder -------------------------------------------------------------------

def _check_arguments(layout, pred, conf_threshold, iou_threshold, max_detections, class_mask,
                     scale_x, scale_y, pad_left, pad_top, src_w, src_h) -> None:
    if not isinstance(layout, DecodeLayout):
        raise TypeError("layout must be a DecodeLayout")
    if not isinstance(pred, np.ndarray) or pred.dtype != np.float32:
        raise TypeError("pred must be a float32 numpy array")
    if pred.ndim != 2 or pred.shape[1] != layout.num_fields:
        raise ValueError(f"pred must be [N, {layout.num_fields}], got {pred.shape}")
    if math.isnan(conf_threshold) or math.isnan(iou_threshold):
        raise ValueError("thresholds must not be NaN")
    if max_detections < 0:
        raise ValueError("max_detections must be >= 0")
    if not all(math.isfinite(s) and s > 0 for s in (scale_x, scale_y)):
        raise ValueError("bad scale")
    if not (math.isfinite(pad_left) and math.isfinite(pad_top)):
        raise ValueError("bad padding")
    if src_w < 1 or src_h < 1:
        raise ValueError("bad source size")
    if class_mask is not None:
        if not isinstance(class_mask, np.ndarray) or class_mask.dtype != np.uint8:
            raise TypeError("class_mask must be a uint8 numpy array")
        if class_mask.shape != (layout.num_classes,):
            raise ValueError("class_mask must have one flag per class")


def _candidates(layout: DecodeLayout, pred: np.ndarray, conf: np.float32, class_mask):
    """(index, row, class, score) of every candidate; index orders ties."""
    nc, first = layout.num_classes, layout.class_offset
    if layout.score_mode == SCORE_PAIRS:
        scores = pred[:, first:first + nc]
        if layout.sigmoid:
            scores = sigmoid32(scores)
        keep = scores >= conf
        if class_mask is not None:
            keep &= class_mask[None, :] != 0
        rows, classes = np.nonzero(keep)
        return rows * nc + classes, rows, classes, scores[rows, classes]
    if layout.score_mode == SCORE_FIELD:
        scores, values = pred[:, layout.score_field], pred[:, layout.class_field]
        with np.errstate(invalid="ignore"):
            keep = (scores > 0) & (scores >= conf)  # zero-score padding rows never count
            keep &= (values >= 0) & (values < nc) & (np.floor(values) == values)
        classes = np.where(keep, values, 0).astype(np.int64)
    else:
        per_class = pred[:, first:first + nc]
        if layout.score_mode == SCORE_OBJ_X_CLASS:
            per_class = per_class * pred[:, layout.obj_field, None]  # float32, per class
        classes = per_class.argmax(axis=1)                            # first maximum
        scores = per_class[np.arange(len(pred)), classes]
        if layout.sigmoid:
            scores = sigmoid32(scores)
        keep = scores >= conf
    if class_mask is not None:
        keep &= class_mask[classes] != 0
    rows = np.flatnonzero(keep)
    return rows, rows, classes[rows], scores[rows]


def _axis_aligned(layout: DecodeLayout, pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 of these rows in input pixels, float32."""
    f = layout.box_offset
    sx, sy = _F32(layout.box_scale[0]), _F32(layout.box_scale[1])
    v = pred[rows, f:f + 4]
    if layout.box_format == BOX_XYXY:
        return np.stack([v[:, 0] * sx, v[:, 1] * sy, v[:, 2] * sx, v[:, 3] * sy], axis=1)
    cx, cy = v[:, 0] * sx, v[:, 1] * sy
    half_w, half_h = v[:, 2] * sx / _F32(2), v[:, 3] * sy / _F32(2)
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def _rotated(layout: DecodeLayout, pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """cx, cy, w, h, angle of these rows in input pixels, float32."""
    f = layout.box_offset
    sx, sy = _F32(layout.box_scale[0]), _F32(layout.box_scale[1])
    v = pred[rows, f:f + 4]
    return np.stack([v[:, 0] * sx, v[:, 1] * sy, v[:, 2] * sx, v[:, 3] * sy,
                     pred[rows, layout.angle_field]], axis=1)


def _greedy_nms(boxes: np.ndarray, classes: np.ndarray, iou_threshold: float,
                max_keep: int) -> list[int]:
    """torchvision's per-class greedy NMS: IoU > threshold with a kept box suppresses."""
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    kept: list[int] = []
    by_class: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        if len(kept) == max_keep:
            break
        same = np.asarray(by_class.get(int(classes[i]), []), dtype=np.int64)
        if same.size:
            iw = np.minimum(x2[i], x2[same]) - np.maximum(x1[i], x1[same])
            ih = np.minimum(y2[i], y2[same]) - np.maximum(y1[i], y1[same])
            inter = np.maximum(iw, _F32(0)) * np.maximum(ih, _F32(0))
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = inter / (area[same] + area[i] - inter)
                if (iou.astype(np.float64) > iou_threshold).any():
                    continue
        kept.append(i)
        by_class.setdefault(int(classes[i]), []).append(i)
    return kept


def decode_detections(layout: DecodeLayout, pred, conf_threshold: float, iou_threshold: float,
                      max_detections: int, class_mask, scale_x: float, scale_y: float,
                      pad_left: float, pad_top: float, src_w: int, src_h: int) -> Decoded:
    _check_arguments(layout, pred, conf_threshold, iou_threshold, max_detections, class_mask,
                     scale_x, scale_y, pad_left, pad_top, src_w, src_h)
    rotated_layout = layout.angle_field >= 0
    index, rows, classes, scores = _candidates(layout, pred, _F32(conf_threshold), class_mask)
    order = np.lexsort((index, -scores))[:layout.max_nms]  # score descending, ties by index
    rows, classes, scores = rows[order], classes[order], scores[order]

    if layout.nms == NMS_CLASS:
        kept = _greedy_nms(_axis_aligned(layout, pred, rows), classes, iou_threshold,
                           max_detections)
    elif layout.nms == NMS_ROTATED:
        # (a threshold <= 0 keeps nothing: the matrix's zeroed diagonal counts as >= it)
        kept = fast_nms_rotated(_rotated(layout, pred, rows), classes, iou_threshold)
    else:
        kept = np.arange(len(rows))
    kept = np.asarray(kept, np.int64)[:max_detections]
    rows, classes, scores = rows[kept], classes[kept], scores[kept]

    if rotated_layout:
        r = _rotated(layout, pred, rows).astype(np.float64)
        rotated = np.stack([(r[:, 0] - pad_left) / scale_x, (r[:, 1] - pad_top) / scale_y,
                            r[:, 2] / scale_x, r[:, 3] / scale_y, r[:, 4]], axis=1).astype(_F32)
        points = xywhr_corners(rotated) / np.array([src_w, src_h], np.float64)
        corners = points.reshape(-1, 8).astype(_F32)
        boxes = np.clip(np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)
                        .reshape(-1, 4), 0, 1).astype(_F32)
    else:
        rotated = corners = None
        b = _axis_aligned(layout, pred, rows).astype(np.float64)
        b[:, [0, 2]] = (b[:, [0, 2]] - pad_left) / scale_x / src_w
        b[:, [1, 3]] = (b[:, [1, 3]] - pad_top) / scale_y / src_h
        boxes = np.clip(b.astype(_F32), 0, 1).reshape(-1, 4)
    return Decoded(boxes, scores.astype(_F32), classes.astype(np.int32), rows.astype(np.int32),
                   rotated, corners)


# --- baselines and test data shared with bench/test_decode.py --------------------------------

def stress_prediction(n: int = 8400, nc: int = 80, seed: int = 7) -> np.ndarray:
    """A raw YOLOv8 output [4 + nc, n] (pass .T): thousands of candidates in tight clusters
    (heavy overlap), many classes, close scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(40, 600, (60, 2))
    which = rng.integers(0, len(centres), n)
    pred = np.empty((4 + nc, n), np.float32)
    pred[0:2] = (centres[which] + rng.normal(0, 6, (n, 2))).T
    pred[2:4] = rng.uniform(20, 160, (2, n))
    pred[4:] = rng.uniform(0, 0.2, (nc, n))
    hot = rng.integers(0, nc // 4, n)  # a few classes dominate, so clusters share classes
    pred[4 + hot, np.arange(n)] = rng.uniform(0.05, 1.0, n)
    return pred


def rotated_prediction(n: int = 2000, nc: int = 15, seed: int = 11) -> np.ndarray:
    """A raw YOLO OBB output [4 + nc + 1, n] (pass .T): rotated boxes (angle last, in
    [-pi/4, 3pi/4) as v8/11 heads give it) overlapping in clusters, every row a candidate
    above 0.05."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(60, 580, (40, 2))
    which = rng.integers(0, len(centres), n)
    pred = np.empty((4 + nc + 1, n), np.float32)
    pred[0:2] = (centres[which] + rng.normal(0, 8, (n, 2))).T
    pred[2] = rng.uniform(10, 120, n)
    pred[3] = rng.uniform(5, 60, n)
    pred[4:4 + nc] = rng.uniform(0, 0.05, (nc, n))
    hot = rng.integers(0, max(1, nc // 3), n)
    pred[4 + hot, np.arange(n)] = rng.uniform(0.06, 1.0, n)
    pred[4 + nc] = rng.uniform(-np.pi / 4, 3 * np.pi / 4, n)
    return pred


def opencv_decode(pred: np.ndarray, conf: float, iou: float, max_det: int, class_mask,
                  scale_x: float, scale_y: float, pad_left: float, pad_top: float, src_w: int,
                  src_h: int):
    """The raw YOLO rules (pred [N, 4 + nc]) built from numpy and OpenCV's batched
    (per-class) NMS: (boxes, scores, class_ids, rows). The independent baseline the
    SCORE_MAX_CLASS / NMS_CLASS decode is tested and benchmarked against."""
    import cv2

    scores = pred[:, 4:].max(axis=1)
    cls = pred[:, 4:].argmax(axis=1)
    keep = scores >= np.float32(conf)
    if class_mask is not None:
        keep &= class_mask[cls] != 0
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((idx, -scores[idx]))][:MAX_NMS]
    cx, cy, w, h = (pred[idx, k].astype(np.float64) for k in range(4))
    rects = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
    kept = cv2.dnn.NMSBoxesBatched(rects, scores[idx], cls[idx].astype(np.int32),
                                   -1.0, iou) if idx.size else []
    sel = idx[np.asarray(kept, dtype=np.int64).ravel()[:max_det]]
    cx, cy, w, h = (pred[sel, k].astype(np.float64) for k in range(4))
    boxes = np.stack([(cx - w / 2 - pad_left) / scale_x / src_w,
                      (cy - h / 2 - pad_top) / scale_y / src_h,
                      (cx + w / 2 - pad_left) / scale_x / src_w,
                      (cy + h / 2 - pad_top) / scale_y / src_h], axis=1)
    return (np.clip(boxes, 0, 1).astype(np.float32).reshape(-1, 4),
            scores[sel].astype(np.float32), cls[sel].astype(np.int32), sel.astype(np.int32))


def numpy_rotated_decode(pred: np.ndarray, conf: float, iou: float, max_det: int):
    """Raw YOLO OBB rules (pred [N, 4 + nc + 1], angle last) in vectorized numpy, as a user
    would port Ultralytics' non_max_suppression(rotated=True): best class, threshold,
    score sort, ProbIoU fast NMS over the whole matrix in numpy float32. Returns
    (rows, scores, class_ids) of the kept detections."""
    scores = pred[:, 4:-1].max(axis=1)
    cls = pred[:, 4:-1].argmax(axis=1)
    idx = np.flatnonzero(scores >= np.float32(conf))
    idx = idx[np.argsort(-scores[idx], kind="stable")][:MAX_NMS]
    boxes = np.concatenate([pred[idx, :4], pred[idx, -1:]], axis=1)
    kept = fast_nms_rotated(boxes, cls[idx], iou, exact=False, strict_classes=False,
                            block=len(idx) or 1)
    kept = idx[kept[:max_det]]
    return kept.astype(np.int32), scores[kept], cls[kept].astype(np.int32)
