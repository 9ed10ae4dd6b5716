/* mask_kernel.c: one detection's instance mask inside its box, out as COCO RLE or as a
 * contour (see mask_kernel.h).
 *
 * The arithmetic is torch's on the CPU, in float32 and in its order, so that a pixel
 * differs from Ultralytics only where a logit is within rounding of 0: each logit is
 * summed over the channels in order (BLAS sums in another order: the only difference);
 * the bilinear weights are upsample_bilinear2d's (compute_source_index_and_lambda);
 * each output is (v00*wx0 + v01*wx1)*wy0 + (v10*wx0 + v11*wx1)*wy1, rows along x first.
 *
 * Most pixels are never computed. The box's rows fall into y segments, runs of rows with
 * the same two taps (cell rows); a column's stretch in one segment reads the same two
 * values, the cell rows interpolated along x at the column, and its pixels are uniform
 * or flip once (proofs at classify_chunk()): a stretch costs a few vector operations and
 * two pixels, and only stretches with NaN, inf or tiny values are evaluated pixel by
 * pixel. Columns are classified CHUNK at a time, then walked stretch by stretch, which
 * yields the rows where each column's value flips; the RLE writes them as counts, the
 * polygon path as runs it labels into 8-connected parts (union-find over runs) and
 * traces without ever drawing a bitmap.
 */
#include "mask_kernel.h"
#include "vector_clones.h"

#include <float.h>
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
    int i = (int)src;  /* floor: src >= 0 */
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

/* A column run of mask pixels, rows [y0, y1), and its part (union-find). */
typedef struct {
    int32_t y0, y1;
    int32_t parent;   /* a run of the same part; the part's root is its own parent */
    int32_t size;     /* at the root: the part's pixels */
    int32_t first;    /* at the root: the part's first pixel in raster order, y * bw + x */
} run;

/* What mk_polygon() leaves for mk_polygon_points(), at the start of the scratch. */
typedef struct {
    int32_t x, y;     /* the traced part's first pixel (in the box); x < 0: empty mask */
} trace_state;

/* Columns of the box whose stretches are classified together: the loops run long enough
 * to vectorize, and the chunk's tables (tens of KiB) stay in cache. */
#define CHUNK 64

/* Where each part of the scratch lies (byte offsets), for one box and format; every part
 * before `text` holds 4-byte elements, so each is aligned. */
typedef struct {
    size_t cells;      /* float [ncy][ncx]: the logits of the cells read */
    size_t weights;    /* float wx0[bw], wx1[bw], wy0[bh], wy1[bh] */
    size_t taps;       /* int32 x: c0[bw], c1[bw]; y segments: start[bh+1], r0[bh], r1[bh] */
    size_t profile;    /* float [ncy][CHUNK]: the chunk's columns interpolated along x */
    size_t stretches;  /* int32 [3][ncy][CHUNK]: each stretch's flips (classify_chunk()) */
    size_t nflips;     /* int32 [CHUNK]: each column's number of flips */
    size_t flips;      /* int32 [bh + 1]: one column's flips (and a slot written past them) */
    size_t columns;    /* MK_POLYGON: int32 [bw+1], each column's first run */
    size_t runs;       /* MK_POLYGON: run [bw * ceil(bh/2)] */
    size_t text;       /* MK_RLE: the string */
    size_t end;
} layout;

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
    size_t n;
    l->cells = sizeof(trace_state);
    MUL(n, ncy, ncx);
    MUL(n, n, sizeof(float));
    l->weights = l->cells;
    ADD(l->weights, n);
    n = 2 * (bw + bh) * sizeof(float);  /* bw, bh < 2^31: no overflow */
    l->taps = l->weights;
    ADD(l->taps, n);
    n = (2 * bw + 3 * bh + 1) * sizeof(int32_t);
    l->profile = l->taps;
    ADD(l->profile, n);
    size_t table;  /* bytes of one [ncy][CHUNK] table of 4-byte elements */
    MUL(table, ncy, CHUNK * sizeof(float));
    l->stretches = l->profile;
    ADD(l->stretches, table);
    l->nflips = l->stretches;
    MUL(n, table, 3);
    ADD(l->nflips, n);
    l->flips = l->nflips;
    ADD(l->flips, CHUNK * sizeof(int32_t));
    l->columns = l->flips;
    ADD(l->columns, (bh + 1) * sizeof(int32_t));
    l->runs = l->columns;
    if (format == MK_POLYGON) {
        /* Run indices and raster positions are int32. */
        if (bw * (bh + 1) > INT32_MAX)  /* bw, bh < 2^31: no overflow */
            return -1;
        ADD(l->runs, (bw + 1) * sizeof(int32_t));
        l->text = l->runs;
        ADD(l->text, bw * ((bh + 1) / 2) * sizeof(run));
    } else {
        l->text = l->runs;
    }
    l->end = l->text;
    if (format == MK_RLE) {
        /* Counts: one per flip (at most bh a column), one per column end the mask
         * leaves, and the last run; and a byte put_count() may write past its end. */
        size_t counts;
        MUL(counts, bw, bh);
        ADD(counts, bw);
        ADD(counts, 1);
        MUL(n, counts, (size_t)chars_per_count((uint64_t)g->src_w * (uint64_t)g->src_h));
        ADD(n, 1);
        ADD(l->end, n);
    }
    return 0;
}

