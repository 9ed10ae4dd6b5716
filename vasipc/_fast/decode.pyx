# cython: language_level=3
"""Detection post-processing for one image, for every detection layout (issue 10).

A DecodeLayout, built once per model, says where a row of the model output holds the
box, the scores and the angle; decode_detections() turns one image's output [N, F] (any
strides: the raw YOLO [F, N] is passed as out.T) into the final detections in one nogil
call into decode_kernel.c: scores and classes per row (or per row x class pair),
confidence and class filters, Ultralytics' 30000-candidate cap, per-class NMS, rotated
ProbIoU NMS or none, max_detections, preprocessing geometry undone. Each detection keeps
its row, so the caller gathers mask coefficients or keypoints by it.
"""

import collections

import numpy as np

cimport numpy as cnp
from libc.math cimport isfinite, isnan
from libc.stdint cimport INT32_MAX, int32_t
from libc.stdlib cimport free, malloc

BOX_CXCYWH = DK_BOX_CXCYWH
BOX_XYXY = DK_BOX_XYXY
SCORE_MAX_CLASS = DK_SCORE_MAX_CLASS
SCORE_OBJ_X_CLASS = DK_SCORE_OBJ_X_CLASS
SCORE_FIELD = DK_SCORE_FIELD
SCORE_PAIRS = DK_SCORE_PAIRS
NMS_NONE = DK_NMS_NONE
NMS_CLASS = DK_NMS_CLASS
NMS_ROTATED = DK_NMS_ROTATED
MAX_NMS = DK_MAX_NMS

Decoded = collections.namedtuple(
    "Decoded", ["boxes", "scores", "class_ids", "rows", "rotated", "corners"])

cnp.import_array()

_FLOAT32, _UINT8 = np.dtype(np.float32), np.dtype(np.uint8)
_BOX_FORMATS = {DK_BOX_CXCYWH: "BOX_CXCYWH", DK_BOX_XYXY: "BOX_XYXY"}
_SCORE_MODES = {DK_SCORE_MAX_CLASS: "SCORE_MAX_CLASS", DK_SCORE_OBJ_X_CLASS: "SCORE_OBJ_X_CLASS",
                DK_SCORE_FIELD: "SCORE_FIELD", DK_SCORE_PAIRS: "SCORE_PAIRS"}
_NMS_MODES = {DK_NMS_NONE: "NMS_NONE", DK_NMS_CLASS: "NMS_CLASS", DK_NMS_ROTATED: "NMS_ROTATED"}


def _field(name, int index, int first_free, int num_fields):
    """Checks that fields index .. first_free - 1 lie inside a row."""
    if index < 0 or first_free > num_fields:
        raise ValueError(f"{name} {index} is outside the {num_fields} fields of a row")


