/* yolo_decode.h: YOLOv8 detect-head decode + per-class greedy NMS for one image.
 *
 * The output is [4 + nc, N]: per anchor cx, cy, w, h (input pixels) then nc class
 * scores (CONTRACT 6). Per anchor the best class (first maximum) and its score; keep
 * score >= conf_threshold whose best class passes the class mask; sort by score
 * descending (ties: lower anchor first); keep the first max_nms (Ultralytics' cap);
 * greedy NMS per class (suppressed when IoU with a kept box of its class > iou_threshold);
 * first max_detections kept. Boxes come back with the letterbox undone, clipped to the
 * source frame and normalised to [0, 1].
 * Arguments are validated by the caller (yolo.pyx).
 */
#ifndef VASIPC_YOLO_DECODE_H
#define VASIPC_YOLO_DECODE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Ultralytics' max_nms: candidates beyond the best 30000 never reach NMS. */
#define YD_MAX_NMS 30000

typedef struct {
    const char *data;       /* element [r, n] at data + r*row_stride + n*col_stride */
    ptrdiff_t row_stride;   /* bytes */
    ptrdiff_t col_stride;   /* bytes */
    int num_classes;        /* nc >= 1: rows are 4 + nc */
    int num_anchors;        /* N >= 0 */
} yd_prediction;

typedef struct {
    float conf_threshold;
    double iou_threshold;           /* compared with the float32 IoU in double, as torchvision */
    int max_detections;             /* >= 0 */
    const uint8_t *class_mask;      /* NULL: every class; else nc flags, nonzero = keep */
    int max_nms;                    /* candidate cap before NMS (YD_MAX_NMS) */
    /* Undo the letterbox: x_src = (x - pad_left) / scale, clipped to [0, src_w], / src_w. */
    double scale, pad_left, pad_top;
    int src_w, src_h;
} yd_params;

/* Largest number of detections a call can return: the capacity of the outputs. */
int yd_capacity(const yd_prediction *pred, const yd_params *params);

/* Scratch yd_decode() needs (8-byte aligned, e.g. malloc). */
size_t yd_scratch_nbytes(const yd_prediction *pred, const yd_params *params);

/* Decodes one image into boxes[k][4] (x_min, y_min, x_max, y_max), scores[k] and
 * class_ids[k], k <= yd_capacity(), sorted by score descending. Returns k. */
int yd_decode(const yd_prediction *pred, const yd_params *params, void *scratch,
              float *boxes, float *scores, int32_t *class_ids);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_YOLO_DECODE_H */