size_t mk_scratch_nbytes(const mk_geometry *g, const mk_box *b, int format)
{
    layout l = {0};
    return plan(&l, g, b, format) ? SIZE_MAX : l.end;
}

/* ------------------------------------------------------------------------------------ */
/* Stretches                                                                             */

/* The box's cells, taps, segments, and the current chunk's tables, in the scratch. */
typedef struct {
    int bw, bh, ncx, ncy, nys;
    const float *cells;                          /* [ncy][ncx] */
    const float *wx0, *wx1;                      /* per column */
    const float *wy0, *wy1;                      /* per row */
    const int32_t *xc0, *xc1;                    /* per column: its two cells along x */
    const int32_t *ys_start, *ys_r0, *ys_r1;     /* y segment t: rows [start[t], start[t+1]) */
    float *profile;                              /* [ncy][CHUNK] */
    int32_t *offsets;                            /* [nys][CHUNK] */
    int32_t *flip_pairs;                         /* [nys][CHUNK][2] */
    int32_t *nflips;                             /* [CHUNK] */
} blocks;

/* The taps, relative to cell `first`, and the weights of n consecutive output indices
 * from d0 along an axis (a loop the compiler vectorizes). */
static VAS_VECTOR_CLONES void axis_run(float scale, int in, int out, int d0, int n, int first,
                                       float *restrict w0, float *restrict w1,
                                       int32_t *restrict t0, int32_t *restrict t1)
{
    for (int d = 0; d < n; d++) {
        int i0, i1;
        axis_taps(scale, in, out, d0 + d, &i0, &i1, &w0[d], &w1[d]);
        t0[d] = i0 - first;
        t1[d] = i1 - first;
    }
}

/* The segments of axis_run()'s n indices: runs with the same first tap (the taps are
 * monotone in the index, and the second tap is a function of the first). Compacts t0
 * and t1 to one entry per segment, segment s being indices [start[s], start[s+1]);
 * returns the number of segments. */
static int segments(int n, int32_t *start, int32_t *t0, int32_t *t1)
{
    int count = 0;
    for (int d = 0; d < n; d++)
        if (count == 0 || t0[d] != t0[count - 1]) {  /* count <= d: in place */
            start[count] = d;
            t0[count] = t0[d];
            t1[count] = t1[d];
            count++;
        }
    start[count] = n;
    return count;
}

/* Logits of the cells read, summed over the channels in order (the contiguous case apart
 * so that the compiler vectorizes it; the same operations either way). */
