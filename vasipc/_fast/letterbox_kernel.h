/* letterbox_kernel.h: the fused preprocessing pass, frame pixels -> float32 NCHW planes.
 *
 * One pass over the output rows: bilinear taps with OpenCV's INTER_LINEAR geometry and
 * fixed-point weights, colour conversion at the taps only (BT.601 limited range for
 * NV12/NV21/I420, exactly as OpenCV's COLOR_YUV2RGB_NV12/_NV21/_I420; the R, G, B bytes
 * of a packed pixel, alpha ignored; GRAY8's byte as all three, as COLOR_GRAY2RGB),
 * the blend, /255, then per plane (v - mean) * inv_std, written straight into three
 * planes in RGB or BGR order; what the resized image does not cover is the pad value,
 * normalized the same way. The resampling filter is a parameter: LB_BILINEAR (the above)
 * or LB_ANTIALIAS, PIL's Image.resize(BILINEAR) (what torchvision's Resize does to a PIL
 * image: a triangle filter widened by the downscale factor, two separable passes in
 * 22-bit fixed point with uint8 between them, the vertical pass first when the height
 * shrinks by more than twice the width, as Pillow >= 12.3 does) of the RGB uint8 frame
 * the colour conversion gives, bit for bit. The placement is general: the frame resized to new_w x new_h
 * at (left, top), which may be negative or overhang the output (a centre crop), so one
 * kernel serves letterbox, stretch and centre crop. The arithmetic is OpenCV's (converted
 * taps are uint8, the blend is its SIMD fixed-point formula), so with mean 0 and inv_std 1
 * the result equals cvtColor -> resize -> copyMakeBorder -> /255 bit for bit (OpenCV 5.0;
 * an OpenCV whose scalar tail loop rounds differently: within 1/255).
 *
 * Use: fill the frame and output fields of an lb_job, lb_plan() it into
 * lb_scratch_nbytes() bytes of scratch, then lb_run() it (the only step that reads the
 * frame; it runs every worker thread under vas_sigbus_guard_run(), so a frame file
 * truncated under its mapping is a return code).
 * Arguments are validated by the caller (letterbox.pyx); nothing here checks them.
 */
#ifndef VASIPC_LETTERBOX_KERNEL_H
#define VASIPC_LETTERBOX_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The frame header's pixel_format codes (docs/contract.md 5.1); X: a padding byte where
 * A has alpha, both ignored. */
enum vas_pixel_format {
    VAS_NV12 = 0, VAS_I420 = 1, VAS_BGR24 = 2, VAS_RGB24 = 3, VAS_NV21 = 4, VAS_BGRA = 5,
    VAS_BGRX = 6, VAS_RGBA = 7, VAS_RGBX = 8, VAS_GRAY8 = 9
};

/* The order of the output planes. */
enum lb_channel_order { LB_RGB = 0, LB_BGR = 1 };

/* The resampling filter. */
enum lb_filter { LB_BILINEAR = 0, LB_ANTIALIAS = 1 };

typedef struct lb_job {
    /* The source frame: its first byte, layout per docs/contract.md 5.3. */
    const uint8_t *frame;
    int format;             /* enum vas_pixel_format */
    int width, height;      /* pixels; even for NV12/NV21/I420 */
    size_t stride;          /* bytes per row of the first plane; I420 chroma rows are stride/2 */

    /* The destination: 3 C-contiguous float planes of out_h rows x out_w, in `order`. */
    float *out;
    int out_w, out_h;
    /* The resized image occupies rows [top, top+new_h) and columns [left, left+new_w);
     * only the part inside the output is computed (left, top may be negative). */
    int new_w, new_h, left, top;
    int order;              /* enum lb_channel_order */
    int filter;             /* enum lb_filter */
    /* Per output plane: value = (v / 255 - mean) * inv_std; mean 0, inv_std 1 give v / 255
     * exactly. The pad value (0..255) goes through the same formula. */
    float mean[3], inv_std[3];
    int pad_value;

    /* Set by lb_plan(). The visible window: resized columns [vis_x, vis_x + vis_w) land
     * at output columns [vis_left, vis_left + vis_w), rows likewise. */
    int vis_x, vis_w, vis_left, vis_y, vis_h, vis_top;
    float pad[3];           /* per output plane */
    int plain;              /* every mean 0 and inv_std 1: values are v / 255 */
    /* Pointing into the scratch, per visible column: source columns of the two taps and
     * their weights (sum 2048); per visible row: same for source rows. */
    int32_t *col_x0, *col_x1, *col_w0, *col_w1;
    int32_t *row_y0, *row_y1, *row_w0, *row_w1;
    int32_t *workers;       /* per worker thread: its row buffers */
    int threads;            /* workers, 1..LB_MAX_THREADS and <= vis_h */
    int one_col_tap;        /* every col_w1 is 0 (e.g. an exact 3x downscale): skip tap 2 */
    int chroma_wide;        /* YUV: columns [0, chroma_wide) read chroma in one load */
    int chroma_cache;       /* YUV: convert chroma once per chroma row (lb_plan) */
    int col_pairs;          /* two taps, col_x0[i] = col_x0[0] + 2i, col_x0[0] even */

    /* LB_ANTIALIAS only (the tables above are then unused): per visible column, its
     * source columns [aa_col_first, + aa_col_count) and their weights (aa_kx apiece,
     * sum ~2^22); rows likewise. Source columns [aa_span_x, + aa_span_w) are the ones
     * any visible column reads; aa_ring: rows a worker keeps after the horizontal pass. */
    int32_t *aa_col_first, *aa_col_count, *aa_col_k;
    int32_t *aa_row_first, *aa_row_count, *aa_row_k;
    int aa_kx, aa_ky, aa_span_x, aa_span_w, aa_ring;
    int aa_vertical_first;  /* the vertical pass runs first (Pillow's rule) */
    size_t worker_words;    /* int32 words of scratch per worker thread */
} lb_job;

/* Bytes a frame occupies from its first byte; 0 for an unknown format. */
size_t lb_frame_nbytes(int format, size_t width, size_t height, size_t stride);

/* Most worker threads one job may use. */
#define LB_MAX_THREADS 64

/* Scratch lb_plan() needs for this job's placement and `threads` workers (int32-aligned,
 * e.g. malloc). The resized image must overlap the output by at least one pixel. */
size_t lb_scratch_nbytes(const lb_job *job, int threads);

/* Computes the visible window, the pad values and the tap tables into scratch. Reads no
 * pixels. threads: 1..LB_MAX_THREADS; at most one per visible row is used. */
void lb_plan(lb_job *job, void *scratch, int threads);

/* Runs the planned job: the output rows split in `threads` ranges, one per thread (the
 * caller's thread takes the first, the others go to a persistent pool of threads, started
 * on first use, grown to the largest count asked for, shared by concurrent callers, reset
 * in a forked child), each read under a SIGBUS guard of its own (sigbus_guard.h).
 * Returns, once every range is done, VAS_GUARD_OK, VAS_GUARD_SIGBUS when any range
 * faulted, or VAS_GUARD_INSTALL_FAILED with the errno in *install_errno. Allocates
 * nothing inside the guards; ranges no pool thread takes (pool busy with another call,
 * pthread_create failing) run on the caller's thread. Thread-safe. */
int lb_run(lb_job *job, int *install_errno);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_LETTERBOX_KERNEL_H */
