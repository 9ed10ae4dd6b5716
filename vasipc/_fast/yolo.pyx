# cython: language_level=3
"""YOLOv8 detect-head postprocessing for one image: decode + per-class NMS (CONTRACT 6).

decode_yolo() takes one image of the model output [4 + nc, N] and returns the final
detections, normalised to the source frame, in one nogil call into yolo_decode.c:
best class per anchor, confidence and class filters, Ultralytics' 30000-candidate cap,
greedy per-class NMS, max_detections, letterbox undone.
"""

import numpy as np

from libc.math cimport isfinite, isnan
from libc.stdint cimport INT32_MAX
from libc.stdlib cimport free, malloc


def decode_yolo(pred, double conf_threshold, double iou_threshold, int max_detections,
                classes, double scale, double pad_left, double pad_top, int src_w, int src_h):
    """Detections of one image as (boxes float32 [k, 4] x_min, y_min, x_max, y_max in
    [0, 1] of the source frame; scores float32 [k]; class_ids int32 [k]), score descending.

    pred: float32 [4 + nc, N] (any strides): cx, cy, w, h in input pixels, then nc class
    scores. An anchor is a candidate when its best class score (first maximum over all
    classes) is >= conf_threshold and, if classes is not None, its best class is in
    classes (a 1-D sequence of ids; empty keeps nothing). The 30000 best candidates go
    through greedy NMS per class (suppressed at IoU > iou_threshold with a kept box of the
    same class; ties in score: lower anchor first); the first max_detections survive.
    Boxes: x = (x - pad_left) / scale, y = (y - pad_top) / scale, clipped to the
    src_w x src_h frame, then divided by src_w, src_h.
    """
    cdef const float[:, :] p = pred
    if p.shape[0] < 5:
        raise ValueError(f"pred must be [4 + nc, N] with nc >= 1, got {p.shape[0]} rows")
    if p.shape[1] > INT32_MAX:
        raise ValueError(f"too many anchors: {p.shape[1]}")
    if isnan(conf_threshold) or isnan(iou_threshold):
        raise ValueError("conf_threshold and iou_threshold must not be NaN")
    if max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    if not (isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if not (isfinite(pad_left) and isfinite(pad_top)):
        raise ValueError("pad_left and pad_top must be finite")
    if src_w < 1 or src_h < 1:
        raise ValueError(f"source size must be positive, got {src_w}x{src_h}")

    cdef int num_classes = <int>p.shape[0] - 4
    cdef const unsigned char[::1] mask
    cdef yd_params params
    params.class_mask = NULL
    if classes is not None:
        ids = np.asarray(classes)
        if ids.ndim != 1:
            raise ValueError(f"classes must be 1-D, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"classes must be integer ids, got dtype {ids.dtype}")
        keep = np.zeros(num_classes, dtype=np.uint8)
        if ids.size:
            keep[ids[(ids >= 0) & (ids < num_classes)]] = 1  # unknown ids match nothing
        mask = keep
        params.class_mask = &mask[0]
    params.conf_threshold = <float>conf_threshold  # float32 comparison, as torch/numpy
    params.iou_threshold = iou_threshold
    params.max_detections = max_detections
    params.max_nms = YD_MAX_NMS
    params.scale = scale
    params.pad_left = pad_left
    params.pad_top = pad_top
    params.src_w = src_w
    params.src_h = src_h

    cdef yd_prediction prediction
    prediction.num_classes = num_classes
    prediction.num_anchors = <int>p.shape[1]
    cdef int capacity = yd_capacity(&prediction, &params) if p.shape[1] else 0
    if capacity == 0:
        return (np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32))
    prediction.data = <const char *>&p[0, 0]
    prediction.row_stride = p.strides[0]
    prediction.col_stride = p.strides[1]

    boxes = np.empty((capacity, 4), np.float32)
    scores = np.empty(capacity, np.float32)
    class_ids = np.empty(capacity, np.int32)
    cdef float[:, ::1] boxes_out = boxes
    cdef float[::1] scores_out = scores
    cdef int[::1] class_ids_out = class_ids
    cdef void *scratch
    cdef int k = 0
    with nogil:
        scratch = malloc(yd_scratch_nbytes(&prediction, &params))
        if scratch != NULL:
            k = yd_decode(&prediction, &params, scratch, &boxes_out[0, 0], &scores_out[0],
                          <int32_t *>&class_ids_out[0])
            free(scratch)
    if scratch == NULL:
        raise MemoryError()
    if k < capacity:
        return boxes[:k].copy(), scores[:k].copy(), class_ids[:k].copy()
    return boxes, scores, class_ids