static VAS_VECTOR_CLONES void cell_logits(const mk_geometry *g, const mk_protos *p,
                                          const char *coeffs, ptrdiff_t coeff_stride,
                                          const mk_box *b, float *cells)
{
    const int ncx = b->cx1 - b->cx0, ncy = b->cy1 - b->cy0;
    memset(cells, 0, (size_t)ncx * (size_t)ncy * sizeof(float));
    for (int c = 0; c < p->channels; c++) {
        const float w = *(const float *)(coeffs + c * coeff_stride);
        const char *plane = p->data + c * p->c_stride + (ptrdiff_t)(g->top + b->cy0) * p->y_stride
                            + (ptrdiff_t)(g->left + b->cx0) * p->x_stride;
        for (int r = 0; r < ncy; r++) {
            const char *src = plane + r * p->y_stride;
            float *dst = cells + (ptrdiff_t)r * ncx;
            if (p->x_stride == (ptrdiff_t)sizeof(float)) {
                const float *row = (const float *)src;
                for (int x = 0; x < ncx; x++)
                    dst[x] += w * row[x];
            } else {
                for (int x = 0; x < ncx; x++)
                    dst[x] += w * *(const float *)(src + x * p->x_stride);
            }
        }
    }
}

static void prepare(blocks *k, const mk_geometry *g, const mk_protos *p, const char *coeffs,
                    ptrdiff_t coeff_stride, const mk_box *b, char *scratch, const layout *l)
{
    const int bw = b->x1 - b->x0, bh = b->y1 - b->y0;
    const int ncx = b->cx1 - b->cx0, ncy = b->cy1 - b->cy0;
    float *cells = (float *)(scratch + l->cells);
    float *wx0 = (float *)(scratch + l->weights), *wx1 = wx0 + bw;
    float *wy0 = wx1 + bw, *wy1 = wy0 + bh;
    int32_t *xc0 = (int32_t *)(scratch + l->taps), *xc1 = xc0 + bw;
    int32_t *ys_start = xc1 + bw, *ys_r0 = ys_start + bh + 1, *ys_r1 = ys_r0 + bh;

    cell_logits(g, p, coeffs, coeff_stride, b, cells);
    axis_run(g->scale_x, g->in_w, g->src_w, b->x0, bw, b->cx0, wx0, wx1, xc0, xc1);
    axis_run(g->scale_y, g->in_h, g->src_h, b->y0, bh, b->cy0, wy0, wy1, ys_r0, ys_r1);
    const int nys = segments(bh, ys_start, ys_r0, ys_r1);
    int32_t *stretches = (int32_t *)(scratch + l->stretches);
    const ptrdiff_t table = (ptrdiff_t)ncy * CHUNK;
    *k = (blocks){bw, bh, ncx, ncy, nys, cells, wx0, wx1, wy0, wy1, xc0, xc1, ys_start, ys_r0,
                  ys_r1, (float *)(scratch + l->profile), stretches, stretches + table,
                  (int32_t *)(scratch + l->nflips)};
}

/* LANES columns at once (GCC's vector extensions: AVX2 registers in the AVX2 clone,
 * pairs of SSE2 ones in the baseline). Comparisons give -1 (true) or 0 per lane. */
#define LANES 8
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

/* (Vectors passed by address: by value their ABI would differ between the clones.) */
static inline void load_lanes(vfloat *v, const float *p)
{
    memcpy(v, p, sizeof *v);
}

static inline void store_lanes(int32_t *p, const vint *v)
{
    memcpy(p, v, sizeof *v);
}

static inline int any_lane(const vint *m)
{
    uint64_t u[LANES / 2];
    memcpy(u, m, sizeof u);
    uint64_t any = 0;
    for (int i = 0; i < LANES / 2; i++)
        any |= u[i];
    return any != 0;
}

