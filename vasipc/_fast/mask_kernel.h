/* mask_kernel.h: instance masks of a segmentation head for one detection, inside its box.
 *
 * Ultralytics 8.4's native-resolution masks (ops.process_mask_native, retina_masks=True):
 * logits = coefficients x prototypes (float32); the letterbox pad is cut from the logit
 * map as ops.scale_masks cuts it; the rest is resized bilinearly to the source frame as
 * torch's F.interpolate(mode="bilinear", align_corners=False) does on the CPU (float32
 * source indices, negative ones clamped to 0, rows interpolated along x first); pixels
 * whose index lies in [x1, x2) x [y1, y2) of the box are kept (ops.crop_mask's float
 * comparison) and thresholded at logit > 0 (sigmoid > 0.5).
 *
 * Only the box is computed: the logits of the prototype cells its pixels read, then each
 * column's stretches of rows that read the same cells, each uniform or flipping once
 * (mask_kernel.c), pixel by pixel only around NaN, inf or tiny logits. Out come either the
 * COCO compressed RLE of the whole src_h x src_w mask (pycocotools' column-major runs and
 * rleToString) or the outer contour of the mask's largest 8-connected part as OpenCV's
 * findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE) traces it. Arguments are validated by
 * the caller (masks.pyx).
 */
#ifndef VASIPC_MASK_KERNEL_H
#define VASIPC_MASK_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MK_RLE 0
#define MK_POLYGON 1

typedef struct {
    const char *data;   /* element [c, y, x] at data + c*c_stride + y*y_stride + x*x_stride */
    ptrdiff_t c_stride, y_stride, x_stride;  /* bytes */
    int channels, height, width;
} mk_protos;

/* The logit map without the letterbox pad, and its resize to the source frame. */
typedef struct {
    int top, left;          /* first kept prototype row and column */
    int in_h, in_w;         /* kept rows and columns */
    int src_w, src_h;
    float scale_x, scale_y; /* torch's in / out ratios, float32 */
} mk_geometry;

/* The pixels of one box and the cells of the cut logit map they interpolate from. */
typedef struct {
    int x0, x1, y0, y1;     /* pixels [x0, x1) x [y0, y1); empty when x0 == x1 or y0 == y1 */
    int cx0, cx1, cy0, cy1; /* cells [cx0, cx1) x [cy0, cy1) of the cut map */
} mk_box;

/* Fills g as ops.scale_masks cuts and resizes a proto_h x proto_w map for a src_w x
 * src_h frame. Returns 0, or -1 when the cut leaves no row or no column. */
int mk_geometry_init(mk_geometry *g, int proto_h, int proto_w, int src_w, int src_h);

/* The pixels of the box x1, y1, x2, y2 (finite, source pixels) and the cells they read. */
void mk_box_init(mk_box *b, const mk_geometry *g, const float xyxy[4]);

/* Scratch (8-byte aligned, e.g. malloc) mk_rle() or mk_polygon() needs for box b;
 * SIZE_MAX when it does not fit in size_t (or, for MK_POLYGON, when the box's width
 * times its height + 1 exceeds INT32_MAX). */
size_t mk_scratch_nbytes(const mk_geometry *g, const mk_box *b, int format);

/* coeffs: the detection's channels float32 coefficients, coefficient c at
 * coeffs + c*coeff_stride (bytes). */

/* The COCO compressed RLE string of the mask (not NUL-terminated), written inside
 * scratch; *counts points at it. Returns its length. */
size_t mk_rle(const mk_geometry *g, const mk_protos *p, const char *coeffs,
              ptrdiff_t coeff_stride, const mk_box *b, void *scratch, const char **counts);

/* Assembles the mask in scratch (as column runs), finds its largest 8-connected part
 * (ties: the first in raster order) and returns the number of points of its outer contour (0 for an empty
 * mask); mk_polygon_points() then writes them. */
size_t mk_polygon(const mk_geometry *g, const mk_protos *p, const char *coeffs,
                  ptrdiff_t coeff_stride, const mk_box *b, void *scratch);

/* After mk_polygon() on the same scratch: the n contour points as float32 pairs
 * (x / src_w, y / src_h), x and y pixel indices of the source frame. */
void mk_polygon_points(const mk_geometry *g, const mk_box *b, const void *scratch, float *points);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_MASK_KERNEL_H */
