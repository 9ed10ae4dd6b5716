# yolo.pxd: the C API behind yolo.pyx (YOLOv8 decode + per-class NMS, yolo_decode.h).
from libc.stdint cimport int32_t, uint8_t


cdef extern from "yolo_decode.h" nogil:
    enum:
        YD_MAX_NMS

    ctypedef struct yd_prediction:
        const char *data
        Py_ssize_t row_stride
        Py_ssize_t col_stride
        int num_classes
        int num_anchors

    ctypedef struct yd_params:
        float conf_threshold
        double iou_threshold
        int max_detections
        const uint8_t *class_mask
        int max_nms
        double scale
        double pad_left
        double pad_top
        int src_w
        int src_h

    int yd_capacity(const yd_prediction *pred, const yd_params *params)
    size_t yd_scratch_nbytes(const yd_prediction *pred, const yd_params *params)
    int yd_decode(const yd_prediction *pred, const yd_params *params, void *scratch,
                  float *boxes, float *scores, int32_t *class_ids)
