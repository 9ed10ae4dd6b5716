/* mask_kernel.c: one detection's instance mask inside its box, out as COCO RLE or as a
 * contour (see mask_kernel.h).
 *
 * The arithmetic is torch's on the CPU, in float32 and in its order, so that a pixel
 * differs from Ultralytics only where a logit is within rounding of 0: each logit is
 * summed over the channels in order (BLAS sums in another order: the only difference);
 * the bilinear weights are upsample_bilinear2d's (compute_source_index_and_lambda);
 * each output is (v00*wx0 + v01*wx1)*wy0 + (v10*wx0 + v11*wx1)*wy1, rows along x first.
 */
#include "mask_kernel.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------------------------ */
/* Geometry                                                                              */

int mk_geometry_init(mk_geometry *g, int proto_h, int proto_w, int src_w, int src_h)
{
    /* ops.scale_masks, in doubles as Python computes it; round() is half-to-even, which
     * nearbyint() is in the default rounding mode. */
    const double gain = fmin((double)proto_h / src_h, (double)proto_w / src_w);
    const double pad_w = ((double)proto_w - src_w * gain) / 2;
    const double pad_h = ((double)proto_h - src_h * gain) / 2;
    const int top = (int)nearbyint(pad_h - 0.1), left = (int)nearbyint(pad_w - 0.1);
    const int bottom = proto_h - (int)nearbyint(pad_h + 0.1);
    const int right = proto_w - (int)nearbyint(pad_w + 0.1);
    if (top < 0 || left < 0 || bottom <= top || right <= left)
        return -1;
    g->top = top;
    g->left = left;
    g->in_h = bottom - top;
    g->in_w = right - left;
    g->src_w = src_w;
    g->src_h = src_h;
    /* area_pixel_compute_scale without a scale factor: (float)in / out. */
    g->scale_x = (float)g->in_w / (float)src_w;
    g->scale_y = (float)g->in_h / (float)src_h;
    return 0;
}

/* compute_source_index_and_lambda (align_corners=False): the two taps of output index d
 * along an axis of in cells resized to out, and their weights. */
static inline void axis_taps(float scale, int in, int out, int d, int *i0, int *i1, float *l0,
                             float *l1)
{
    if (in == out) {  /* torch copies */
        *i0 = *i1 = d;
        *l0 = 1.0f;
        *l1 = 0.0f;
        return;
    }
    float src = scale * ((float)d + 0.5f) - 0.5f;
    if (src < 0.0f)
        src = 0.0f;
    int i = (int)floorf(src);
    if (i > in - 1)
        i = in - 1;
    float lambda = src - (float)i;
    lambda = lambda < 0.0f ? 0.0f : (lambda > 1.0f ? 1.0f : lambda);
    *i0 = i;
    *i1 = i + (i < in - 1 ? 1 : 0);
    *l1 = lambda;
    *l0 = 1.0f - lambda;
}

/* crop_mask keeps index c when x1 <= c < x2 (float32 against the index): [ceil(x1),
 * ceil(x2)), clipped to the frame. */
static inline int first_index_at_or_after(float edge, int size)
{
    const double c = ceil((double)edge);
    return c <= 0 ? 0 : (c >= size ? size : (int)c);
}

