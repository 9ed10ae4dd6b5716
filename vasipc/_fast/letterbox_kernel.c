/* letterbox_kernel.c: the fused letterbox pass (see letterbox_kernel.h).
 *
 * Per output row: the horizontal pass of its two source rows (kept in two row buffers,
 * so an upscale computes each source row once; skipped when the second row's weight is
 * 0), then the vertical blend straight into the three float planes.
 *
 * The horizontal pass gathers each column's taps with as few scalar loads as the layout
 * allows (two-tap columns always read the adjacent pair x, x + 1: one 16-bit luma load),
 * then converts and weighs them in loops over contiguous arrays that vectorise (AVX2
 * where the CPU has it: vector_clones.h). For YUV formats, when output rows blend two
 * source rows, the chroma half of the conversion (gather + three multiplies per tap) is
 * done once per chroma row and kept: the two rows usually share it (720p, 4K -> 640),
 * and the luma half is one multiply per tap. An exact 2:1 column ratio turns the gathers
 * into contiguous copies. The integers are OpenCV's, so the result is unchanged.
 *
 * Threads (lb_run): the output rows are split into ranges, one per worker, each with its
 * own row buffers and its own SIGBUS guard; ranges 1.. run on a persistent thread pool
 * (see "Threads" below).
 *
 * One body serves every pixel format: the per-format parts are always-inline functions
 * of a `format` argument, each reading the format's parameters (YUV 4:2:0 semi-planar
 * with its chroma order, or planar; packed with its bytes per pixel and the byte of each
 * of R, G, B in a pixel: BGR24, RGB24, the 4-byte BGRA/BGRx/RGBA/RGBx with alpha never
 * read, GRAY8 as one byte for all three), and the row loop is called with a constant,
 * so the compiler emits a specialised loop for each with no per-pixel branch on the
 * format.
 * The filter is such an argument too: LB_ANTIALIAS (PIL's resize, "Antialias" below)
 * shares the plan's visible window, the row loop, the borders, the normalization and
 * the threads, and replaces the two-tap passes by PIL's N-tap ones.
 */
#include "letterbox_kernel.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>

#include "sigbus_guard.h"

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

/* ------------------------------------------------------------------------------------ */
/* The formats' parameters: constants wherever `format` is one (the row loops).          */

static ALWAYS_INLINE int is_yuv(int format)
{
    return format == VAS_NV12 || format == VAS_NV21 || format == VAS_I420;
}

/* NV12, NV21: one chroma plane of interleaved pairs. */
static ALWAYS_INLINE int is_semiplanar(int format)
{
    return format == VAS_NV12 || format == VAS_NV21;
}

/* Semi-planar: the pair's first byte is V (NV21), not U. */
static ALWAYS_INLINE int chroma_vu(int format)
{
    return format == VAS_NV21;
}

/* Bytes per pixel of the first plane (luma for YUV). */
static ALWAYS_INLINE int pixel_bytes(int format)
{
    switch (format) {
    case VAS_BGR24:
    case VAS_RGB24: return 3;
    case VAS_BGRA:
    case VAS_BGRX:
    case VAS_RGBA:
    case VAS_RGBX: return 4;
    default: return 1;  /* YUV luma, GRAY8 */
    }
}

/* Packed formats: the byte of channel c (0 R, 1 G, 2 B) within a pixel. */
static ALWAYS_INLINE int channel_byte(int format, int c)
{
    if (format == VAS_GRAY8)
        return 0;
    const int bgr = format == VAS_BGR24 || format == VAS_BGRA || format == VAS_BGRX;
    return bgr ? 2 - c : c;
}

size_t lb_frame_nbytes(int format, size_t width, size_t height, size_t stride)
{
    (void)width;
    if (format < VAS_NV12 || format > VAS_GRAY8)
        return 0;
    if (is_semiplanar(format))
        return stride * height + stride * (height / 2);
    if (format == VAS_I420)
        return stride * height + 2 * (stride / 2) * (height / 2);
    return stride * height;
}

/* ------------------------------------------------------------------------------------ */
/* Plan: the tap tables, computed as OpenCV's resize computes them (float positions from  */
/* a double scale, weights rounded half-to-even), so every weight is the same integer.   */

/* The visible part of a resized extent of `size` placed at `offset` in an output extent
 * of `out`: resized indices [*first, *first + *count) at output [*at, *at + *count). */
static void visible_span(int offset, int size, int out, int *first, int *count, int *at)
{
    const int begin = offset < 0 ? -offset : 0;
    const int end = offset + size > out ? out - offset : size;
    *first = begin;
    *count = end - begin;
    *at = offset + begin;
}

static int visible_w(const lb_job *job)
{
    int first, count, at;
    visible_span(job->left, job->new_w, job->out_w, &first, &count, &at);
    return count;
}

static int visible_h(const lb_job *job)
{
    int first, count, at;
    visible_span(job->top, job->new_h, job->out_h, &first, &count, &at);
    return count;
}

/* PIL's filter geometry along one axis (precompute_coeffs): the scale as PIL forms it
 * from float box edges, the triangle's support widened to the scale on a downscale, and
 * the most taps a destination index can have. */
static double aa_scale(int in, int out)
{
    return (double)((float)in - 0.0f) / out;
}

static int aa_ksize(int in, int out)
{
    const double scale = aa_scale(in, out);
    return (int)ceil(scale < 1.0 ? 1.0 : scale) * 2 + 1;
}

/* Rows a worker keeps after the horizontal pass: an output row reads at most this many. */
static int aa_ring_rows(const lb_job *job)
{
    const int ky = aa_ksize(job->height, job->new_h);
    return ky < job->height ? ky : job->height;
}

/* Per worker, bilinear: two horizontal-pass rows (3 x vis_w int32 each), the tap words
 * (2 x vis_w) and one chroma row's colour terms (6 x vis_w). Antialias: the ring's row
 * tags, an int32 accumulator of 3 x max(width, vis_w), then bytes: the ring (3 x vis_w
 * per row), one converted source row and one vertical-pass row (3 x width each) and the
 * output row's values (3 x vis_w). */
static size_t worker_words(const lb_job *job, int vis_w)
{
    if (job->filter != LB_ANTIALIAS)
        return (2 * 3 + 2 + 6) * (size_t)vis_w;
    const size_t ring = (size_t)aa_ring_rows(job), w = (size_t)job->width, n = (size_t)vis_w;
    const size_t bytes = 3 * n * ring + 2 * 3 * w + 3 * n;
    return ring + 3 * (w > n ? w : n) + (bytes + 3) / 4;
}