/* A column's stretch: its rows [y0, y1) in one y segment, which read the same two cell
 * rows. top and bottom are those rows interpolated at the column (finite or not), and
 * each pixel is v = top*wy0 + bottom*wy1, each operation rounded to float32 as torch
 * rounds, with weights wy0 = 1 - lambda, wy1 = lambda in [0, 1] of which the larger is
 * >= 1/2 (lambda >= 1/2, or else 1 - lambda > 1/2, and rounding is monotone; 1 and 0 when
 * in == out). Along the stretch lambda does not decrease (src is monotone, the tap fixed,
 * the clamps monotone), so wy0 does not increase and wy1 does not decrease. Hence:
 * - top, bottom <= 0 (-0 and -inf included): each product is <= 0 or NaN (-inf*0), and
 *   so is a sum of such (no +inf can arise), so v <= 0 or NaN: clear.
 * - top, bottom in [2^-100, FLT_MAX]: each product is >= 0, the larger weight's
 *   >= fl(2^-100 * 2^-1) = 2^-101 (no underflow: rounding is monotone and 2^-101 is
 *   normal), and a sum of non-negatives is >= each term: v >= 2^-101 (or +inf): set.
 * - both finite, top >= 0 >= bottom: both products, so their sum and its rounding, do
 *   not increase: the set pixels are a prefix of the stretch, as many as are set;
 *   top <= 0 <= bottom: a suffix. Either way the stretch flips at most once.
 * - otherwise (NaN, inf, a tiny positive beside a positive) nothing is known.
 *
 * classify_chunk() classifies the stretches of nx columns from xa, LANES columns at once
 * without a branch per column: it interpolates the cell rows along x at each column (the
 * profile, the reference's first pass exactly), counts the set pixels of the sloped
 * (prefix or suffix) stretches a row at a time, and lays out each column's flips: per
 * stretch (t, column j), at [t * CHUNK + j],
 * - offsets: the index of its first flip in the column's list (the flips before it),
 * - flip_pairs: that flip, y0 where the stretch's first pixel differs from the pixel
 *   above (the value above the box taken as 0), else its cut; then its cut, the row
 *   from which its value is the other one (y1: none);
 * and nflips[j], the column's number of flips, or -1 where a stretch of which nothing is
 * known makes the column go pixel by pixel (column_flips()). */
static VAS_VECTOR_CLONES void classify_chunk(const blocks *k, int xa, int nx)
{
    const int ncy = k->ncy, ncx = k->ncx, nys = k->nys;
    const int32_t *c0 = k->xc0 + xa, *c1 = k->xc1 + xa;
    const float *w0 = k->wx0 + xa, *w1 = k->wx1 + xa;
    const int padded = (nx + LANES - 1) / LANES * LANES;
    /* The chunk's x segments, runs of columns with the same two cells along x. */
    int starts[CHUNK + 1], nxs = 0;
    for (int j = 0; j < nx; j++)
        if (j == 0 || c0[j] != c0[j - 1])
            starts[nxs++] = j;
    starts[nxs] = nx;
    for (int r = 0; r < ncy; r++) {
        const float *row = k->cells + (ptrdiff_t)r * ncx;
        float *out = k->profile + (ptrdiff_t)r * CHUNK;
        for (int s = 0; s < nxs; s++) {
            const float a = row[c0[starts[s]]], b = row[c1[starts[s]]];
            for (int j = starts[s]; j < starts[s + 1]; j++)
                out[j] = a * w0[j] + b * w1[j];
        }
        for (int j = nx; j < padded; j++)  /* lanes past the chunk: computed, ignored */
            out[j] = 0.0f;
    }
    const vfloat zero = {0}, lo = zero + 0x1p-100f, big = zero + FLT_MAX;
    const vint none = {0};
    const float *wy0 = k->wy0, *wy1 = k->wy1;
    for (int j = 0; j < padded; j += LANES) {
        vint below = none;    /* the value of the last pixel so far */
        vint count = none;    /* flips so far */
        vint unknown = none;  /* a stretch of which nothing is known */
        for (int t = 0; t < nys; t++) {
            const ptrdiff_t at = (ptrdiff_t)t * CHUNK + j;
            vfloat top, bottom;
            load_lanes(&top, k->profile + (ptrdiff_t)k->ys_r0[t] * CHUNK + j);
            load_lanes(&bottom, k->profile + (ptrdiff_t)k->ys_r1[t] * CHUNK + j);
            const int y0 = k->ys_start[t], y1 = k->ys_start[t + 1];
            const vint first = none + y0, end = none + y1, len = end - first;
            const vint clear = (top <= zero) & (bottom <= zero);
            const vint set = (top >= lo) & (top <= big) & (bottom >= lo) & (bottom <= big);
            const vint falls = (top >= zero) & (top <= big) & (bottom <= zero)
                               & (bottom >= -big) & ~clear;
            const vint rises = (top <= zero) & (top >= -big) & (bottom >= zero)
                               & (bottom <= big) & ~clear;
            const vint sloped = falls | rises;
            vint n = none;  /* set pixels, for the sloped lanes */
            if (any_lane(&sloped))
                for (int y = y0; y < y1; y++)
                    n -= top * wy0[y] + bottom * wy1[y] > zero;
            /* The value from y0 and the cut: a prefix of n pixels is set from y0 if
             * n > 0, clear from y0 + n; a suffix is set from y1 - n, all of it if n is len. */
            const vint prefix = falls & (n > 0), suffix = rises & (n < len);
            const vint value = set | prefix | (rises & (n == len));
            const vint cut = (prefix & (first + n)) | (suffix & (end - n))
                             | (~(prefix | suffix) & end);
            const vint enters = value != below, leaves = cut < end;
            store_lanes(k->offsets + at, &count);
            const vint flip = (enters & first) | (~enters & cut);
            int32_t *pairs = k->flip_pairs + 2 * at;
            for (int i = 0; i < LANES; i++) {
                pairs[2 * i] = flip[i];
                pairs[2 * i + 1] = cut[i];
            }
            count -= enters + leaves;
            below = value ^ leaves;
            unknown |= ~(clear | set | sloped);
        }
        const vint nflips = unknown | (~unknown & count);  /* -1 where unknown */
        store_lanes(k->nflips + j, &nflips);
    }
}