void mk_box_init(mk_box *b, const mk_geometry *g, const float xyxy[4])
{
    b->x0 = first_index_at_or_after(xyxy[0], g->src_w);
    b->x1 = first_index_at_or_after(xyxy[2], g->src_w);
    b->y0 = first_index_at_or_after(xyxy[1], g->src_h);
    b->y1 = first_index_at_or_after(xyxy[3], g->src_h);
    if (b->x1 <= b->x0 || b->y1 <= b->y0) {
        b->x0 = b->x1 = b->y0 = b->y1 = 0;
        b->cx0 = b->cx1 = b->cy0 = b->cy1 = 0;
        return;
    }
    /* The taps are monotone in the output index: the first pixel's first tap and the last
     * pixel's second tap bound the cells read. */
    int i0, i1;
    float l0, l1;
    axis_taps(g->scale_x, g->in_w, g->src_w, b->x0, &b->cx0, &i1, &l0, &l1);
    axis_taps(g->scale_x, g->in_w, g->src_w, b->x1 - 1, &i0, &i1, &l0, &l1);
    b->cx1 = i1 + 1;
    axis_taps(g->scale_y, g->in_h, g->src_h, b->y0, &b->cy0, &i1, &l0, &l1);
    axis_taps(g->scale_y, g->in_h, g->src_h, b->y1 - 1, &i0, &i1, &l0, &l1);
    b->cy1 = i1 + 1;
}

/* ------------------------------------------------------------------------------------ */
/* Scratch                                                                               */

/* Where each part of the scratch lies (byte offsets), for one box and format. */
typedef struct {
    size_t cells;      /* float [ncy][ncx]: the logits of the cells read */
    size_t rows;       /* float [bw][ncy]: each cell row interpolated at the box's columns */
    size_t taps;       /* int32 x0[bw], x1[bw], y0[bh], y1[bh]; float wx0, wx1, wy0, wy1 */
    size_t stack;      /* MK_POLYGON: int32 [bw*bh], the flood fill's stack */
    size_t bits;       /* MK_RLE: uint8 [bw][bh]; MK_POLYGON: uint8 [bh+2][bw+2] */
    size_t text;       /* MK_RLE: the string */
    size_t end;
} layout;

/* The state mk_polygon() leaves for mk_polygon_points(), at the start of the scratch. */
typedef struct {
    ptrdiff_t start;   /* the contour's first pixel in the padded bitmap */
} trace_state;

#define ADD(a, b) do { if (__builtin_add_overflow((a), (b), &(a))) return -1; } while (0)
#define MUL(out, a, b) do { if (__builtin_mul_overflow((a), (b), &(out))) return -1; } while (0)

/* Characters one pycocotools count (a delta of magnitude <= n) can take: 5 bits each,
 * and a sign bit. */
static int chars_per_count(uint64_t n)
{
    int bits = 1;
    while (n) {
        bits++;
        n >>= 1;
    }
    return (bits + 4) / 5;
}

static int plan(layout *l, const mk_geometry *g, const mk_box *b, int format)
{
    const size_t bw = (size_t)(b->x1 - b->x0), bh = (size_t)(b->y1 - b->y0);
    const size_t ncx = (size_t)(b->cx1 - b->cx0), ncy = (size_t)(b->cy1 - b->cy0);
    size_t n, area;
    l->cells = sizeof(trace_state);
    MUL(n, ncy, ncx);
    MUL(n, n, sizeof(float));
    l->rows = l->cells;
    ADD(l->rows, n);
    MUL(n, bw, ncy);
    MUL(n, n, sizeof(float));
    l->taps = l->rows;
    ADD(l->taps, n);
    n = bw + bh;  /* each < 2^31 */
    MUL(n, n, 2 * sizeof(int32_t) + 2 * sizeof(float));
    l->stack = l->taps;
    ADD(l->stack, n);
    MUL(area, bw, bh);
    l->bits = l->stack;
    if (format == MK_POLYGON) {
        if ((bw + 2) * (bh + 2) > INT32_MAX)  /* bw, bh < 2^31: no overflow */
            return -1;
        MUL(n, area, sizeof(int32_t));
        ADD(l->bits, n);
        l->text = l->bits + (bw + 2) * (bh + 2);
        l->end = l->text;
        return 0;
    }
    l->text = l->bits;
    ADD(l->text, area);
    /* Counts: one per box pixel that differs from the previous pixel, one per column end
     * the mask leaves, and the last run. */
    size_t counts = area;
    ADD(counts, bw);
    ADD(counts, 1);
    MUL(n, counts, (size_t)chars_per_count((uint64_t)g->src_w * (uint64_t)g->src_h));
    l->end = l->text;
    ADD(l->end, n);
    return 0;
}

