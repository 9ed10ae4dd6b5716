/* letterbox_kernel.c: the fused letterbox pass (see letterbox_kernel.h).
 *
 * Per output row: the horizontal pass of its two source rows (kept in two row buffers,
 * so an upscale computes each source row once; skipped when the second row's weight is
 * 0), then the vertical blend straight into the three float planes. The horizontal pass
 * gathers the tap bytes with scalar loads, then converts and weighs them in a loop over
 * contiguous arrays that vectorises (AVX2 where the CPU has it: vector_clones.h).
 *
 * One body serves the four pixel formats: the per-format parts (where a row's planes
 * start, which bytes a tap reads, whether it needs YUV -> RGB) are always-inline
 * functions of a `format` argument, and lb_run() calls the row loop with a constant, so
 * the compiler emits a specialised loop for each with no per-pixel branch on the format.
 */
#include "letterbox_kernel.h"

#include <math.h>

#include "vas_debug.h"
#include "vector_clones.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* OpenCV's fixed-point resize: weights are 1.0 = 2048 (INTER_RESIZE_COEF_BITS = 11). */
#define WEIGHT_ONE 2048

/* OpenCV's BT.601 limited-range YUV -> RGB, 20-bit fixed point (color_yuv.simd.hpp). */
#define YUV_SHIFT 20
#define YUV_CY 1220542   /* 1.164 */
#define YUV_CUB 2116026  /* 2.018 */
#define YUV_CUG (-409993)
#define YUV_CVG (-852492)
#define YUV_CVR 1673527  /* 1.596 */
#define YUV_HALF (1 << (YUV_SHIFT - 1))