/* Column j of the chunk classify_chunk() last filled, as the rows where its value flips,
 * the value above the box taken as 0: writes them to flips (bh + 1 slots) and returns how
 * many. */
static int column_flips(const blocks *k, int j, int32_t *flips)
{
    const int n = k->nflips[j];
    if (n >= 0) {
        /* Each stretch writes two slots; those past its flips are the next stretch's
         * (written after) or past the column's. A stretch's flips are rows in [y0, y1),
         * so its offset is <= y0 < bh. */
        const int nys = k->nys;
        const int32_t *offsets = k->offsets + j, *pairs = k->flip_pairs + 2 * j;
        for (int t = 0; t < nys; t++)
            memcpy(flips + offsets[t * CHUNK], pairs + 2 * t * CHUNK, 2 * sizeof(int32_t));
        return n;
    }
    int m = 0;
    uint8_t v = 0;
    for (int t = 0; t < k->nys; t++) {
        const float top = k->profile[(ptrdiff_t)k->ys_r0[t] * CHUNK + j];
        const float bottom = k->profile[(ptrdiff_t)k->ys_r1[t] * CHUNK + j];
        for (int y = k->ys_start[t]; y < k->ys_start[t + 1]; y++) {
            const uint8_t bit = top * k->wy0[y] + bottom * k->wy1[y] > 0.0f;
            if (bit != v) {
                flips[m++] = y;
                v = bit;
            }
        }
    }
    return m;
}

/* ------------------------------------------------------------------------------------ */
/* COCO RLE                                                                              */

typedef struct {
    char *s;
    uint64_t prev1, prev2;  /* the last two counts */
    size_t n;               /* counts written */
} rle_writer;

/* pycocotools' rleToString for one count: from the fourth count on, the difference with
 * the count two before; 5 bits a character, low first, 0x20 = more follow, + 48. Most
 * take one or two characters, written without a branch (the second byte is written
 * either way: the text has a byte to spare at its end). */