size_t mk_scratch_nbytes(const mk_geometry *g, const mk_box *b, int format)
{
    layout l = {0};
    return plan(&l, g, b, format) ? SIZE_MAX : l.end;
}

/* ------------------------------------------------------------------------------------ */
/* Assembly: the box's pixels, thresholded, written as bits[x*x_step + y*y_step]          */

static void assemble(const mk_geometry *g, const mk_protos *p, const char *coeffs,
                     ptrdiff_t coeff_stride, const mk_box *b, char *scratch, const layout *l,
                     uint8_t *bits, ptrdiff_t x_step, ptrdiff_t y_step)
{
    const int bw = b->x1 - b->x0, bh = b->y1 - b->y0;
    const int ncx = b->cx1 - b->cx0, ncy = b->cy1 - b->cy0;
    float *cells = (float *)(scratch + l->cells);
    float *rows = (float *)(scratch + l->rows);
    int32_t *tx0 = (int32_t *)(scratch + l->taps), *tx1 = tx0 + bw;
    int32_t *ty0 = tx1 + bw, *ty1 = ty0 + bh;
    float *wx0 = (float *)(ty1 + bh), *wx1 = wx0 + bw, *wy0 = wx1 + bw, *wy1 = wy0 + bh;

    /* Logits of the cells read, summed over the channels in order. */
    memset(cells, 0, (size_t)ncx * (size_t)ncy * sizeof(float));
    for (int c = 0; c < p->channels; c++) {
        const float k = *(const float *)(coeffs + c * coeff_stride);
        const char *plane = p->data + c * p->c_stride + (ptrdiff_t)(g->top + b->cy0) * p->y_stride
                            + (ptrdiff_t)(g->left + b->cx0) * p->x_stride;
        for (int r = 0; r < ncy; r++) {
            const char *src = plane + r * p->y_stride;
            float *dst = cells + (ptrdiff_t)r * ncx;
            for (int x = 0; x < ncx; x++)
                dst[x] += k * *(const float *)(src + x * p->x_stride);
        }
    }

    for (int x = 0; x < bw; x++) {
        int i0, i1;
        axis_taps(g->scale_x, g->in_w, g->src_w, b->x0 + x, &i0, &i1, &wx0[x], &wx1[x]);
        tx0[x] = i0 - b->cx0;
        tx1[x] = i1 - b->cx0;
    }
    for (int y = 0; y < bh; y++) {
        int i0, i1;
        axis_taps(g->scale_y, g->in_h, g->src_h, b->y0 + y, &i0, &i1, &wy0[y], &wy1[y]);
        ty0[y] = i0 - b->cy0;
        ty1[y] = i1 - b->cy0;
    }

    /* Along x: rows[x][r], each cell row at the box's columns (transposed so that the
     * pass along y reads one column contiguously). */
    for (int r = 0; r < ncy; r++) {
        const float *row = cells + (ptrdiff_t)r * ncx;
        for (int x = 0; x < bw; x++)
            rows[(ptrdiff_t)x * ncy + r] = row[tx0[x]] * wx0[x] + row[tx1[x]] * wx1[x];
    }
    /* Along y, threshold. */
    for (int x = 0; x < bw; x++) {
        const float *col = rows + (ptrdiff_t)x * ncy;
        uint8_t *out = bits + x * x_step;
        for (int y = 0; y < bh; y++)
            out[y * y_step] = (col[ty0[y]] * wy0[y] + col[ty1[y]] * wy1[y]) > 0.0f;
    }
}

/* ------------------------------------------------------------------------------------ */
/* COCO RLE                                                                              */

typedef struct {
    char *s;
    uint64_t prev1, prev2;  /* the last two counts */
    size_t n;               /* counts written */
} rle_writer;