size_t lb_frame_nbytes(int format, size_t width, size_t height, size_t stride)
{
    (void)width;
    switch (format) {
    case VAS_NV12: return stride * height + stride * (height / 2);
    case VAS_I420: return stride * height + 2 * (stride / 2) * (height / 2);
    case VAS_BGR24:
    case VAS_RGB24: return stride * height;
    default: return 0;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Plan: the tap tables, computed as OpenCV's resize computes them (float positions from  */
/* a double scale, weights rounded half-to-even), so every weight is the same integer.   */

size_t lb_scratch_nbytes(const lb_job *job)
{
    size_t cols = (size_t)job->new_w, rows = (size_t)job->new_h;
    return sizeof(int32_t) * (4 * cols + 4 * rows + 2 * 3 * cols + 6 * cols);
}

/* Source position of destination index d: OpenCV's (d + 0.5) * scale - 0.5, as a float,
 * split into an integer index and a fraction. scale is 1 / (dst/src), as OpenCV forms it. */
static void source_position(int d, double scale, int *index, float *fraction)
{
    float f = (float)((d + 0.5) * scale - 0.5);
    int i = (int)floorf(f);
    *index = i;
    *fraction = f - (float)i;
}

static void weight_pair(float fraction, int32_t *w0, int32_t *w1)
{
    *w0 = (int32_t)lrintf((1.0f - fraction) * WEIGHT_ONE);
    *w1 = (int32_t)lrintf(fraction * WEIGHT_ONE);
}

void lb_plan(lb_job *job, void *scratch)
{
    int32_t *p = (int32_t *)scratch;
    const int nw = job->new_w, nh = job->new_h;
    job->col_x0 = p; p += nw;
    job->col_x1 = p; p += nw;
    job->col_w0 = p; p += nw;
    job->col_w1 = p; p += nw;
    job->row_y0 = p; p += nh;
    job->row_y1 = p; p += nh;
    job->row_w0 = p; p += nh;
    job->row_w1 = p; p += nh;
    job->hrow[0] = p; p += 3 * nw;
    job->hrow[1] = p; p += 3 * nw;
    job->taps = p;

    /* Columns: a position left of pixel 0 or right of the last one takes that pixel
     * alone (weight 2048, 0), as OpenCV clamps x. */
    const double scale_x = 1.0 / ((double)nw / job->width);
    const int last_x = job->width - 1;
    int one_tap = 1;
    for (int dx = 0; dx < nw; dx++) {
        int sx;
        float fx;
        source_position(dx, scale_x, &sx, &fx);
        if (sx < 0) {
            sx = 0;
            fx = 0.0f;
        }
        if (sx >= last_x) {
            job->col_x0[dx] = job->col_x1[dx] = last_x;
            job->col_w0[dx] = WEIGHT_ONE;
            job->col_w1[dx] = 0;
            continue;
        }
        VAS_DEBUG_ASSERT(sx >= 0 && sx + 1 <= last_x);
        job->col_x0[dx] = sx;
        job->col_x1[dx] = sx + 1;
        weight_pair(fx, &job->col_w0[dx], &job->col_w1[dx]);
        one_tap &= job->col_w1[dx] == 0;
    }
    job->one_col_tap = one_tap;

    /* Rows: OpenCV keeps the fraction and clamps the row indices instead. */
    const double scale_y = 1.0 / ((double)nh / job->height);
    const int last_y = job->height - 1;
    for (int dy = 0; dy < nh; dy++) {
        int sy;
        float fy;
        source_position(dy, scale_y, &sy, &fy);
        job->row_y0[dy] = sy < 0 ? 0 : (sy > last_y ? last_y : sy);
        job->row_y1[dy] = sy + 1 < 0 ? 0 : (sy + 1 > last_y ? last_y : sy + 1);
        weight_pair(fy, &job->row_w0[dy], &job->row_w1[dy]);
        VAS_DEBUG_ASSERT(job->row_y0[dy] >= 0 && job->row_y1[dy] <= last_y);
        VAS_DEBUG_ASSERT(job->row_w0[dy] + job->row_w1[dy] == WEIGHT_ONE);
    }
}

/* ------------------------------------------------------------------------------------ */
/* The per-format parts.                                                                  */

/* One source row's planes: packed pixels or luma, then chroma (U, V; NV12: UV pairs). */
typedef struct {
    const uint8_t *luma, *u, *v;
} source_row;

static ALWAYS_INLINE source_row row_planes(const lb_job *job, int format, int y)
{
    const size_t stride = job->stride;
    const size_t luma_bytes = stride * (size_t)job->height;
    const size_t chroma_row = (size_t)(y >> 1);  /* chroma is subsampled 2x2 */
    source_row r;
    r.luma = job->frame + (size_t)y * stride;
    r.u = r.v = NULL;
    if (format == VAS_NV12) {
        r.u = job->frame + luma_bytes + chroma_row * stride;
        r.v = r.u + 1;
    } else if (format == VAS_I420) {
        const size_t chroma_stride = stride / 2;
        r.u = job->frame + luma_bytes + chroma_row * chroma_stride;
        r.v = job->frame + luma_bytes + chroma_stride * (size_t)(job->height / 2)
              + chroma_row * chroma_stride;
    }
    return r;
}

static ALWAYS_INLINE int clamp_u8(int v)
{
    return v < 0 ? 0 : (v > 255 ? 255 : v);
}

/* BT.601 limited range -> RGB of one pixel, rounded and clamped to uint8 as OpenCV
 * does: OpenCV converts the whole frame to uint8 RGB before resizing, so the taps are
 * rounded the same way here. */
static ALWAYS_INLINE void yuv_to_rgb(int luma, int u, int v, int *red, int *green, int *blue)
{
    const int y = (luma > 16 ? luma - 16 : 0) * YUV_CY;
    u -= 128;
    v -= 128;
    *red = clamp_u8((y + YUV_HALF + YUV_CVR * v) >> YUV_SHIFT);
    *green = clamp_u8((y + YUV_HALF + YUV_CVG * v + YUV_CUG * u) >> YUV_SHIFT);
    *blue = clamp_u8((y + YUV_HALF + YUV_CUB * u) >> YUV_SHIFT);
}

/* The three bytes of source pixel x in row r: Y, U, V (nearest chroma: one U,V per 2x2
 * block, NV12 interleaves them) or R, G, B (a channel swap for BGR24). */
static ALWAYS_INLINE void tap_bytes(int format, source_row r, int x, int32_t *c0, int32_t *c1,
                                    int32_t *c2)
{
    if (format == VAS_NV12 || format == VAS_I420) {
        const int c = format == VAS_NV12 ? (x & ~1) : (x >> 1);
        *c0 = r.luma[x];
        *c1 = r.u[c];
        *c2 = r.v[c];
    } else {
        const uint8_t *px = r.luma + 3 * (size_t)x;
        const int swap = format == VAS_BGR24;
        *c0 = px[swap ? 2 : 0];
        *c1 = px[1];
        *c2 = px[swap ? 0 : 2];
    }
}

/* ------------------------------------------------------------------------------------ */
/* The pass.                                                                              */

/* Colour conversion (YUV formats) and weighting of one row's gathered taps: taps holds
 * six planes of n (tap 0's Y,U,V or R,G,B, then tap 1's), out three (R, G, B). A
 * function of its own so that `restrict` tells the compiler the planes do not overlap:
 * it vectorises this loop. */
static ALWAYS_INLINE void weigh_taps(int format, int two_taps, int n,
                                     const int32_t *restrict taps,
                                     const int32_t *restrict w0,
                                     const int32_t *restrict w1, int32_t *restrict out)
{
    const int yuv = format == VAS_NV12 || format == VAS_I420;
    for (int i = 0; i < n; i++) {
        int r0 = taps[i], g0 = taps[n + i], b0 = taps[2 * n + i];
        if (yuv)
            yuv_to_rgb(taps[i], taps[n + i], taps[2 * n + i], &r0, &g0, &b0);
        if (two_taps) {
            int r1 = taps[3 * n + i], g1 = taps[4 * n + i], b1 = taps[5 * n + i];
            if (yuv)
                yuv_to_rgb(taps[3 * n + i], taps[4 * n + i], taps[5 * n + i], &r1, &g1, &b1);
            out[i] = r0 * w0[i] + r1 * w1[i];
            out[n + i] = g0 * w0[i] + g1 * w1[i];
            out[2 * n + i] = b0 * w0[i] + b1 * w1[i];
        } else {
            /* every w1 is 0, so every w0 is 2048 */
            out[i] = r0 * WEIGHT_ONE;
            out[n + i] = g0 * WEIGHT_ONE;
            out[2 * n + i] = b0 * WEIGHT_ONE;
        }
    }
}

/* The tap bytes of one source row: taps gets six planes of n (tap 0's Y,U,V or R,G,B,
 * then tap 1's). Scalar loads; `restrict` lets the loop keep its pointers in registers. */
static ALWAYS_INLINE void gather_taps(int format, int two_taps, source_row r, int n,
                                      const int32_t *restrict x0,
                                      const int32_t *restrict x1, int32_t *restrict taps)
{
    for (int i = 0; i < n; i++) {
        tap_bytes(format, r, x0[i], &taps[i], &taps[n + i], &taps[2 * n + i]);
        if (two_taps)
            tap_bytes(format, r, x1[i], &taps[3 * n + i], &taps[4 * n + i], &taps[5 * n + i]);
    }
}

/* Horizontal pass over source row y: per output column and channel, tap0*w0 + tap1*w1,
 * into out as three planes (R, G, B) of new_w. First the gather (scalar loads), then the
 * arithmetic on contiguous arrays, which vectorises. */
static ALWAYS_INLINE void horizontal_pass(const lb_job *job, int format, int two_taps, int y,
                                          int32_t *out)
{
    gather_taps(format, two_taps, row_planes(job, format, y), job->new_w, job->col_x0,
                job->col_x1, job->taps);
    weigh_taps(format, two_taps, job->new_w, job->taps, job->col_w0, job->col_w1, out);
}

/* Vertical blend of two horizontal-pass rows into one output row, then /255. The
 * rounding is OpenCV's SIMD path (VResizeLinearVec_32s8u): each product is taken as a
 * 16x16-bit multiply-high of the row value >> 4, then (sum + 2) >> 2. The float is
 * value / 255.0f, the same float numpy's astype(float32) / 255 gives. */
static ALWAYS_INLINE void vertical_pass(const int32_t *restrict h0,
                                        const int32_t *restrict h1, int w0, int w1,
                                        float *restrict dst, int n)
{
    for (int i = 0; i < n; i++) {
        int v = (((w0 * (h0[i] >> 4)) >> 16) + ((w1 * (h1[i] >> 4)) >> 16) + 2) >> 2;
        v = v > 255 ? 255 : v;
        dst[i] = (float)v / 255.0f;
    }
}

static ALWAYS_INLINE void fill(float *dst, size_t n, float value)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = value;
}

/* Source row y after the horizontal pass. The two buffers keep the last two rows, so an
 * upscale (several output rows per source row pair) computes each source row once; the
 * buffer refilled is the one not holding `keep` (the other row the caller needs). */
typedef struct {
    int row[2];
} hrow_cache;

static ALWAYS_INLINE const int32_t *source_hrow(const lb_job *job, int format, int two_taps,
                                                hrow_cache *cache, int y, int keep)
{
    if (cache->row[0] == y)
        return job->hrow[0];
    if (cache->row[1] == y)
        return job->hrow[1];
    const int slot = cache->row[0] == keep ? 1 : 0;
    horizontal_pass(job, format, two_taps, y, job->hrow[slot]);
    cache->row[slot] = y;
    return job->hrow[slot];
}

static ALWAYS_INLINE void run_rows(const lb_job *job, int format, int two_taps)
{
    const float pad = 114.0f / 255.0f;  /* copyMakeBorder(114), then /255 */
    const size_t out_w = (size_t)job->out_w, plane = out_w * (size_t)job->out_h;
    const int nw = job->new_w, left = job->left, right = job->out_w - job->left - job->new_w;
    hrow_cache cache = {{-1, -1}};

    for (int oy = 0; oy < job->out_h; oy++) {
        float *dst[3];
        for (int c = 0; c < 3; c++)
            dst[c] = job->out + c * plane + (size_t)oy * out_w;
        const int dy = oy - job->top;
        if (dy < 0 || dy >= job->new_h) {
            for (int c = 0; c < 3; c++)
                fill(dst[c], out_w, pad);
            continue;
        }
        for (int c = 0; c < 3; c++) {
            fill(dst[c], (size_t)left, pad);
            fill(dst[c] + left + nw, (size_t)right, pad);
        }

        const int y0 = job->row_y0[dy], y1 = job->row_y1[dy];
        const int w0 = job->row_w0[dy], w1 = job->row_w1[dy];
        const int32_t *h0 = source_hrow(job, format, two_taps, &cache, y0, y1);
        /* With w1 == 0 the second row does not count: skip its horizontal pass. */
        const int32_t *h1 = (w1 == 0 || y1 == y0)
                                ? h0
                                : source_hrow(job, format, two_taps, &cache, y1, y0);
        for (int c = 0; c < 3; c++)
            vertical_pass(h0 + c * nw, h1 + c * nw, w0, w1, dst[c] + left, nw);
    }
}

/* The row loop specialised for one format (a constant) and tap count, compiled for AVX2
 * too (vector_clones.h). */
static VAS_VECTOR_CLONES void run_nv12(const lb_job *job)
{
    if (job->one_col_tap)
        run_rows(job, VAS_NV12, 0);
    else
        run_rows(job, VAS_NV12, 1);
}

static VAS_VECTOR_CLONES void run_i420(const lb_job *job)
{
    if (job->one_col_tap)
        run_rows(job, VAS_I420, 0);
    else
        run_rows(job, VAS_I420, 1);
}

static VAS_VECTOR_CLONES void run_packed(const lb_job *job)
{
    const int format = job->format == VAS_BGR24 ? VAS_BGR24 : VAS_RGB24;
    if (job->one_col_tap)
        run_rows(job, format, 0);
    else
        run_rows(job, format, 1);
}

void lb_run(void *arg)
{
    const lb_job *job = (const lb_job *)arg;
    switch (job->format) {
    case VAS_NV12: run_nv12(job); break;
    case VAS_I420: run_i420(job); break;
    case VAS_BGR24:
    case VAS_RGB24: run_packed(job); break;
    default: break;
    }
}