static inline void put_count(rle_writer *w, uint64_t count)
{
    int64_t x = (int64_t)count;
    if (w->n > 2)
        x -= (int64_t)w->prev2;
    w->prev2 = w->prev1;
    w->prev1 = count;
    w->n++;
    if (x >= -512 && x < 512) {  /* x's high part, x >> 5, is in [-16, 16) */
        const int one = x >= -16 && x < 16;
        w->s[0] = (char)((x & 0x1f) + (one ? 48 : 48 + 0x20));
        w->s[1] = (char)((((uint64_t)x >> 5) & 0x1f) + 48);
        w->s += 2 - one;
        return;
    }
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
        blocks k;
        prepare(&k, g, p, coeffs, coeff_stride, b, base, &l);
        int32_t *flips = (int32_t *)(base + l.flips);
        uint8_t v = 0;
        /* A column's pixels below the box, and the next column's above it, are 0: a run
         * of 1s ends at the column's end unless the box spans whole columns, or the frame
         * ends there (the last count is then that run). */
        const int spans = b->y0 == 0 && b->y1 == g->src_h;
        for (int xa = 0; xa < bw; xa += CHUNK) {
            const int nx = bw - xa < CHUNK ? bw - xa : CHUNK;
            classify_chunk(&k, xa, nx);
            for (int j = 0; j < nx; j++) {
                const int x = xa + j;
                const uint64_t at = (uint64_t)(b->x0 + x) * h + (uint64_t)b->y0;
                const int n = column_flips(&k, j, flips);
                /* The flips are against 0 above the box; with v (the last run carried
                 * from the column before) a flip at 0 cancels, or else one is due. */
                int i = 0;
                if (v && n > 0 && flips[0] == 0) {
                    i = 1;
                } else if (v) {
                    put_count(&w, at - last);
                    last = at;
                }
                for (; i < n; i++) {
                    put_count(&w, at + (uint64_t)flips[i] - last);
                    last = at + (uint64_t)flips[i];
                }
                v = (uint8_t)(n & 1);
                if (v && (!spans || x == bw - 1) && at + (uint64_t)bh < total) {
                    put_count(&w, at + (uint64_t)bh - last);
                    last = at + (uint64_t)bh;
                    v = 0;
                }
            }
        }
    }
    put_count(&w, total - last);
    *counts = base + l.text;
    return (size_t)(w.s - (base + l.text));
}

/* ------------------------------------------------------------------------------------ */
/* Polygon                                                                               */

static int32_t root_of(run *runs, int32_t i)
{
    while (runs[i].parent != i) {
        runs[i].parent = runs[runs[i].parent].parent;  /* path halving */
        i = runs[i].parent;
    }
    return i;
}

static void join(run *runs, int32_t a, int32_t b)
{
    a = root_of(runs, a);
    b = root_of(runs, b);
    if (a == b)
        return;
    if (a > b) {
        const int32_t t = a;
        a = b;
        b = t;
    }
    runs[b].parent = a;
    runs[a].size += runs[b].size;
    if (runs[b].first < runs[a].first)
        runs[a].first = runs[b].first;
}

/* The mask as column runs, grouped into 8-connected parts: returns the number of runs,
 * columns[x] the first of column x (columns[bw] = the count). */
static int32_t label(const blocks *k, int32_t *flips, int32_t *columns, run *runs)
{
    int32_t n = 0;
    for (int xa = 0; xa < k->bw; xa += CHUNK) {
        const int nx = k->bw - xa < CHUNK ? k->bw - xa : CHUNK;
        classify_chunk(k, xa, nx);
        for (int x = xa; x < xa + nx; x++) {
            const int32_t prev = x ? columns[x - 1] : 0;
            columns[x] = n;
            const int m = column_flips(k, x - xa, flips);
            for (int i = 0; i < m; i += 2) {
                const int32_t y0 = flips[i], y1 = i + 1 < m ? flips[i + 1] : k->bh;
                runs[n] = (run){y0, y1, n, y1 - y0, y0 * k->bw + x};
                n++;
            }
            /* Runs of neighbouring columns touch (8-connected) when their rows, each
             * widened by one, overlap; both lists are sorted and disjoint, so one sweep
             * advancing the run that ends first meets every touching pair. */
            for (int32_t i = prev, j = columns[x]; i < columns[x] && j < n;) {
                if (runs[j].y0 <= runs[i].y1 && runs[i].y0 <= runs[j].y1)
                    join(runs, i, j);
                if (runs[i].y1 < runs[j].y1)
                    i++;
                else
                    j++;
            }
        }
    }
    columns[k->bw] = n;
    return n;
}

/* The mask's runs, for the contour's lookups. */
typedef struct {
    const run *runs;
    const int32_t *columns;
    int bw, bh;
} run_map;