/* Words of the tap tables. */
static size_t table_words(const lb_job *job, int cols, int rows)
{
    if (job->filter != LB_ANTIALIAS)
        return 4 * (size_t)cols + 4 * (size_t)rows;
    return (size_t)cols * (2 + (size_t)aa_ksize(job->width, job->new_w))
           + (size_t)rows * (2 + (size_t)aa_ksize(job->height, job->new_h));
}

size_t lb_scratch_nbytes(const lb_job *job, int threads)
{
    const int cols = visible_w(job), rows = visible_h(job);
    return sizeof(int32_t)
           * (table_words(job, cols, rows) + (size_t)threads * worker_words(job, cols));
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

/* v / 255 then the plane's normalization: every output value is this. value / 255.0f is
 * the float numpy's astype(float32) / 255 gives; a subtraction then a multiplication (no
 * a*b+c for the compiler to fuse) keep it exact for mean 0, inv_std 1. */
static ALWAYS_INLINE float normalize(int v, float mean, float inv_std)
{
    return ((float)v / 255.0f - mean) * inv_std;
}

/* PIL's coefficients (precompute_coeffs, normalize_coeffs_8bpc) of destination indices
 * [first, first + n) of an axis resized from `in` to `out`, in PIL's double arithmetic:
 * each index's source range [*start, + *count) and its weights, ksize apiece, as 22-bit
 * fixed point. Computed for the visible indices only: each index's are its own. */
#define AA_BITS 22

static double aa_triangle(double x)
{
    if (x < 0.0)
        x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static void aa_coeffs(int in, int out, int first, int n, int ksize, int32_t *start,
                      int32_t *count, int32_t *k)
{
    const double scale = aa_scale(in, out);
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = 1.0 * filterscale, ss = 1.0 / filterscale;
    for (int d = 0; d < n; d++) {
        const double center = 0.0 + (first + d + 0.5) * scale;
        int xmin = (int)(center - support + 0.5);
        int xmax = (int)(center + support + 0.5);
        xmin = xmin < 0 ? 0 : xmin;
        xmax = (xmax > in ? in : xmax) - xmin;
        /* The sum in PIL's order; each weight is computed again below, identically. */
        double ww = 0.0;
        for (int x = 0; x < xmax; x++)
            ww += aa_triangle((x + xmin - center + 0.5) * ss);
        int32_t *kd = k + (size_t)d * (size_t)ksize;
        for (int x = 0; x < ksize; x++) {
            double w = x < xmax ? aa_triangle((x + xmin - center + 0.5) * ss) : 0.0;
            if (ww != 0.0)
                w /= ww;
            kd[x] = (int32_t)(0.5 + w * (1 << AA_BITS));  /* w >= 0: PIL's positive branch */
        }
        start[d] = xmin;
        count[d] = xmax;
    }
}

static void aa_plan(lb_job *job, int32_t *p)
{
    const int nw = job->vis_w, nh = job->vis_h;
    job->aa_kx = aa_ksize(job->width, job->new_w);
    job->aa_ky = aa_ksize(job->height, job->new_h);
    job->aa_col_first = p; p += nw;
    job->aa_col_count = p; p += nw;
    job->aa_col_k = p; p += (size_t)nw * (size_t)job->aa_kx;
    job->aa_row_first = p; p += nh;
    job->aa_row_count = p; p += nh;
    job->aa_row_k = p; p += (size_t)nh * (size_t)job->aa_ky;
    job->workers = p;
    aa_coeffs(job->width, job->new_w, job->vis_x, nw, job->aa_kx, job->aa_col_first,
              job->aa_col_count, job->aa_col_k);
    aa_coeffs(job->height, job->new_h, job->vis_y, nh, job->aa_ky, job->aa_row_first,
              job->aa_row_count, job->aa_row_k);
    /* Source ranges start and end nondecreasing with the destination index. */
    job->aa_span_x = job->aa_col_first[0];
    job->aa_span_w = job->aa_col_first[nw - 1] + job->aa_col_count[nw - 1] - job->aa_span_x;
    job->aa_ring = aa_ring_rows(job);
    /* Pillow >= 12.3 (ImagingResampleInner): "If height is being scaled down more than
     * twice the amount the width is, run the vertical pass first". The order shows in
     * the result: the uint8 rounding between the passes. */
    const int dy = job->height - job->new_h, dx = job->width - job->new_w;
    job->aa_vertical_first = dy > 0 && dy > dx * 2;
    VAS_DEBUG_ASSERT(job->aa_span_w >= 1 && job->aa_span_w <= job->width);
}

void lb_plan(lb_job *job, void *scratch, int threads)
{
    int32_t *p = (int32_t *)scratch;
    visible_span(job->left, job->new_w, job->out_w, &job->vis_x, &job->vis_w, &job->vis_left);
    visible_span(job->top, job->new_h, job->out_h, &job->vis_y, &job->vis_h, &job->vis_top);
    VAS_DEBUG_ASSERT(job->vis_w >= 1 && job->vis_h >= 1);
    job->plain = 1;
    for (int c = 0; c < 3; c++) {
        job->pad[c] = normalize(job->pad_value, job->mean[c], job->inv_std[c]);
        job->plain &= job->mean[c] == 0.0f && job->inv_std[c] == 1.0f;
    }
    const int nw = job->vis_w, nh = job->vis_h;
    job->threads = threads < nh ? threads : nh;
    job->worker_words = worker_words(job, nw);
    if (job->filter == LB_ANTIALIAS) {
        aa_plan(job, p);
        return;
    }
    job->col_x0 = p; p += nw;
    job->col_x1 = p; p += nw;
    job->col_w0 = p; p += nw;
    job->col_w1 = p; p += nw;
    job->row_y0 = p; p += nh;
    job->row_y1 = p; p += nh;
    job->row_w0 = p; p += nh;
    job->row_w1 = p; p += nh;
    job->workers = p;

    /* Columns (the scale is the whole resized width's; the tables start at the first
     * visible one): a position left of pixel 0 or right of the last one takes that pixel
     * alone (weight 2048, 0), as OpenCV clamps x. */
    const double scale_x = 1.0 / ((double)job->new_w / job->width);
    const int last_x = job->width - 1;
    int one_tap = 1;
    for (int dx = 0; dx < nw; dx++) {
        int sx;
        float fx;
        source_position(job->vis_x + dx, scale_x, &sx, &fx);
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
    /* Two-tap columns always read the adjacent pair (x0, x0 + 1), so a tap pair is one
     * short load: a column clamped to the last pixel becomes (last - 1, last) weighted
     * (0, 2048), the same value. (width 1 clamps every column: one tap.) */
    if (!one_tap)
        for (int dx = 0; dx < nw; dx++)
            if (job->col_x0[dx] == last_x) {
                VAS_DEBUG_ASSERT(last_x >= 1 && job->col_w0[dx] == WEIGHT_ONE);
                job->col_x0[dx] = last_x - 1;
                job->col_w0[dx] = 0;
                job->col_w1[dx] = WEIGHT_ONE;
            }

    /* The leading columns whose chroma word is one load inside the row (gather_chroma):
     * x0 is nondecreasing, so they are a prefix. */
    int wide = 0;
    if (is_semiplanar(job->format))
        while (wide < nw && (size_t)(job->col_x0[wide] & ~1) + 4 <= job->stride)
            wide++;
    else if (job->format == VAS_I420)
        while (wide < nw && (size_t)(job->col_x0[wide] >> 1) + 2 <= job->stride / 2)
            wide++;
    job->chroma_wide = wide;
    /* An exact 2:1 column ratio (1280 -> 640) reads every pixel pair once, from an even
     * column: the gathers become contiguous copies. */
    int pairs = !one_tap && (job->col_x0[0] & 1) == 0;
    for (int dx = 1; pairs && dx < nw; dx++)
        pairs = job->col_x0[dx] == job->col_x0[0] + 2 * dx;
    job->col_pairs = pairs;

    /* Rows: OpenCV keeps the fraction and clamps the row indices instead. */
    const double scale_y = 1.0 / ((double)job->new_h / job->height);
    const int last_y = job->height - 1;
    for (int dy = 0; dy < nh; dy++) {
        int sy;
        float fy;
        source_position(job->vis_y + dy, scale_y, &sy, &fy);
        job->row_y0[dy] = sy < 0 ? 0 : (sy > last_y ? last_y : sy);
        job->row_y1[dy] = sy + 1 < 0 ? 0 : (sy + 1 > last_y ? last_y : sy + 1);
        weight_pair(fy, &job->row_w0[dy], &job->row_w1[dy]);
        VAS_DEBUG_ASSERT(job->row_y0[dy] >= 0 && job->row_y1[dy] <= last_y);
        VAS_DEBUG_ASSERT(job->row_w0[dy] + job->row_w1[dy] == WEIGHT_ONE);
    }

    /* The chroma half is kept per chroma row (horizontal_pass) when most output rows
     * blend two source rows: they often share a chroma row (720p, 4K -> 640), and even
     * when not (1440p: rows 4k+1, 4k+2) the split passes vectorise better. Output rows of
     * one source row each (1080p -> 640: exact 3:1) convert each tap whole, in one pass. */
    int two_rows = 0;
    for (int dy = 0; dy < nh; dy++)
        two_rows += job->row_w1[dy] != 0;
    job->chroma_cache = 2 * two_rows >= nh;
}

/* ------------------------------------------------------------------------------------ */
/* The per-format parts.                                                                  */

/* One source row's planes: packed pixels or luma, then chroma: U and V samples (the
 * planes, or within the pairs), and for NV12/NV21 the pairs' row. */
typedef struct {
    const uint8_t *luma, *u, *v, *pairs;
} source_row;

static ALWAYS_INLINE source_row row_planes(const lb_job *job, int format, int y)
{
    const size_t stride = job->stride;
    const size_t luma_bytes = stride * (size_t)job->height;
    const size_t chroma_row = (size_t)(y >> 1);  /* chroma is subsampled 2x2 */
    source_row r;
    r.luma = job->frame + (size_t)y * stride;
    r.u = r.v = r.pairs = NULL;
    if (is_semiplanar(format)) {
        r.pairs = job->frame + luma_bytes + chroma_row * stride;
        r.u = r.pairs + chroma_vu(format);
        r.v = r.pairs + !chroma_vu(format);
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

/* Little-endian composition of adjacent bytes: the compiler merges these into one load. */
static ALWAYS_INLINE uint32_t bytes2(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static ALWAYS_INLINE uint32_t bytes3(const uint8_t *p)
{
    return bytes2(p) | (uint32_t)p[2] << 16;
}

static ALWAYS_INLINE uint32_t bytes4(const uint8_t *p)
{
    return bytes3(p) | (uint32_t)p[3] << 24;
}

/* The tap bytes of source column x (and x + 1 with two_taps) in row r, packed in two
 * words, with as few loads as the layout allows (every byte read is inside the row):
 *   NV12/NV21  a = Y[x] | Y[x+1] << 8 | pair(x) << 16,  b = pair(x+1) (the chroma pair's
 *              two bytes in the file's order)
 *   I420       a = Y[x] | Y[x+1] << 8 | U(x) << 16 | V(x) << 24,  b = U(x+1) | V(x+1) << 8
 *   packed     a = pixel x's bytes; b = pixel x+1's: 3 bytes a pixel: bits 8-31 of b,
 *              4: all of b, 1 (GRAY8): bits 8-15 of a (b unused)
 * (one tap: Y[x+1] and b are not read). Chroma is the nearest sample of the 2x2 block. */
static ALWAYS_INLINE void tap_words(int format, int two_taps, source_row r, int x,
                                    uint32_t *a, uint32_t *b)
{
    if (is_semiplanar(format)) {
        const uint32_t luma = two_taps ? bytes2(r.luma + x) : r.luma[x];
        *a = luma | bytes2(r.pairs + (x & ~1)) << 16;
        if (two_taps)
            *b = bytes2(r.pairs + ((x + 1) & ~1));
    } else if (format == VAS_I420) {
        const uint32_t luma = two_taps ? bytes2(r.luma + x) : r.luma[x];
        *a = luma | (uint32_t)r.u[x >> 1] << 16 | (uint32_t)r.v[x >> 1] << 24;
        if (two_taps)
            *b = (uint32_t)r.u[(x + 1) >> 1] | (uint32_t)r.v[(x + 1) >> 1] << 8;
    } else {
        const int bpp = pixel_bytes(format);
        const uint8_t *px = r.luma + (size_t)bpp * (size_t)x;
        if (bpp == 1) {
            *a = two_taps ? bytes2(px) : px[0];
        } else if (bpp == 3) {
            if (two_taps) {
                *a = bytes4(px);      /* byte 3 is pixel x + 1's first: in the row */
                *b = bytes4(px + 2);  /* byte 0 is pixel x's last */
            } else {
                *a = bytes3(px);
            }
        } else {
            *a = bytes4(px);
            if (two_taps)
                *b = bytes4(px + 4);
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* The pass.                                                                              */

/* The RGB bytes of the taps in words a, b (see tap_words), with colour conversion. */
static ALWAYS_INLINE void unpack_tap(int format, int second, uint32_t a, uint32_t b, int *red,
                                     int *green, int *blue)
{
    if (is_yuv(format)) {
        const int luma = (int)((second ? a >> 8 : a) & 0xff);
        const int first = (int)((second ? b : a >> 16) & 0xff);
        const int other = (int)((second ? b >> 8 : a >> 24) & 0xff);
        const int vu = chroma_vu(format);
        yuv_to_rgb(luma, vu ? other : first, vu ? first : other, red, green, blue);
    } else {
        const int bpp = pixel_bytes(format);
        const uint32_t w = !second ? a : bpp == 1 ? a >> 8 : bpp == 3 ? b >> 8 : b;
        *red = (int)((w >> (8 * channel_byte(format, 0))) & 0xff);
        *green = (int)((w >> (8 * channel_byte(format, 1))) & 0xff);
        *blue = (int)((w >> (8 * channel_byte(format, 2))) & 0xff);
    }
}

/* Colour conversion and weighting of one row's tap words: out gets three planes (R, G,
 * B) of n. A function of its own so that `restrict` tells the compiler the arrays do not
 * overlap: it vectorises this loop. */
static ALWAYS_INLINE void weigh_taps(int format, int two_taps, int n,
                                     const uint32_t *restrict ta,
                                     const uint32_t *restrict tb,
                                     const int32_t *restrict w0,
                                     const int32_t *restrict w1, int32_t *restrict out)
{
    for (int i = 0; i < n; i++) {
        int r0, g0, b0;
        unpack_tap(format, 0, ta[i], 0, &r0, &g0, &b0);
        if (two_taps) {
            int r1, g1, b1;
            unpack_tap(format, 1, ta[i], tb[i], &r1, &g1, &b1);
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

/* The tap words of one source row. Scalar loads; `restrict` keeps the pointers in
 * registers. */
static ALWAYS_INLINE void gather_taps(int format, int two_taps, source_row r, int n,
                                      const int32_t *restrict x0, uint32_t *restrict ta,
                                      uint32_t *restrict tb)
{
    for (int i = 0; i < n; i++)
        tap_words(format, two_taps, r, x0[i], &ta[i], &tb[i]);
}

/* One worker's share of the output rows and its own buffers. */
typedef struct {
    const lb_job *job;
    int32_t *hrow[2];   /* two source rows after the horizontal pass: R, G, B x vis_w */
    uint32_t *ta, *tb;  /* one source row's tap words */
    int32_t *chroma;    /* YUV: the chroma terms of row chroma_row (chroma_terms) */
    int chroma_row;     /* -1: none yet */
    /* Antialias: the ring of horizontal-pass rows (3 x vis_w bytes each) and the source
     * row each slot holds (-1: none), the accumulator, a converted source row and a
     * vertical-pass row (3 planes of aa_span_w), the output row's values (3 x vis_w). */
    uint8_t *aa_ring, *aa_conv, *aa_mid, *aa_out;
    int32_t *aa_tags, *aa_acc;
    int begin, end;     /* output rows [begin, end) */
} lb_worker;

/* YUV formats: the chroma half of the conversion, once per chroma row (two luma rows
 * share it: 1280x720 -> 640x360 reads rows 2k and 2k + 1 for output row k). Per tap t
 * and column i, out[3t + c][i] is channel c's chroma term plus the rounding half, so a
 * pixel is clamp((luma term + out) >> 20): the same integers as yuv_to_rgb(). The tap
 * words of the chroma row are gathered into ta (tap 0) and tb (tap 1). */
/* One chroma word per column (gather_chroma) holds the chroma of both taps:
 *   NV12  U(c) V(c) U(c+2) V(c+2) bytes, c = x & ~1: tap 1's pair is at bit (x & 1) * 16
 *         (NV21: V first in each pair)
 *   I420  U(c) U(c+1) V(c) V(c+1) bytes, c = x >> 1: tap 1's U, V at bits (x & 1) * 8, +16
 * (tap 1 is column x + 1: the same sample when x is even, the next one when odd). */
static ALWAYS_INLINE void chroma_uv(int format, int second, uint32_t word, int x, int *u, int *v)
{
    if (is_semiplanar(format)) {
        const uint32_t w = second ? word >> ((x & 1) * 16) : word;
        const int vu = chroma_vu(format);
        *u = (int)((w >> (vu ? 8 : 0)) & 0xff);
        *v = (int)((w >> (vu ? 0 : 8)) & 0xff);
    } else {
        const uint32_t w = second ? word >> ((x & 1) * 8) : word;
        *u = (int)(w & 0xff);
        *v = (int)((w >> 16) & 0xff);
    }
}

static ALWAYS_INLINE void chroma_tap_terms(int format, int second, int n,
                                           const uint32_t *restrict words,
                                           const int32_t *restrict x0, int32_t *restrict red,
                                           int32_t *restrict green, int32_t *restrict blue)
{
    for (int i = 0; i < n; i++) {
        int u, v;
        chroma_uv(format, second, words[i], x0[i], &u, &v);
        u -= 128;
        v -= 128;
        red[i] = YUV_HALF + YUV_CVR * v;
        green[i] = YUV_HALF + YUV_CVG * v + YUV_CUG * u;
        blue[i] = YUV_HALF + YUV_CUB * u;
    }
}

static ALWAYS_INLINE void chroma_terms(int format, int two_taps, int n, const uint32_t *words,
                                       const int32_t *x0, int32_t *out)
{
    chroma_tap_terms(format, 0, n, words, x0, out, out + n, out + 2 * n);
    if (two_taps)
        chroma_tap_terms(format, 1, n, words, x0, out + 3 * n, out + 4 * n, out + 5 * n);
}

/* The chroma words of one row. Two-tap columns before job->chroma_wide read their word
 * in one load (it stays inside the row's stride); the others byte by byte, reading the
 * next sample only when tap 1 needs it. */
static ALWAYS_INLINE void gather_chroma(const lb_job *job, int format, int two_taps,
                                        source_row r, int n, const int32_t *restrict x0,
                                        uint32_t *restrict words)
{
    if (two_taps && job->col_pairs) {
        /* x = x0[0] + 2i, x0[0] even: tap 1 shares tap 0's sample, read contiguously */
        const int semi = is_semiplanar(format);
        const int c = semi ? x0[0] : x0[0] >> 1;
        const uint8_t *restrict u = (semi ? r.pairs : r.u) + c, *restrict v = r.v + c;
        for (int i = 0; i < n; i++)
            words[i] = semi ? bytes2(u + 2 * i) : (uint32_t)u[i] | (uint32_t)v[i] << 16;
        return;
    }
    const int wide = two_taps ? job->chroma_wide : 0;
#pragma GCC unroll 4
    for (int i = 0; i < wide; i++) {
        const int x = x0[i];
        if (is_semiplanar(format))
            words[i] = bytes4(r.pairs + (x & ~1));
        else
            words[i] = bytes2(r.u + (x >> 1)) | bytes2(r.v + (x >> 1)) << 16;
    }
    for (int i = wide; i < n; i++) {
        const int x = x0[i], odd = two_taps && (x & 1);
        if (is_semiplanar(format)) {
            const int c = x & ~1;
            words[i] = bytes2(r.pairs + c) | (odd ? bytes2(r.pairs + c + 2) << 16 : 0);
        } else {
            const int c = x >> 1;
            words[i] = (uint32_t)r.u[c] | (uint32_t)r.v[c] << 16
                       | (odd ? (uint32_t)r.u[c + 1] << 8 | (uint32_t)r.v[c + 1] << 24 : 0);
        }
    }
}

static ALWAYS_INLINE void gather_luma(int two_taps, const uint8_t *restrict luma, int n,
                                      const int32_t *restrict x0, uint32_t *restrict ta)
{
#pragma GCC unroll 4
    for (int i = 0; i < n; i++)
        ta[i] = two_taps ? bytes2(luma + x0[i]) : luma[x0[i]];
}

/* gather_luma() when x0[i] = x0[0] + 2i (col_pairs): a contiguous run of byte pairs. */
static ALWAYS_INLINE void copy_luma_pairs(const uint8_t *restrict luma, int n,
                                          uint32_t *restrict ta)
{
    for (int i = 0; i < n; i++)
        ta[i] = bytes2(luma + 2 * i);
}

static ALWAYS_INLINE int luma_term(int luma)
{
    return (luma > 16 ? luma - 16 : 0) * YUV_CY;
}

/* YUV: the luma half and the weighting. ta holds the row's luma words (Y[x] | Y[x+1] << 8).
 * The blend-and-store below is weigh_taps' too, written out twice on purpose: as one
 * inline helper (taps as arguments, the second zeroed for one tap) GCC 12 -O3 no longer
 * vectorises this loop and vectorises fewer clones of weigh_taps' (-fopt-info-vec). */
static ALWAYS_INLINE void weigh_yuv(int two_taps, int n, const uint32_t *restrict ta,
                                    const int32_t *restrict chroma,
                                    const int32_t *restrict w0,
                                    const int32_t *restrict w1, int32_t *restrict out)
{
    for (int i = 0; i < n; i++) {
        const int y0 = luma_term((int)(ta[i] & 0xff));
        const int r0 = clamp_u8((y0 + chroma[i]) >> YUV_SHIFT);
        const int g0 = clamp_u8((y0 + chroma[n + i]) >> YUV_SHIFT);
        const int b0 = clamp_u8((y0 + chroma[2 * n + i]) >> YUV_SHIFT);
        if (two_taps) {
            const int y1 = luma_term((int)((ta[i] >> 8) & 0xff));
            const int r1 = clamp_u8((y1 + chroma[3 * n + i]) >> YUV_SHIFT);
            const int g1 = clamp_u8((y1 + chroma[4 * n + i]) >> YUV_SHIFT);
            const int b1 = clamp_u8((y1 + chroma[5 * n + i]) >> YUV_SHIFT);
            out[i] = r0 * w0[i] + r1 * w1[i];
            out[n + i] = g0 * w0[i] + g1 * w1[i];
            out[2 * n + i] = b0 * w0[i] + b1 * w1[i];
        } else {
            out[i] = r0 * WEIGHT_ONE;
            out[n + i] = g0 * WEIGHT_ONE;
            out[2 * n + i] = b0 * WEIGHT_ONE;
        }
    }
}

/* Horizontal pass over source row y: per output column and channel, tap0*w0 + tap1*w1,
 * into out as three planes (R, G, B) of vis_w. First the gather (scalar loads), then the
 * arithmetic on contiguous arrays, which vectorises. */
static ALWAYS_INLINE void horizontal_pass(lb_worker *wk, int format, int two_taps,
                                          int y, int32_t *out)
{
    const lb_job *job = wk->job;
    const source_row r = row_planes(job, format, y);
    if (is_yuv(format) && job->chroma_cache) {
        if (wk->chroma_row != y >> 1) {
            gather_chroma(job, format, two_taps, r, job->vis_w, job->col_x0, wk->ta);
            chroma_terms(format, two_taps, job->vis_w, wk->ta, job->col_x0, wk->chroma);
            wk->chroma_row = y >> 1;
        }
        if (two_taps && job->col_pairs)
            copy_luma_pairs(r.luma + job->col_x0[0], job->vis_w, wk->ta);
        else
            gather_luma(two_taps, r.luma, job->vis_w, job->col_x0, wk->ta);
        weigh_yuv(two_taps, job->vis_w, wk->ta, wk->chroma, job->col_w0, job->col_w1, out);
        return;
    }
    gather_taps(format, two_taps, row_planes(job, format, y), job->vis_w, job->col_x0, wk->ta,
                wk->tb);
    weigh_taps(format, two_taps, job->vis_w, wk->ta, wk->tb, job->col_w0, job->col_w1, out);
}

/* Vertical blend of two horizontal-pass rows into one output row, then /255 and the
 * plane's normalization. The rounding is OpenCV's SIMD path (VResizeLinearVec_32s8u):
 * each product is taken as a 16x16-bit multiply-high of the row value >> 4, then
 * (sum + 2) >> 2. */
static ALWAYS_INLINE void vertical_pass(const int32_t *restrict h0,
                                        const int32_t *restrict h1, int w0, int w1,
                                        float mean, float inv_std, float *restrict dst, int n)
{
    for (int i = 0; i < n; i++) {
        int v = (((w0 * (h0[i] >> 4)) >> 16) + ((w1 * (h1[i] >> 4)) >> 16) + 2) >> 2;
        v = v > 255 ? 255 : v;
        dst[i] = normalize(v, mean, inv_std);
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

static ALWAYS_INLINE const int32_t *source_hrow(lb_worker *wk, int format, int two_taps,
                                                hrow_cache *cache, int y, int keep)
{
    if (cache->row[0] == y)
        return wk->hrow[0];
    if (cache->row[1] == y)
        return wk->hrow[1];
    const int slot = cache->row[0] == keep ? 1 : 0;
    horizontal_pass(wk, format, two_taps, y, wk->hrow[slot]);
    cache->row[slot] = y;
    return wk->hrow[slot];
}

/* ------------------------------------------------------------------------------------ */
/* Antialias: PIL's Image.resize(BILINEAR) (Resample.c) of the frame as RGB uint8. Per     */
/* output row, vertical pass over the row's source rows and horizontal pass (in Pillow's  */
/* order), each as PIL rounds it: (2^21 + sum of value x weight) >> 22, clamped to uint8. */
/* Horizontal first (the usual case), each source row's horizontal pass is kept in a ring */
/* of aa_ring rows, so the rows an output row shares with the previous one are not done   */
/* again; vertical first, each output row converts its source rows over the span.         */

static ALWAYS_INLINE uint8_t aa_round(int32_t sum)
{
    return (uint8_t)clamp_u8(sum >> AA_BITS);
}

/* Source row y's columns [x0, x0 + n) as RGB uint8 in three planes of n: the values the
 * bilinear path's taps convert to (OpenCV's cvtColor). */
static ALWAYS_INLINE void aa_convert_row(const lb_job *job, int format, int y, int x0, int n,
                                         uint8_t *restrict out)
{
    const source_row r = row_planes(job, format, y);
    for (int i = 0; i < n; i++) {
        const int x = x0 + i;
        int red, green, blue;
        if (is_semiplanar(format)) {
            yuv_to_rgb(r.luma[x], r.u[x & ~1], r.v[x & ~1], &red, &green, &blue);
        } else if (format == VAS_I420) {
            yuv_to_rgb(r.luma[x], r.u[x >> 1], r.v[x >> 1], &red, &green, &blue);
        } else {
            const uint8_t *px = r.luma + (size_t)pixel_bytes(format) * (size_t)x;
            red = px[channel_byte(format, 0)];
            green = px[channel_byte(format, 1)];
            blue = px[channel_byte(format, 2)];
        }
        out[i] = (uint8_t)red;
        out[n + i] = (uint8_t)green;
        out[2 * n + i] = (uint8_t)blue;
    }
}

/* The horizontal pass: three planes of `span` values (source columns from aa_span_x) to
 * three planes of vis_w. */
static ALWAYS_INLINE void aa_horizontal(const lb_job *job, const uint8_t *restrict in, int span,
                                        uint8_t *restrict out)
{
    const int n = job->vis_w, kx = job->aa_kx;
    for (int i = 0; i < n; i++) {
        const uint8_t *src = in + (job->aa_col_first[i] - job->aa_span_x);
        const int32_t *w = job->aa_col_k + (size_t)i * (size_t)kx;
        const int count = job->aa_col_count[i];
        for (int c = 0; c < 3; c++) {
            const uint8_t *plane = src + (size_t)c * (size_t)span;
            int32_t sum = 1 << (AA_BITS - 1);
            for (int t = 0; t < count; t++)
                sum += plane[t] * w[t];
            out[(size_t)c * (size_t)n + (size_t)i] = aa_round(sum);
        }
    }
}

static ALWAYS_INLINE void aa_accumulate(int32_t *restrict acc, const uint8_t *restrict row,
                                        int32_t weight, int n)
{
    for (int j = 0; j < n; j++)
        acc[j] += row[j] * weight;
}

static ALWAYS_INLINE void aa_start(int32_t *restrict acc, int n)
{
    for (int j = 0; j < n; j++)
        acc[j] = 1 << (AA_BITS - 1);
}

/* Visible row dy's values, R, G, B planes of vis_w, into wk->aa_out. */
static ALWAYS_INLINE void aa_row(lb_worker *wk, int format, int dy)
{
    const lb_job *job = wk->job;
    const int first = job->aa_row_first[dy], count = job->aa_row_count[dy];
    const int32_t *w = job->aa_row_k + (size_t)dy * (size_t)job->aa_ky;
    if (job->aa_vertical_first) {
        const int span = job->aa_span_w, n = 3 * span;
        aa_start(wk->aa_acc, n);
        for (int t = 0; t < count; t++) {
            aa_convert_row(job, format, first + t, job->aa_span_x, span, wk->aa_conv);
            aa_accumulate(wk->aa_acc, wk->aa_conv, w[t], n);
        }
        for (int j = 0; j < n; j++)
            wk->aa_mid[j] = aa_round(wk->aa_acc[j]);
        aa_horizontal(job, wk->aa_mid, span, wk->aa_out);
        return;
    }
    const int n = 3 * job->vis_w;
    aa_start(wk->aa_acc, n);
    for (int t = 0; t < count; t++) {
        /* count <= aa_ring consecutive rows: distinct slots, none evicts another */
        const int y = first + t, slot = y % job->aa_ring;
        uint8_t *row = wk->aa_ring + (size_t)slot * (size_t)n;
        if (wk->aa_tags[slot] != y) {
            aa_convert_row(job, format, y, job->aa_span_x, job->aa_span_w, wk->aa_conv);
            aa_horizontal(job, wk->aa_conv, job->aa_span_w, row);
            wk->aa_tags[slot] = y;
        }
        aa_accumulate(wk->aa_acc, row, w[t], n);
    }
    for (int j = 0; j < n; j++)
        wk->aa_out[j] = aa_round(wk->aa_acc[j]);
}

static ALWAYS_INLINE void store_row(const uint8_t *restrict v, float mean, float inv_std,
                                    float *restrict dst, int n)
{
    for (int i = 0; i < n; i++)
        dst[i] = normalize(v[i], mean, inv_std);
}

static ALWAYS_INLINE void run_rows(lb_worker *wk, int format, int two_taps, int filter)
{
    const lb_job *job = wk->job;
    const size_t out_w = (size_t)job->out_w, plane = out_w * (size_t)job->out_h;
    const int nw = job->vis_w, left = job->vis_left, right = job->out_w - left - nw;
    /* The horizontal pass yields R, G, B: channel c goes to output plane p[c]. */
    int p[3];
    for (int c = 0; c < 3; c++)
        p[c] = job->order == LB_BGR ? 2 - c : c;
    hrow_cache cache = {{-1, -1}};

    for (int oy = wk->begin; oy < wk->end; oy++) {
        float *dst[3];
        for (int c = 0; c < 3; c++)
            dst[c] = job->out + (size_t)p[c] * plane + (size_t)oy * out_w;
        const int dy = oy - job->vis_top;
        if (dy < 0 || dy >= job->vis_h) {
            for (int c = 0; c < 3; c++)
                fill(dst[c], out_w, job->pad[p[c]]);
            continue;
        }
        for (int c = 0; c < 3; c++) {
            fill(dst[c], (size_t)left, job->pad[p[c]]);
            fill(dst[c] + left + nw, (size_t)right, job->pad[p[c]]);
        }

        if (filter == LB_ANTIALIAS) {
            aa_row(wk, format, dy);
            for (int c = 0; c < 3; c++) {
                const uint8_t *v = wk->aa_out + (size_t)c * (size_t)nw;
                if (job->plain)
                    store_row(v, 0.0f, 1.0f, dst[c] + left, nw);
                else
                    store_row(v, job->mean[p[c]], job->inv_std[p[c]], dst[c] + left, nw);
            }
            continue;
        }
        const int y0 = job->row_y0[dy], y1 = job->row_y1[dy];
        const int w0 = job->row_w0[dy], w1 = job->row_w1[dy];
        const int32_t *h0 = source_hrow(wk, format, two_taps, &cache, y0, y1);
        /* With w1 == 0 the second row does not count: skip its horizontal pass. */
        const int32_t *h1 = (w1 == 0 || y1 == y0)
                                ? h0
                                : source_hrow(wk, format, two_taps, &cache, y1, y0);
        for (int c = 0; c < 3; c++) {
            /* Constants when there is nothing to normalize: the compiler drops the
             * subtraction and the multiplication (measured: up to 6% at 4K otherwise). */
            if (job->plain)
                vertical_pass(h0 + c * nw, h1 + c * nw, w0, w1, 0.0f, 1.0f, dst[c] + left, nw);
            else
                vertical_pass(h0 + c * nw, h1 + c * nw, w0, w1, job->mean[p[c]],
                              job->inv_std[p[c]], dst[c] + left, nw);
        }
    }
}

/* The row loop specialised for one format (a constant), filter and tap count, compiled
 * for AVX2 too (vector_clones.h). */
#define DEFINE_RUN(name, format)                                                   \
    static VAS_VECTOR_CLONES void name(lb_worker *wk)                              \
    {                                                                              \
        if (wk->job->filter == LB_ANTIALIAS)                                       \
            run_rows(wk, format, 0, LB_ANTIALIAS);                                 \
        else if (wk->job->one_col_tap)                                             \
            run_rows(wk, format, 0, LB_BILINEAR);                                  \
        else                                                                       \
            run_rows(wk, format, 1, LB_BILINEAR);                                  \
    }

DEFINE_RUN(run_nv12, VAS_NV12)
DEFINE_RUN(run_nv21, VAS_NV21)
DEFINE_RUN(run_i420, VAS_I420)
DEFINE_RUN(run_bgr, VAS_BGR24)
DEFINE_RUN(run_rgb, VAS_RGB24)
DEFINE_RUN(run_bgra, VAS_BGRA)
DEFINE_RUN(run_rgba, VAS_RGBA)
DEFINE_RUN(run_gray, VAS_GRAY8)

/* One worker's rows (an lb_worker *, typed void * to be a vas_guarded_fn). BGRx and
 * RGBx are read as BGRA and RGBA: the fourth byte is never read. */
static void run_worker(void *arg)
{
    lb_worker *wk = (lb_worker *)arg;
    switch (wk->job->format) {
    case VAS_NV12: run_nv12(wk); break;
    case VAS_NV21: run_nv21(wk); break;
    case VAS_I420: run_i420(wk); break;
    case VAS_BGR24: run_bgr(wk); break;
    case VAS_RGB24: run_rgb(wk); break;
    case VAS_BGRA:
    case VAS_BGRX: run_bgra(wk); break;
    case VAS_RGBA:
    case VAS_RGBX: run_rgba(wk); break;
    case VAS_GRAY8: run_gray(wk); break;
    default: break;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Threads: a persistent pool. Worker k > 0 runs on a pool thread, under that thread's   */
/* own guard (the guard is per thread), and reports its result through its slot.         */
/*                                                                                        */
/* Design. One process-wide pool of detached threads, created lazily and grown to the     */
/* largest threads - 1 any call asked for (at most LB_MAX_THREADS - 1), each sleeping on  */
/* work_cv between calls. A call is a `batch`: its worker slots (on the caller's stack)   */
/* and a claim counter. lb_run queues the batch, wakes threads - 1 workers, runs range 0, */
/* then claims and runs on its own thread every range of its batch that no worker has     */
/* taken yet, and finally waits (done_cv) for the ranges workers did take.                */
/* Why a queue of batches rather than serialising the pool: concurrent callers (the       */
/* server's two batch workers) each get the threads that are free, nobody ever waits for */
/* another caller's job, and the case "pool busy / too small / pthread_create failed"     */
/* needs no code of its own: the caller claims the ranges nobody took. The claim loop is  */
/* what the "run it on the caller" fallback would be anyway.                              */
/* Fork: the child has only the forking thread, which is never inside lb_run (lb_run      */
/* never forks), so pool_forget() (pthread_atfork child handler) resets the pool to its   */
/* initial, empty state without touching the parent's threads or locks (a lock held by a  */
/* parent thread at fork time is re-initialised, not unlocked); the child grows its own.  */
/* Exit: idle workers are blocked on work_cv holding nothing, and a call waits for all of */
/* its ranges, so the process exits (exit_group) with no join and nothing to hang on.     */

typedef struct {
    lb_worker worker;
    int rc, err;
} guarded_worker;

static void run_guarded(guarded_worker *g)
{
    g->rc = vas_sigbus_guard_run(run_worker, &g->worker);
    g->err = g->rc == VAS_GUARD_INSTALL_FAILED ? errno : 0;
}

typedef struct lb_batch {
    guarded_worker *slots;
    int total;              /* ranges: slots [0, total) */
    int next;               /* next unclaimed range (range 0 is the caller's) */
    int running;            /* ranges a pool worker claimed and has not finished */
    struct lb_batch *link;  /* the queue: batches with unclaimed ranges, oldest first */
} lb_batch;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t work_cv;  /* a batch was queued */
    pthread_cond_t done_cv;  /* a batch's last worker-claimed range finished */
    lb_batch *head;          /* the queue; under lock */
    int workers;             /* threads started; under lock */
} lb_pool;

#define LB_POOL_INIT                                                                  \
    {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0}

static lb_pool pool = LB_POOL_INIT;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_ok;  /* written once under atfork_once */

static void pool_forget(void)
{
    /* The child: the workers are gone and no thread here waits or holds the lock. */
    static const lb_pool fresh = LB_POOL_INIT;
    pool = fresh;
}

static void register_atfork(void)
{
    atfork_ok = pthread_atfork(NULL, NULL, pool_forget) == 0;
}

/* Takes range `next` of b (the caller holds the lock); unqueues b once all are taken. */
static int claim(lb_batch *b)
{
    const int k = b->next++;
    if (b->next == b->total)
        for (lb_batch **p = &pool.head; *p != NULL; p = &(*p)->link)
            if (*p == b) {
                *p = b->link;
                break;
            }
    return k;
}

static void *pool_worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.head == NULL)
            pthread_cond_wait(&pool.work_cv, &pool.lock);
        lb_batch *b = pool.head;
        const int k = claim(b);
        b->running++;
        pthread_mutex_unlock(&pool.lock);
        run_guarded(&b->slots[k]);
        pthread_mutex_lock(&pool.lock);
        /* The caller may return (and b go out of scope) as soon as the lock is released. */
        if (--b->running == 0 && b->next == b->total)
            pthread_cond_broadcast(&pool.done_cv);
    }
    return NULL;  /* not reached */
}

/* Starts workers until there are `want` (the caller holds the lock). Each blocks every
 * asynchronous signal, so the server's signals go to its Python threads; synchronous
 * ones (SIGBUS above all) stay deliverable, as a blocked SIGBUS from a fault kills the
 * process. A failed pthread_create stops here: the callers run those ranges. */
static void pool_grow(int want)
{
    if (pool.workers >= want)
        return;
    sigset_t all, saved;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGTRAP);
    sigdelset(&all, SIGSYS);
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_sigmask(SIG_BLOCK, &all, &saved);
    while (pool.workers < want) {
        pthread_t tid;
        if (pthread_create(&tid, &attr, pool_worker, NULL) != 0)
            break;
        pool.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    pthread_attr_destroy(&attr);
}

/* Ranges [1, threads) of the batch on the pool, range 0 and the unclaimed rest here. */
static void run_pooled(guarded_worker *slots, int threads)
{
    lb_batch b = {slots, threads, 1, 0, NULL};
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.lock);
    if (atfork_ok) {  /* else no pool: a fork could inherit it half-held */
        pool_grow(threads - 1);
        lb_batch **tail = &pool.head;
        while (*tail != NULL)
            tail = &(*tail)->link;
        *tail = &b;
        for (int k = 1; k < threads; k++)
            pthread_cond_signal(&pool.work_cv);
    }
    pthread_mutex_unlock(&pool.lock);

    run_guarded(&slots[0]);
    pthread_mutex_lock(&pool.lock);
    while (b.next < b.total) {  /* not taken by a worker (yet): run it here */
        const int k = claim(&b);
        pthread_mutex_unlock(&pool.lock);
        run_guarded(&slots[k]);
        pthread_mutex_lock(&pool.lock);
    }
    while (b.running > 0)
        pthread_cond_wait(&pool.done_cv, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
}

int lb_run(lb_job *job, int *install_errno)
{
    enum { MAX_THREADS = LB_MAX_THREADS };
    guarded_worker slots[MAX_THREADS];
    const int threads = job->threads;
    const size_t words = job->worker_words;
    int32_t *base = job->workers;
    VAS_DEBUG_ASSERT(threads >= 1 && threads <= MAX_THREADS && threads <= job->vis_h);

    /* Worker k takes the visible resized rows [vis_top + vis_h*k/T, vis_top +
     * vis_h*(k+1)/T); the first also takes the top border, the last the bottom one. */
    for (int k = 0; k < threads; k++) {
        lb_worker *wk = &slots[k].worker;
        int32_t *p = base + (size_t)k * words;
        wk->job = job;
        if (job->filter == LB_ANTIALIAS) {
            /* the layout worker_words() counts */
            const size_t ring = (size_t)job->aa_ring, n = 3 * (size_t)job->vis_w;
            const size_t w = 3 * (size_t)job->width;
            wk->aa_tags = p; p += ring;
            wk->aa_acc = p; p += w > n ? w : n;
            wk->aa_ring = (uint8_t *)p;
            wk->aa_conv = wk->aa_ring + n * ring;
            wk->aa_mid = wk->aa_conv + w;
            wk->aa_out = wk->aa_mid + w;
            for (size_t r = 0; r < ring; r++)
                wk->aa_tags[r] = -1;
        } else {
            wk->hrow[0] = p; p += 3 * job->vis_w;
            wk->hrow[1] = p; p += 3 * job->vis_w;
            wk->ta = (uint32_t *)p; p += job->vis_w;
            wk->tb = (uint32_t *)p; p += job->vis_w;
            wk->chroma = p;
            wk->chroma_row = -1;
        }
        wk->begin = k == 0 ? 0 : job->vis_top + (int)((int64_t)job->vis_h * k / threads);
        wk->end = k == threads - 1
                      ? job->out_h
                      : job->vis_top + (int)((int64_t)job->vis_h * (k + 1) / threads);
        slots[k].rc = VAS_GUARD_OK;
        slots[k].err = 0;
    }
    if (threads == 1)
        run_guarded(&slots[0]);
    else
        run_pooled(slots, threads);
    int rc = VAS_GUARD_OK;
    *install_errno = 0;
    for (int k = 0; k < threads; k++) {
        if (slots[k].rc == VAS_GUARD_INSTALL_FAILED) {
            *install_errno = slots[k].err;
            return VAS_GUARD_INSTALL_FAILED;
        }
        if (slots[k].rc == VAS_GUARD_SIGBUS)
            rc = VAS_GUARD_SIGBUS;
    }
    return rc;
}
