/* decode_kernel.h: one image of a detection model's output -> its final detections.
 *
 * One decoder for every detection layout (issue 10): the output is [N, F] logically (one
 * row per candidate box, any strides), and a layout says where the box, the scores and
 * the angle sit. Per row (or per row x class pair) a score and a class; keep score >=
 * conf_threshold whose class passes the class mask; order by score descending (ties:
 * lower candidate index first); keep the first max_nms (Ultralytics' cap); then greedy
 * per-class NMS, Ultralytics' rotated fast NMS, or none; the first max_detections
 * survive. Boxes come back in the source frame, normalised, with the candidate row each
 * came from (extras such as mask coefficients or keypoints are gathered by it).
 * Arguments are validated by the caller (decode.pyx).
 */
#ifndef VASIPC_DECODE_KERNEL_H
#define VASIPC_DECODE_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Ultralytics' max_nms: candidates beyond the best 30000 never reach NMS. */
#define DK_MAX_NMS 30000

enum { DK_BOX_CXCYWH = 0, DK_BOX_XYXY = 1 };
enum {
    DK_SCORE_MAX_CLASS = 0,   /* best of nc class fields (first maximum) */
    DK_SCORE_OBJ_X_CLASS = 1, /* best of obj * class, per class in float32 (YOLOv5) */
    DK_SCORE_FIELD = 2,       /* score and class read from two fields (end-to-end exports) */
    DK_SCORE_PAIRS = 3        /* every (row, class) pair is a candidate (DETR top-k) */
};
enum { DK_NMS_NONE = 0, DK_NMS_CLASS = 1, DK_NMS_ROTATED = 2 };

typedef struct {
    int num_fields;           /* F: fields per row */
    int num_classes;          /* nc >= 1 */
    int box_format;           /* DK_BOX_*: 4 fields from box_offset, input pixels after scale */
    int box_offset;
    float box_scale_x;        /* multiplies the x and w (x1, x2) fields, float32 */
    float box_scale_y;        /* multiplies the y and h (y1, y2) fields */
    int score_mode;           /* DK_SCORE_* */
    int class_offset;         /* first of the nc class fields (MAX_CLASS, OBJ_X_CLASS, PAIRS) */
    int obj_field;            /* OBJ_X_CLASS */
    int score_field;          /* FIELD */
    int class_field;          /* FIELD: the class as a float holding an integer */
    int sigmoid;              /* logistic on the class scores (MAX_CLASS: the best; PAIRS) */
    int angle_field;          /* >= 0: rotated boxes, cx, cy, w, h + angle (radians) */
    int nms;                  /* DK_NMS_* */
    int max_nms;              /* candidate cap before NMS (DK_MAX_NMS) */
} dk_layout;

typedef struct {
    const char *data;         /* element [row, field] at data + row*row_stride + field*field_stride */
    ptrdiff_t row_stride;     /* bytes */
    ptrdiff_t field_stride;   /* bytes */
    int num_rows;             /* N >= 0; PAIRS: N * nc fits an int */
} dk_prediction;

typedef struct {
    float conf_threshold;
    double iou_threshold;     /* NMS_CLASS: compared in double (torchvision); ROTATED: float32 */
    int max_detections;       /* >= 0 */
    const uint8_t *class_mask;/* NULL: every class; else nc flags, nonzero = keep */
    /* Input pixels -> source: x_src = (x - pad_left) / scale_x, clipped to [0, src_w]. */
    double scale_x, scale_y, pad_left, pad_top;
    int src_w, src_h;
} dk_params;

typedef struct {
    float *boxes;             /* [k][4] x_min, y_min, x_max, y_max in [0, 1] */
    float *scores;            /* [k] descending */
    int32_t *class_ids;       /* [k] */
    int32_t *rows;            /* [k] candidate row */
    float *rotated;           /* [k][5] cx, cy, w, h (source pixels), angle; rotated layouts */
    float *corners;           /* [k][8] x0, y0, ..., x3, y3 normalised; rotated layouts */
} dk_outputs;

/* Largest number of detections a call can return: the capacity of the outputs. */
int dk_capacity(const dk_layout *layout, const dk_prediction *pred, const dk_params *params);

/* Scratch dk_decode() needs (8-byte aligned, e.g. malloc). */
size_t dk_scratch_nbytes(const dk_layout *layout, const dk_prediction *pred,
                         const dk_params *params);

/* Decodes one image into out (k <= dk_capacity() entries). Returns k. */
int dk_decode(const dk_layout *layout, const dk_prediction *pred, const dk_params *params,
              void *scratch, const dk_outputs *out);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_DECODE_KERNEL_H */