static int is_set(const run_map *m, int x, int y)
{
    if ((unsigned)x >= (unsigned)m->bw || (unsigned)y >= (unsigned)m->bh)
        return 0;
    int32_t lo = m->columns[x], hi = m->columns[x + 1];
    const int32_t first = lo;
    while (lo < hi) {  /* the last run starting at or above y */
        const int32_t mid = lo + (hi - lo) / 2;
        if (m->runs[mid].y0 <= y)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > first && y < m->runs[lo - 1].y1;
}

/* OpenCV's chain codes: 0 = +x, then counter-clockwise on the screen (2 = up). */
static const int code_dx[8] = {1, 1, 0, -1, -1, -1, 0, 1};
static const int code_dy[8] = {0, -1, -1, -1, 0, 1, 1, 1};

/* OpenCV's icvFetchContour for an outer border (Suzuki-Abe), CHAIN_APPROX_SIMPLE: a
 * point wherever the chain code changes. Follows set pixels from (x0, y0), the part's
 * first pixel in raster order, so it stays on that part. Writes the points, offset by
 * (ox, oy) and divided by (sx, sy), when out is not NULL; returns how many. */
static size_t trace(const run_map *m, int x0, int y0, int ox, int oy, float sx, float sy,
                    float *out)
{
    int s = 4;
    do
        s = (s - 1) & 7;
    while (!is_set(m, x0 + code_dx[s], y0 + code_dy[s]) && s != 4);
    if (s == 4) {  /* a single pixel */
        if (out) {
            out[0] = (float)(ox + x0) / sx;
            out[1] = (float)(oy + y0) / sy;
        }
        return 1;
    }
    const int x1 = x0 + code_dx[s], y1 = y0 + code_dy[s];  /* the first step's end */
    int x3 = x0, y3 = y0, prev_s = s ^ 4;
    size_t n = 0;
    for (;;) {
        int x4 = x3, y4 = y3;
        while (s < 15) {
            s++;
            x4 = x3 + code_dx[s & 7];
            y4 = y3 + code_dy[s & 7];
            if (is_set(m, x4, y4))
                break;
        }
        s &= 7;
        if (s != prev_s) {
            if (out) {
                out[2 * n] = (float)(ox + x3) / sx;
                out[2 * n + 1] = (float)(oy + y3) / sy;
            }
            n++;
            prev_s = s;
        }
        if (x4 == x0 && y4 == y0 && x3 == x1 && y3 == y1)
            break;
        x3 = x4;
        y3 = y4;
        s = (s + 4) & 7;
    }
    return n;
}

static run_map map_of(const mk_box *b, const void *scratch, const layout *l)
{
    const char *base = scratch;
    return (run_map){(const run *)(base + l->runs), (const int32_t *)(base + l->columns),
                     b->x1 - b->x0, b->y1 - b->y0};
}

size_t mk_polygon(const mk_geometry *g, const mk_protos *p, const char *coeffs,
                  ptrdiff_t coeff_stride, const mk_box *b, void *scratch)
{
    trace_state *state = scratch;
    state->x = state->y = -1;
    if (b->x1 == b->x0)
        return 0;
    layout l = {0};
    plan(&l, g, b, MK_POLYGON);  /* sized by mk_scratch_nbytes(): cannot fail here */
    char *base = scratch;
    blocks k;
    prepare(&k, g, p, coeffs, coeff_stride, b, base, &l);
    run *runs = (run *)(base + l.runs);
    const int32_t n = label(&k, (int32_t *)(base + l.flips), (int32_t *)(base + l.columns), runs);
    /* The largest part; ties: the first in raster order. */
    int32_t best = -1;
    for (int32_t i = 0; i < n; i++)
        if (runs[i].parent == i && (best < 0 || runs[i].size > runs[best].size
                                    || (runs[i].size == runs[best].size
                                        && runs[i].first < runs[best].first)))
            best = i;
    if (best < 0)
        return 0;
    state->x = runs[best].first % k.bw;
    state->y = runs[best].first / k.bw;
    const run_map m = map_of(b, scratch, &l);
    return trace(&m, state->x, state->y, 0, 0, 1.0f, 1.0f, NULL);
}

void mk_polygon_points(const mk_geometry *g, const mk_box *b, const void *scratch, float *points)
{
    const trace_state *state = scratch;
    if (state->x < 0)
        return;
    layout l = {0};
    plan(&l, g, b, MK_POLYGON);
    const run_map m = map_of(b, scratch, &l);
    trace(&m, state->x, state->y, b->x0, b->y0, (float)g->src_w, (float)g->src_h, points);
}
