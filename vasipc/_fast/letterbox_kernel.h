/* letterbox_kernel.h: the fused letterbox pass, frame pixels -> float32 NCHW RGB in [0, 1].
 *
 * One pass over the output rows: bilinear taps with OpenCV's INTER_LINEAR geometry and
 * fixed-point weights, colour conversion at the taps only (BT.601 limited range for
 * NV12/I420, exactly as OpenCV's COLOR_YUV2RGB_NV12/_I420; a channel swap for BGR24),
 * the blend, /255, written straight into three planes; the border is filled with 114/255.
 * The arithmetic is OpenCV's (converted taps are uint8, the blend is its SIMD fixed-point
 * formula), so the result equals cvtColor -> resize -> copyMakeBorder -> /255 bit for bit
 * (OpenCV 5.0; an OpenCV whose scalar tail loop rounds differently: within 1/255).
 *
 * Use: fill the frame and output fields of an lb_job, lb_plan() it into
 * lb_scratch_nbytes() bytes of scratch, then lb_run() it (the only step that reads the
 * frame: run it inside vas_sigbus_guard_run() when the frame is a file mapping).
 * Arguments are validated by the caller (letterbox.pyx); nothing here checks them.
 */
#ifndef VASIPC_LETTERBOX_KERNEL_H
#define VASIPC_LETTERBOX_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The frame header's pixel_format codes (CONTRACT 5.1). */
enum vas_pixel_format { VAS_NV12 = 0, VAS_I420 = 1, VAS_BGR24 = 2, VAS_RGB24 = 3 };

typedef struct lb_job {
    /* The source frame: its first byte, layout per CONTRACT 5.3. */
    const uint8_t *frame;
    int format;             /* enum vas_pixel_format */
    int width, height;      /* pixels; even for NV12/I420 */
    size_t stride;          /* bytes per row of the first plane; I420 chroma rows are stride/2 */

    /* The destination: 3 C-contiguous float planes (R, G, B) of out_h rows x out_w. */
    float *out;
    int out_w, out_h;
    /* The resized image occupies rows [top, top+new_h) and columns [left, left+new_w). */
    int new_w, new_h, left, top;

    /* Set by lb_plan(), pointing into the scratch. Per output column: source columns of
     * the two taps and their weights (sum 2048); per output row: same for source rows. */
    int32_t *col_x0, *col_x1, *col_w0, *col_w1;
    int32_t *row_y0, *row_y1, *row_w0, *row_w1;
    int32_t *hrow[2];       /* two source rows after the horizontal pass: R, G, B x new_w */
    int32_t *taps;          /* one source row's tap bytes, gathered: 6 x new_w */
    int one_col_tap;        /* every col_w1 is 0 (e.g. an exact 3x downscale): skip tap 2 */
} lb_job;

/* Bytes a frame occupies from its first byte; 0 for an unknown format. */
size_t lb_frame_nbytes(int format, size_t width, size_t height, size_t stride);

/* Scratch lb_plan() needs for this job's new_w x new_h (int32-aligned, e.g. malloc). */
size_t lb_scratch_nbytes(const lb_job *job);

/* Computes the tap tables into scratch. Reads no pixels. */
void lb_plan(lb_job *job, void *scratch);

/* Runs the planned job (an lb_job *, typed void * to be a vas_guarded_fn). */
void lb_run(void *job);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_LETTERBOX_KERNEL_H */