/* pycocotools' rleToString for one count: from the fourth count on, the difference with
 * the count two before; 5 bits a character, low first, 0x20 = more follow, + 48. */
static inline void put_count(rle_writer *w, uint64_t count)
{
    int64_t x = (int64_t)count;
    if (w->n > 2)
        x -= (int64_t)w->prev2;
    for (;;) {
        int c = (int)(x & 0x1f);
        x = x < 0 ? ~(~x >> 5) : x >> 5;  /* arithmetic shift, spelled out */
        const int more = (c & 0x10) ? x != -1 : x != 0;
        if (more)
            c |= 0x20;
        *w->s++ = (char)(c + 48);
        if (!more)
            break;
    }
    w->prev2 = w->prev1;
    w->prev1 = count;
    w->n++;
}

size_t mk_rle(const mk_geometry *g, const mk_protos *p, const char *coeffs,
              ptrdiff_t coeff_stride, const mk_box *b, void *scratch, const char **counts)
{
    layout l = {0};
    plan(&l, g, b, MK_RLE);  /* sized by mk_scratch_nbytes(): cannot fail here */
    char *base = scratch;
    rle_writer w = {base + l.text, 0, 0, 0};
    const uint64_t h = (uint64_t)g->src_h, total = h * (uint64_t)g->src_w;
    uint64_t last = 0;  /* where the current run started (column-major index) */
    const int bw = b->x1 - b->x0, bh = b->y1 - b->y0;
    if (bw > 0) {
        uint8_t *bits = (uint8_t *)(base + l.bits);
        assemble(g, p, coeffs, coeff_stride, b, base, &l, bits, bh, 1);
        uint8_t v = 0;
        /* A column's pixels below the box, and the next column's above it, are 0: a run
         * of 1s ends at the column's end unless the box spans whole columns, or the frame
         * ends there (the last count is then that run). */
        const int spans = b->y0 == 0 && b->y1 == g->src_h;
        for (int x = 0; x < bw; x++) {
            const uint8_t *col = bits + (ptrdiff_t)x * bh;
            const uint64_t at = (uint64_t)(b->x0 + x) * h + (uint64_t)b->y0;
            for (int y = 0; y < bh; y++)
                if (col[y] != v) {
                    put_count(&w, at + (uint64_t)y - last);
                    last = at + (uint64_t)y;
                    v ^= 1;
                }
            if (v && (!spans || x == bw - 1) && at + (uint64_t)bh < total) {
                put_count(&w, at + (uint64_t)bh - last);
                last = at + (uint64_t)bh;
                v = 0;
            }
        }
    }
    put_count(&w, total - last);
    *counts = base + l.text;
    return (size_t)(w.s - (base + l.text));
}

/* ------------------------------------------------------------------------------------ */
/* Polygon                                                                               */

/* OpenCV's chain codes: 0 = +x, then counter-clockwise on the screen (2 = up). */
static const int code_dx[8] = {1, 1, 0, -1, -1, -1, 0, 1};
static const int code_dy[8] = {0, -1, -1, -1, 0, 1, 1, 1};

/* Flood-fills (8-connected) every part of the padded bitmap (1 = mask; marked 2 when
 * reached) and returns the first pixel of the largest (ties: the first found, i.e. the
 * first in raster order), or -1 when the mask is empty. */
static ptrdiff_t largest_part(uint8_t *bits, int bw, int bh, int32_t *stack)
{
    const ptrdiff_t pw = bw + 2;
    const ptrdiff_t around[8] = {1, -pw + 1, -pw, -pw - 1, -1, pw - 1, pw, pw + 1};
    ptrdiff_t best = -1;
    size_t best_size = 0;
    for (int y = 1; y <= bh; y++)
        for (int x = 1; x <= bw; x++) {
            const ptrdiff_t seed = y * pw + x;
            if (bits[seed] != 1)
                continue;
            size_t size = 0, top = 0;
            bits[seed] = 2;
            stack[top++] = (int32_t)seed;
            while (top) {
                const ptrdiff_t at = stack[--top];
                size++;
                for (int k = 0; k < 8; k++)
                    if (bits[at + around[k]] == 1) {
                        bits[at + around[k]] = 2;
                        stack[top++] = (int32_t)(at + around[k]);
                    }
            }
            if (size > best_size) {
                best_size = size;
                best = seed;
            }
        }
    return best;
}

