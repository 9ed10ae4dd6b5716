# cython: language_level=3
"""Instance masks of a segmentation head for one image, as COCO RLE strings or polygons.

segment_masks() turns each detection's mask coefficients into its mask over the source
frame, Ultralytics 8.4's native-resolution mask (ops.process_mask_native), working only
inside the detection's box: one nogil call into mask_kernel.c per detection, one scratch
allocation per call.
"""

import numpy as np

from libc.math cimport isfinite
from libc.stdint cimport INT32_MAX, SIZE_MAX
from libc.stdlib cimport free, malloc

MASK_RLE = MK_RLE
MASK_POLYGON = MK_POLYGON


def segment_masks(protos, coeffs, boxes, int src_w, int src_h, int mask_format):
    """The masks of one image's k detections, one item each (a list).

    protos: float32 [C, mh, mw] (any strides), the model's prototypes for the image.
    coeffs: float32 [k, C] (any strides), each detection's mask coefficients.
    boxes: float32 [k, 4] (any strides) x1, y1, x2, y2 in source-frame pixels (letterbox
    undone, clipped).
    The mask: logits = coeffs @ protos; the letterbox pad cut from the logit map as
    ops.scale_masks cuts it for a src_w x src_h frame; the rest resized to the frame
    bilinearly (F.interpolate, align_corners=False); pixels with x1 <= x < x2 and
    y1 <= y < y2 whose logit is > 0.
    mask_format MASK_RLE: the COCO compressed RLE `counts` string of the src_h x src_w
    mask (pycocotools.mask.decode({"size": [src_h, src_w], "counts": s}) reads it).
    MASK_POLYGON: float32 [P, 2] (x / src_w, y / src_h), the outer contour of the mask's
    largest 8-connected part (ties: the first in raster order) as OpenCV's
    findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE) gives it, x and y pixel indices;
    [0, 2] when the mask is empty.
    """
    cdef const float[:, :, :] p = protos
    cdef const float[:, :] k = coeffs
    cdef const float[:, :] bx = boxes
    if p.shape[0] < 1 or p.shape[1] < 1 or p.shape[2] < 1:
        raise ValueError(f"protos must be a non-empty [C, mh, mw], got {(p.shape[0], p.shape[1], p.shape[2])}")
    if p.shape[0] > INT32_MAX or p.shape[1] > INT32_MAX or p.shape[2] > INT32_MAX:
        raise ValueError(f"protos too large: {(p.shape[0], p.shape[1], p.shape[2])}")
    if k.shape[1] != p.shape[0]:
        raise ValueError(f"coeffs must be [k, {p.shape[0]}] (one per prototype), "
                         f"got {(k.shape[0], k.shape[1])}")
    if bx.shape[1] != 4 or bx.shape[0] != k.shape[0]:
        raise ValueError(f"boxes must be [{k.shape[0]}, 4], got {(bx.shape[0], bx.shape[1])}")
    if src_w < 1 or src_h < 1:
        raise ValueError(f"source size must be positive, got {src_w}x{src_h}")
    if mask_format != MK_RLE and mask_format != MK_POLYGON:
        raise ValueError(f"unknown mask_format {mask_format}")
    cdef Py_ssize_t n = k.shape[0], i, j
    for i in range(n):
        for j in range(4):
            if not isfinite(bx[i, j]):
                raise ValueError(f"box {i} is not finite: {np.asarray(bx[i]).tolist()}")

    cdef mk_geometry g
    if mk_geometry_init(&g, <int>p.shape[1], <int>p.shape[2], src_w, src_h):
        raise ValueError(f"a {src_w}x{src_h} frame leaves no prototype row or column of "
                         f"{p.shape[1]}x{p.shape[2]} once the letterbox pad is cut")
    if n == 0:
        return []

    cdef mk_protos pr
    pr.data = <const char *>&p[0, 0, 0]
    pr.c_stride = p.strides[0]
    pr.y_stride = p.strides[1]
    pr.x_stride = p.strides[2]
    pr.channels = <int>p.shape[0]
    pr.height = <int>p.shape[1]
    pr.width = <int>p.shape[2]

    cdef float xyxy[4]
    cdef mk_box box
    cdef size_t need, nbytes = 0
    for i in range(n):
        xyxy[:] = [bx[i, 0], bx[i, 1], bx[i, 2], bx[i, 3]]
        mk_box_init(&box, &g, xyxy)
        need = mk_scratch_nbytes(&g, &box, mask_format)
        if need == SIZE_MAX:
            raise MemoryError(f"box {i} is too large for a mask")
        nbytes = max(nbytes, need)

    cdef void *scratch = malloc(nbytes)
    if scratch == NULL:
        raise MemoryError()
    cdef const char *coeff
    cdef Py_ssize_t coeff_stride = k.strides[1]
    cdef const char *text
    cdef size_t count
    cdef float[:, ::1] out
    masks = []
    try:
        for i in range(n):
            xyxy[:] = [bx[i, 0], bx[i, 1], bx[i, 2], bx[i, 3]]
            mk_box_init(&box, &g, xyxy)
            coeff = <const char *>&k[i, 0]
            if mask_format == MK_RLE:
                with nogil:
                    count = mk_rle(&g, &pr, coeff, coeff_stride, &box, scratch, &text)
                masks.append(text[:count].decode("ascii"))
            else:
                with nogil:
                    count = mk_polygon(&g, &pr, coeff, coeff_stride, &box, scratch)
                points = np.empty((count, 2), np.float32)
                if count:
                    out = points
                    with nogil:
                        mk_polygon_points(&g, &box, scratch, &out[0, 0])
                masks.append(points)
    finally:
        free(scratch)
    return masks