cdef class DecodeLayout:
    """Where a row of a detection output holds what; immutable, built once per model.

    Fields are 0-based positions in a row of num_fields. Boxes: 4 fields from box_offset
    (cx, cy, w, h or x1, y1, x2, y2), multiplied by box_scale (x, y) into input pixels.
    Scores: SCORE_MAX_CLASS / SCORE_OBJ_X_CLASS / SCORE_PAIRS read num_classes fields from
    class_offset (OBJ_X_CLASS also obj_field); SCORE_FIELD reads score_field and
    class_field. angle_field >= 0 makes boxes rotated (cx, cy, w, h + angle, radians).
    """

    def __init__(self, *, int num_fields, int num_classes, int box_format=DK_BOX_CXCYWH,
                 int box_offset=0, box_scale=(1.0, 1.0), int score_mode=DK_SCORE_MAX_CLASS,
                 int class_offset=4, int obj_field=-1, int score_field=-1, int class_field=-1,
                 bint sigmoid=False, int angle_field=-1, int nms=DK_NMS_CLASS,
                 int max_nms=DK_MAX_NMS):
        if num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if box_format not in _BOX_FORMATS:
            raise ValueError(f"box_format must be BOX_CXCYWH or BOX_XYXY, got {box_format}")
        if score_mode not in _SCORE_MODES:
            raise ValueError(f"score_mode must be one of {sorted(_SCORE_MODES.values())}, "
                             f"got {score_mode}")
        if nms not in _NMS_MODES:
            raise ValueError(f"nms must be one of {sorted(_NMS_MODES.values())}, got {nms}")
        if max_nms < 1:
            raise ValueError(f"max_nms must be >= 1, got {max_nms}")
        sx, sy = box_scale
        if not (isfinite(sx) and isfinite(sy) and sx > 0 and sy > 0):
            raise ValueError(f"box_scale must be two finite values > 0, got {box_scale!r}")
        _field("box_offset", box_offset, box_offset + 4, num_fields)
        if score_mode == DK_SCORE_FIELD:
            _field("score_field", score_field, score_field + 1, num_fields)
            _field("class_field", class_field, class_field + 1, num_fields)
        else:
            if <long long>class_offset + num_classes > num_fields:
                raise ValueError(f"class fields {class_offset} .. {class_offset + num_classes - 1}"
                                 f" are outside the {num_fields} fields of a row")
            _field("class_offset", class_offset, class_offset + 1, num_fields)
        if score_mode == DK_SCORE_OBJ_X_CLASS:
            _field("obj_field", obj_field, obj_field + 1, num_fields)
        if sigmoid and score_mode not in (DK_SCORE_MAX_CLASS, DK_SCORE_PAIRS):
            raise ValueError("sigmoid applies to class scores: SCORE_MAX_CLASS or SCORE_PAIRS")
        if angle_field != -1:
            _field("angle_field", angle_field, angle_field + 1, num_fields)
            if box_format != DK_BOX_CXCYWH:
                raise ValueError("rotated boxes (angle_field >= 0) are BOX_CXCYWH")
            if nms == DK_NMS_CLASS:
                raise ValueError("rotated boxes take NMS_ROTATED or NMS_NONE, not NMS_CLASS")
        elif nms == DK_NMS_ROTATED:
            raise ValueError("NMS_ROTATED needs an angle_field")
        self.c.num_fields = num_fields
        self.c.num_classes = num_classes
        self.c.box_format = box_format
        self.c.box_offset = box_offset
        self.c.box_scale_x = sx
        self.c.box_scale_y = sy
        self.c.score_mode = score_mode
        self.c.class_offset = class_offset
        self.c.obj_field = obj_field
        self.c.score_field = score_field
        self.c.class_field = class_field
        self.c.sigmoid = sigmoid
        self.c.angle_field = angle_field
        self.c.nms = nms
        self.c.max_nms = max_nms

    @property
    def num_fields(self): return self.c.num_fields
    @property
    def num_classes(self): return self.c.num_classes
    @property
    def box_format(self): return self.c.box_format
    @property
    def box_offset(self): return self.c.box_offset
    @property
    def box_scale(self): return (self.c.box_scale_x, self.c.box_scale_y)
    @property
    def score_mode(self): return self.c.score_mode
    @property
    def class_offset(self): return self.c.class_offset
    @property
    def obj_field(self): return self.c.obj_field
    @property
    def score_field(self): return self.c.score_field
    @property
    def class_field(self): return self.c.class_field
    @property
    def sigmoid(self): return bool(self.c.sigmoid)
    @property
    def angle_field(self): return self.c.angle_field
    @property
    def nms(self): return self.c.nms
    @property
    def max_nms(self): return self.c.max_nms

    def __repr__(self):
        return (f"DecodeLayout(num_fields={self.c.num_fields}, num_classes={self.c.num_classes}, "
                f"box_format={_BOX_FORMATS[self.c.box_format]}, box_offset={self.c.box_offset}, "
                f"box_scale={self.box_scale}, score_mode={_SCORE_MODES[self.c.score_mode]}, "
                f"class_offset={self.c.class_offset}, obj_field={self.c.obj_field}, "
                f"score_field={self.c.score_field}, class_field={self.c.class_field}, "
                f"sigmoid={self.sigmoid}, angle_field={self.c.angle_field}, "
                f"nms={_NMS_MODES[self.c.nms]}, max_nms={self.c.max_nms})")