/* OpenCV's icvFetchContour for an outer border (Suzuki-Abe), CHAIN_APPROX_SIMPLE: a
 * point wherever the chain code changes. Follows nonzero pixels from start, the part's
 * first pixel in raster order, so it stays on that part. Writes the points when out is
 * not NULL; returns how many. */
static size_t trace(const uint8_t *bits, ptrdiff_t pw, ptrdiff_t start, int x, int y,
                    float sx, float sy, float *out)
{
    ptrdiff_t deltas[16];
    for (int k = 0; k < 16; k++)
        deltas[k] = code_dx[k & 7] + code_dy[k & 7] * pw;
    const uint8_t *i0 = bits + start, *i1, *i3, *i4 = NULL;
    size_t n = 0;
    int s = 4, s_end = 4;
    do {
        s = (s - 1) & 7;
        i1 = i0 + deltas[s];
    } while (*i1 == 0 && s != s_end);
    if (s == s_end) {  /* a single pixel */
        if (out) {
            out[0] = (float)x / sx;
            out[1] = (float)y / sy;
        }
        return 1;
    }
    i3 = i0;
    int prev_s = s ^ 4;
    for (;;) {
        s_end = s;
        while (s < 15) {
            i4 = i3 + deltas[++s];
            if (*i4 != 0)
                break;
        }
        s &= 7;
        if (s != prev_s) {
            if (out) {
                out[2 * n] = (float)x / sx;
                out[2 * n + 1] = (float)y / sy;
            }
            n++;
            prev_s = s;
        }
        x += code_dx[s];
        y += code_dy[s];
        if (i4 == i0 && i3 == i1)
            break;
        i3 = i4;
        s = (s + 4) & 7;
    }
    return n;
}

size_t mk_polygon(const mk_geometry *g, const mk_protos *p, const char *coeffs,
                  ptrdiff_t coeff_stride, const mk_box *b, void *scratch)
{
    const int bw = b->x1 - b->x0, bh = b->y1 - b->y0;
    trace_state *state = scratch;
    state->start = -1;
    if (bw == 0)
        return 0;
    layout l = {0};
    plan(&l, g, b, MK_POLYGON);  /* sized by mk_scratch_nbytes(): cannot fail here */
    char *base = scratch;
    uint8_t *bits = (uint8_t *)(base + l.bits);
    const ptrdiff_t pw = bw + 2;
    memset(bits, 0, (size_t)pw * (size_t)(bh + 2));  /* the zero border */
    assemble(g, p, coeffs, coeff_stride, b, base, &l, bits + pw + 1, 1, pw);
    state->start = largest_part(bits, bw, bh, (int32_t *)(base + l.stack));
    if (state->start < 0)
        return 0;
    return trace(bits, pw, state->start, 0, 0, 1.0f, 1.0f, NULL);
}

void mk_polygon_points(const mk_geometry *g, const mk_box *b, const void *scratch, float *points)
{
    const trace_state *state = scratch;
    if (state->start < 0)
        return;
    layout l = {0};
    plan(&l, g, b, MK_POLYGON);
    const ptrdiff_t pw = b->x1 - b->x0 + 2;
    const int x = (int)(state->start % pw) - 1 + b->x0, y = (int)(state->start / pw) - 1 + b->y0;
    trace((const uint8_t *)scratch + l.bits, pw, state->start, x, y, (float)g->src_w,
          (float)g->src_h, points);
}
