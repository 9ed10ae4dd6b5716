# decode.pxd: the C API behind decode.pyx (the detection decoder, decode_kernel.h).
from libc.stdint cimport int32_t, uint8_t


cdef extern from "decode_kernel.h" nogil:
    enum:
        DK_MAX_NMS
        DK_BOX_CXCYWH
        DK_BOX_XYXY
        DK_SCORE_MAX_CLASS
        DK_SCORE_OBJ_X_CLASS
        DK_SCORE_FIELD
        DK_SCORE_PAIRS
        DK_NMS_NONE
        DK_NMS_CLASS
        DK_NMS_ROTATED

    ctypedef struct dk_layout:
        int num_fields
        int num_classes
        int box_format
        int box_offset
        float box_scale_x
        float box_scale_y
        int score_mode
        int class_offset
        int obj_field
        int score_field
        int class_field
        int sigmoid
        int angle_field
        int nms
        int max_nms

    ctypedef struct dk_prediction:
        const char *data
        Py_ssize_t row_stride
        Py_ssize_t field_stride
        int num_rows

    ctypedef struct dk_params:
        float conf_threshold
        double iou_threshold
        int max_detections
        const uint8_t *class_mask
        double scale_x
        double scale_y
        double pad_left
        double pad_top
        int src_w
        int src_h

    ctypedef struct dk_outputs:
        float *boxes
        float *scores
        int32_t *class_ids
        int32_t *rows
        float *rotated
        float *corners

    int dk_capacity(const dk_layout *layout, const dk_prediction *pred, const dk_params *params)
    size_t dk_scratch_nbytes(const dk_layout *layout, const dk_prediction *pred,
                             const dk_params *params)
    int dk_decode(const dk_layout *layout, const dk_prediction *pred, const dk_params *params,
                  void *scratch, const dk_outputs *out)


cdef class DecodeLayout:
    cdef dk_layout c