def decode_detections(DecodeLayout layout not None, pred, double conf_threshold,
                      double iou_threshold, int max_detections, class_mask, double scale_x,
                      double scale_y, double pad_left, double pad_top, int src_w, int src_h):
    """Detections of one image: Decoded(boxes float32 [k, 4] x_min, y_min, x_max, y_max in
    [0, 1] of the source frame; scores float32 [k], descending; class_ids int32 [k]; rows
    int32 [k], the row each came from; rotated float32 [k, 5] cx, cy, w, h in source pixels
    and angle, and corners float32 [k, 8] normalised, for rotated layouts, else None).

    pred: float32 [N, layout.num_fields], any strides. A candidate has score >=
    conf_threshold and a class passing class_mask (None, or uint8 [num_classes], nonzero
    = keep). The layout's max_nms best go through its NMS (suppressed at IoU >
    iou_threshold with a kept box of its class; rotated: ProbIoU >= iou_threshold with any
    higher-scored candidate of its class); the first max_detections survive. Input pixels
    -> source: x = (x - pad_left) / scale_x, y = (y - pad_top) / scale_y.
    """
    if not isinstance(pred, np.ndarray):
        raise TypeError(f"pred must be a numpy array, got {type(pred).__name__}")
    if pred.dtype != _FLOAT32:
        raise TypeError(f"pred must be float32, got {pred.dtype}")
    if pred.ndim != 2:
        raise ValueError(f"pred must be 2-D [N, num_fields], got shape {pred.shape}")
    if pred.shape[1] != layout.c.num_fields:
        raise ValueError(f"pred has {pred.shape[1]} fields per row, the layout "
                         f"{layout.c.num_fields}")
    cdef Py_ssize_t num_rows = pred.shape[0]
    if num_rows > INT32_MAX or (layout.c.score_mode == DK_SCORE_PAIRS
                                and num_rows * layout.c.num_classes > INT32_MAX):
        raise ValueError(f"too many candidates: {num_rows} rows x {layout.c.num_classes} classes")
    if isnan(conf_threshold) or isnan(iou_threshold):
        raise ValueError("conf_threshold and iou_threshold must not be NaN")
    if max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    if not (isfinite(scale_x) and scale_x > 0 and isfinite(scale_y) and scale_y > 0):
        raise ValueError(f"scale_x and scale_y must be finite and > 0, got {scale_x}, {scale_y}")
    if not (isfinite(pad_left) and isfinite(pad_top)):
        raise ValueError("pad_left and pad_top must be finite")
    if src_w < 1 or src_h < 1:
        raise ValueError(f"source size must be positive, got {src_w}x{src_h}")

    cdef cnp.ndarray mask
    cdef dk_params params
    params.class_mask = NULL
    if class_mask is not None:
        if not isinstance(class_mask, np.ndarray) or class_mask.dtype != _UINT8:
            raise TypeError("class_mask must be None or a uint8 numpy array")
        if class_mask.shape != (layout.c.num_classes,):
            raise ValueError(f"class_mask must have shape ({layout.c.num_classes},), "
                             f"got {class_mask.shape}")
        mask = np.ascontiguousarray(class_mask)
        params.class_mask = <const uint8_t *>cnp.PyArray_DATA(mask)
    params.conf_threshold = <float>conf_threshold  # float32 comparison, as torch/numpy
    params.iou_threshold = iou_threshold
    params.max_detections = max_detections
    params.scale_x = scale_x
    params.scale_y = scale_y
    params.pad_left = pad_left
    params.pad_top = pad_top
    params.src_w = src_w
    params.src_h = src_h

    # The C API rather than memoryviews and np.empty: this call's fixed cost is most of a
    # typical image's decode (a few hundred candidates).
    cdef cnp.ndarray p = pred
    cdef dk_prediction prediction
    prediction.num_rows = <int>num_rows
    prediction.data = <const char *>cnp.PyArray_DATA(p)
    prediction.row_stride = cnp.PyArray_STRIDES(p)[0]
    prediction.field_stride = cnp.PyArray_STRIDES(p)[1]
    cdef bint rotated = layout.c.angle_field >= 0
    cdef int capacity = dk_capacity(&layout.c, &prediction, &params)
    cdef cnp.npy_intp dims[2]
    dims[0] = capacity
    dims[1] = 4
    boxes = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
    scores = cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT32, 0)
    class_ids = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)
    rows = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)
    rboxes = corners = None
    if rotated:
        dims[1] = 5
        rboxes = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        dims[1] = 8
        corners = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
    if capacity == 0:
        return Decoded(boxes, scores, class_ids, rows, rboxes, corners)
    cdef dk_outputs out
    out.boxes = <float *>cnp.PyArray_DATA(boxes)
    out.scores = <float *>cnp.PyArray_DATA(scores)
    out.class_ids = <int32_t *>cnp.PyArray_DATA(class_ids)
    out.rows = <int32_t *>cnp.PyArray_DATA(rows)
    out.rotated = <float *>cnp.PyArray_DATA(rboxes) if rotated else NULL
    out.corners = <float *>cnp.PyArray_DATA(corners) if rotated else NULL

    cdef void *scratch
    cdef int k = 0
    with nogil:
        scratch = malloc(dk_scratch_nbytes(&layout.c, &prediction, &params))
        if scratch != NULL:
            k = dk_decode(&layout.c, &prediction, &params, scratch, &out)
            free(scratch)
    if scratch == NULL:
        raise MemoryError()
    if k < capacity:  # views: capacity is at most max_detections, copying costs more
        return Decoded(boxes[:k], scores[:k], class_ids[:k], rows[:k],
                       rboxes[:k] if rotated else None, corners[:k] if rotated else None)
    return Decoded(boxes, scores, class_ids, rows, rboxes, corners)
