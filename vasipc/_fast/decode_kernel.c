/* decode_kernel.c: the detection decoder for every layout (see decode_kernel.h).
 *
 * The axis-aligned arithmetic follows Ultralytics' non_max_suppression on CPU: boxes
 * cx +- w/2 in float32, IoU = inter / (area_kept + area - inter) in float32 as
 * torchvision computes it, compared with the threshold in double; scores compared with
 * the confidence threshold in float32 (as torch and numpy compare a float32 tensor with
 * a Python float). Rotated NMS is Ultralytics' fast NMS over ProbIoU (rotated_nms.c).
 */
#include "decode_kernel.h"

#include <math.h>
#include <string.h>

#include "rotated_nms.h"
#include "vas_debug.h"
#include "vector_clones.h"

/* Element [row, field] of the prediction (any strides). */
static inline float element(const dk_prediction *pred, int row, int field)
{
    return *(const float *)(pred->data + row * pred->row_stride + field * pred->field_stride);
}

/* Candidates a call can see: one per row, or one per (row, class) pair. */
static inline int max_candidates(const dk_layout *layout, const dk_prediction *pred)
{
    return layout->score_mode == DK_SCORE_PAIRS ? pred->num_rows * layout->num_classes
                                                : pred->num_rows;
}

static inline int min_int(int a, int b) { return a < b ? a : b; }

int dk_capacity(const dk_layout *layout, const dk_prediction *pred, const dk_params *params)
{
    const int capacity = min_int(min_int(params->max_detections, max_candidates(layout, pred)),
                                 layout->max_nms);
    return capacity < 0 ? 0 : capacity;
}

size_t dk_scratch_nbytes(const dk_layout *layout, const dk_prediction *pred,
                         const dk_params *params)
{
    const size_t m = (size_t)max_candidates(layout, pred), n = (size_t)pred->num_rows;
    const size_t kept = (size_t)dk_capacity(layout, pred, params);
    const size_t nc = (size_t)layout->num_classes;
    size_t nbytes = 2 * m * sizeof(uint64_t);                 /* sort keys + radix buffer */
    if (layout->score_mode != DK_SCORE_PAIRS)
        nbytes += n * (sizeof(float) + sizeof(int32_t));      /* best score, class per row */
    if (layout->nms == DK_NMS_CLASS)
        nbytes += kept * (5 * sizeof(float) + sizeof(int32_t)) /* kept boxes, areas, chain */
                  + nc * sizeof(int32_t);                      /* per-class chain heads */
    else if (layout->nms == DK_NMS_ROTATED)                    /* every candidate: fast NMS */
        nbytes += (size_t)min_int((int)m, layout->max_nms) * (sizeof(rn_gaussian) + sizeof(int32_t))
                  + nc * sizeof(int32_t);
    return nbytes;
}

/* ------------------------------------------------------------------------------------ */
/* Best class per row: classes in the outer loop, so each pass reads one contiguous      */
/* column of the raw YOLO output (passed as out.T). Strict > keeps the first maximum, as  */
/* argmax does. With an objectness field the score of a class is class * obj (YOLOv5).   */

static inline void best_class_pass(const float *restrict scores, const float *restrict obj,
                                   ptrdiff_t step, int n, int32_t cls, float *restrict best,
                                   int32_t *restrict best_class)
{
    for (int i = 0; i < n; i++) {
        const float v = obj ? scores[i * step] * obj[i * step] : scores[i * step];
        const float b = best[i];
        const int32_t k = best_class[i];
        const int better = v > b;
        best[i] = better ? v : b;
        best_class[i] = better ? cls : k;
    }
}

/* Vectorised with AVX2 (blends); the SSE2 baseline has none (vector_clones.h). */
static VAS_VECTOR_CLONES void best_classes(const dk_layout *layout, const dk_prediction *pred,
                                           float *best, int32_t *best_class)
{
    const int n = pred->num_rows, first = layout->class_offset;
    const int with_obj = layout->score_mode == DK_SCORE_OBJ_X_CLASS;
    for (int i = 0; i < n; i++) {
        best[i] = with_obj ? element(pred, i, first) * element(pred, i, layout->obj_field)
                           : element(pred, i, first);
        best_class[i] = 0;
    }
    const ptrdiff_t step = pred->row_stride / (ptrdiff_t)sizeof(float);
    const int aligned = pred->row_stride % (ptrdiff_t)sizeof(float) == 0
                        && pred->field_stride % (ptrdiff_t)sizeof(float) == 0;
    const float *obj = with_obj ? (const float *)(pred->data + layout->obj_field * pred->field_stride)
                                : NULL;
    for (int c = 1; c < layout->num_classes; c++) {
        const float *col = (const float *)(pred->data + (first + c) * pred->field_stride);
        /* Each call is inlined with its own constants, so the common cases vectorise. */
        if (aligned && step == 1 && !with_obj)
            best_class_pass(col, NULL, 1, n, c, best, best_class);
        else if (aligned && !with_obj)
            best_class_pass(col, NULL, step, n, c, best, best_class);
        else if (aligned)
            best_class_pass(col, obj, step, n, c, best, best_class);
        else
            for (int i = 0; i < n; i++) {
                float v = element(pred, i, first + c);
                if (with_obj)
                    v *= element(pred, i, layout->obj_field);
                if (v > best[i]) {
                    best[i] = v;
                    best_class[i] = c;
                }
            }
    }
}

/* The logistic function in float32; exp is the double one rounded, as the reference. */
static inline float sigmoid32(float x)
{
    return 1.0f / (1.0f + (float)exp(-(double)x));
}

/* ------------------------------------------------------------------------------------ */
/* Candidate order: one uint64 key per candidate, ascending = score descending, then     */
/* candidate index ascending, sorted by an LSD radix sort (stable, no comparator calls). */
/* The key holds the score's bits, so the score is read back from it.                    */

static inline uint64_t order_key(float score, uint32_t index)
{
    uint32_t bits;
    score += 0.0f;  /* -0.0 -> +0.0: equal scores must have equal keys */
    memcpy(&bits, &score, sizeof bits);
    /* IEEE float -> unsigned with the same order, then inverted for descending. */
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((uint64_t)~bits << 32) | index;
}

static inline float key_score(uint64_t key)
{
    uint32_t bits = ~(uint32_t)(key >> 32);
    bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
    float score;
    memcpy(&score, &bits, sizeof score);
    return score;
}

/* Sorts keys[0..n); returns the buffer holding the result (keys or spare). */
static uint64_t *radix_sort(uint64_t *keys, uint64_t *spare, int n)
{
    uint64_t *src = keys, *dst = spare;
    for (int shift = 0; shift < 64; shift += 8) {
        size_t count[256] = {0};
        for (int i = 0; i < n; i++)
            count[(src[i] >> shift) & 0xff]++;
        if (count[(src[0] >> shift) & 0xff] == (size_t)n)
            continue;  /* every key has this digit: the pass would not move anything */
        size_t offset = 0;
        for (int d = 0; d < 256; d++) {
            const size_t c = count[d];
            count[d] = offset;
            offset += c;
        }
        for (int i = 0; i < n; i++)
            dst[count[(src[i] >> shift) & 0xff]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    return src;
}

/* Keys of every candidate; returns their number. */
static int collect_candidates(const dk_layout *layout, const dk_prediction *pred,
                              const dk_params *params, float *best, int32_t *best_class,
                              uint64_t *keys)
{
    const int n = pred->num_rows, nc = layout->num_classes;
    const float conf = params->conf_threshold;
    const uint8_t *mask = params->class_mask;
    int count = 0;
    switch (layout->score_mode) {
    case DK_SCORE_MAX_CLASS:
    case DK_SCORE_OBJ_X_CLASS:
        best_classes(layout, pred, best, best_class);
        for (int i = 0; i < n; i++) {
            const float score = layout->sigmoid ? sigmoid32(best[i]) : best[i];
            if (score >= conf && (mask == NULL || mask[best_class[i]]))
                keys[count++] = order_key(score, (uint32_t)i);
        }
        break;
    case DK_SCORE_FIELD:
        for (int i = 0; i < n; i++) {
            const float score = element(pred, i, layout->score_field);
            /* score <= 0: the zero padding rows of end-to-end exports */
            if (!(score > 0.0f && score >= conf))
                continue;
            const float value = element(pred, i, layout->class_field);
            if (!(value >= 0.0f && value < (float)nc) || (float)(int)value != value)
                continue;  /* not a class id */
            const int cls = (int)value;
            if (mask != NULL && !mask[cls])
                continue;
            best_class[i] = cls;
            keys[count++] = order_key(score, (uint32_t)i);
        }
        break;
    case DK_SCORE_PAIRS:
        for (int i = 0; i < n; i++)
            for (int c = 0; c < nc; c++) {
                const float v = element(pred, i, layout->class_offset + c);
                const float score = layout->sigmoid ? sigmoid32(v) : v;
                if (score >= conf && (mask == NULL || mask[c]))
                    keys[count++] = order_key(score, (uint32_t)(i * nc + c));
            }
        break;
    default:
        break;
    }
    return count;
}

/* ------------------------------------------------------------------------------------ */

/* The axis-aligned box of a row, x1, y1, x2, y2 in input pixels. */
static inline void read_box(const dk_layout *layout, const dk_prediction *pred, int row,
                            float box[4])
{
    const int f = layout->box_offset;
    const float sx = layout->box_scale_x, sy = layout->box_scale_y;
    if (layout->box_format == DK_BOX_XYXY) {
        box[0] = element(pred, row, f) * sx;
        box[1] = element(pred, row, f + 1) * sy;
        box[2] = element(pred, row, f + 2) * sx;
        box[3] = element(pred, row, f + 3) * sy;
    } else {
        const float cx = element(pred, row, f) * sx, cy = element(pred, row, f + 1) * sy;
        const float half_w = element(pred, row, f + 2) * sx / 2;
        const float half_h = element(pred, row, f + 3) * sy / 2;
        box[0] = cx - half_w;
        box[1] = cy - half_h;
        box[2] = cx + half_w;
        box[3] = cy + half_h;
    }
}

/* The rotated box of a row: cx, cy, w, h in input pixels, angle. */
static inline void read_rotated(const dk_layout *layout, const dk_prediction *pred, int row,
                                float rbox[5])
{
    const int f = layout->box_offset;
    rbox[0] = element(pred, row, f) * layout->box_scale_x;
    rbox[1] = element(pred, row, f + 1) * layout->box_scale_y;
    rbox[2] = element(pred, row, f + 2) * layout->box_scale_x;
    rbox[3] = element(pred, row, f + 3) * layout->box_scale_y;
    rbox[4] = element(pred, row, layout->angle_field);
}

/* Row and class of the candidate with this index. */
static inline void candidate(const dk_layout *layout, const int32_t *best_class, uint32_t index,
                             int *row, int *cls)
{
    if (layout->score_mode == DK_SCORE_PAIRS) {
        *row = (int)(index / (uint32_t)layout->num_classes);
        *cls = (int)(index % (uint32_t)layout->num_classes);
    } else {
        *row = (int)index;
        *cls = best_class[index];
    }
}

static inline void emit(const dk_outputs *out, int k, uint64_t key, int row, int cls)
{
    out->scores[k] = key_score(key);
    out->class_ids[k] = cls;
    out->rows[k] = row;
}

/* Greedy in score order: a box survives unless a kept box of its class overlaps it by
 * more than the threshold. The first `capacity` survivors are final, since later
 * candidates never suppress earlier ones: stop there. */
static int greedy_nms(const dk_layout *layout, const dk_prediction *pred, const dk_params *params,
                      const uint64_t *order, int num_candidates, int capacity,
                      const int32_t *best_class, char *scratch, const dk_outputs *out)
{
    float *kept_box = (float *)scratch;             /* x1, y1, x2, y2 in input pixels */
    scratch += (size_t)capacity * 4 * sizeof(float);
    float *kept_area = (float *)scratch;
    scratch += (size_t)capacity * sizeof(float);
    int32_t *next_same_class = (int32_t *)scratch;  /* kept boxes chained per class */
    scratch += (size_t)capacity * sizeof(int32_t);
    int32_t *class_head = (int32_t *)scratch;
    for (int c = 0; c < layout->num_classes; c++)
        class_head[c] = -1;

    const double iou_threshold = params->iou_threshold;
    int kept = 0;
    for (int r = 0; r < num_candidates && kept < capacity; r++) {
        int row, cls;
        candidate(layout, best_class, (uint32_t)order[r], &row, &cls);
        float box[4];
        read_box(layout, pred, row, box);
        const float x1 = box[0], y1 = box[1], x2 = box[2], y2 = box[3];
        const float area = (x2 - x1) * (y2 - y1);
        int suppressed = 0;
        for (int k = class_head[cls]; k >= 0; k = next_same_class[k]) {
            const float *kb = kept_box + 4 * k;
            const float iw = (x2 < kb[2] ? x2 : kb[2]) - (x1 > kb[0] ? x1 : kb[0]);
            const float ih = (y2 < kb[3] ? y2 : kb[3]) - (y1 > kb[1] ? y1 : kb[1]);
            const float inter = (iw > 0 ? iw : 0) * (ih > 0 ? ih : 0);
            const float iou = inter / (kept_area[k] + area - inter);
            if ((double)iou > iou_threshold) {
                suppressed = 1;
                break;
            }
        }
        if (suppressed)
            continue;
        VAS_DEBUG_ASSERT(kept < capacity && cls >= 0 && cls < layout->num_classes);
        float *kb = kept_box + 4 * kept;
        memcpy(kb, box, sizeof box);
        kept_area[kept] = area;
        next_same_class[kept] = class_head[cls];
        class_head[cls] = kept;
        emit(out, kept, order[r], row, cls);
        kept++;
    }
    return kept;
}

/* Ultralytics' TorchNMS.fast_nms over ProbIoU: a candidate is dropped when its ProbIoU
 * with ANY higher-scored candidate of its class, suppressed or not, is >= the threshold
 * (float32 comparison, as torch compares a float32 tensor with a Python float). The
 * upper-triangular matrix is never built: each candidate is compared with the earlier
 * ones of its class until one suppresses it. Ultralytics offsets classes by 7680 px
 * instead; the offset is kept in the arithmetic, and across classes ProbIoU is then 0
 * for any box smaller than thousands of pixels, except between two boxes of zero size
 * (ProbIoU ~1 however far apart): those suppress each other across classes in
 * Ultralytics and not here. */
static int rotated_fast_nms(const dk_layout *layout, const dk_prediction *pred,
                            const dk_params *params, const uint64_t *order, int num_candidates,
                            int capacity, const int32_t *best_class, char *scratch,
                            const dk_outputs *out)
{
    const float threshold = (float)params->iou_threshold;
    /* The zeroed diagonal of Ultralytics' matrix counts as an IoU >= a threshold <= 0,
     * so every candidate is suppressed then. */
    if (!(threshold > 0.0f))
        return 0;
    rn_gaussian *gaussian = (rn_gaussian *)scratch;
    scratch += (size_t)num_candidates * sizeof(rn_gaussian);
    int32_t *next_same_class = (int32_t *)scratch;   /* every candidate, chained per class */
    scratch += (size_t)num_candidates * sizeof(int32_t);
    int32_t *class_head = (int32_t *)scratch;
    for (int c = 0; c < layout->num_classes; c++)
        class_head[c] = -1;

    int kept = 0;
    for (int r = 0; r < num_candidates && kept < capacity; r++) {
        int row, cls;
        candidate(layout, best_class, (uint32_t)order[r], &row, &cls);
        float rbox[5];
        read_rotated(layout, pred, row, rbox);
        rn_gaussian *g = gaussian + r;
        rn_gaussian_of(rbox[0], rbox[1], rbox[2], rbox[3], rbox[4], cls, g);
        int suppressed = 0;
        for (int k = class_head[cls]; k >= 0; k = next_same_class[k])
            if (rn_probiou(gaussian + k, g) >= threshold) {
                suppressed = 1;
                break;
            }
        next_same_class[r] = class_head[cls];
        class_head[cls] = r;
        if (!suppressed)
            emit(out, kept++, order[r], row, cls);
    }
    return kept;
}

/* ------------------------------------------------------------------------------------ */

static inline float clampf(float v, float lo, float hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline double clampd(double v, double lo, double hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Input pixels -> source frame, clipped and normalised. */
static void write_box(const dk_params *params, const float box[4], float *out)
{
    const double sx = params->scale_x, sy = params->scale_y;
    const double pad_x = params->pad_left, pad_y = params->pad_top;
    const double src_w = params->src_w, src_h = params->src_h;
    out[0] = clampf((float)((((double)box[0] - pad_x) / sx) / src_w), 0.0f, 1.0f);
    out[1] = clampf((float)((((double)box[1] - pad_y) / sy) / src_h), 0.0f, 1.0f);
    out[2] = clampf((float)((((double)box[2] - pad_x) / sx) / src_w), 0.0f, 1.0f);
    out[3] = clampf((float)((((double)box[3] - pad_y) / sy) / src_h), 0.0f, 1.0f);
}

/* The rotated box in source pixels (not clipped: Ultralytics' scale_boxes(xywh=True) does
 * not clip), its corners in xywhr2xyxyxyxy order normalised, and their clipped bounds. */
static void write_rotated(const dk_params *params, const float rbox[5], float *rotated,
                          float *corners, float *box)
{
    const double sx = params->scale_x, sy = params->scale_y;
    const double src_w = params->src_w, src_h = params->src_h;
    rotated[0] = (float)(((double)rbox[0] - params->pad_left) / sx);
    rotated[1] = (float)(((double)rbox[1] - params->pad_top) / sy);
    rotated[2] = (float)((double)rbox[2] / sx);
    rotated[3] = (float)((double)rbox[3] / sy);
    rotated[4] = rbox[4];
    const double cx = rotated[0], cy = rotated[1], w = rotated[2], h = rotated[3];
    const double cos_t = cos((double)rotated[4]), sin_t = sin((double)rotated[4]);
    const double v1x = w / 2 * cos_t, v1y = w / 2 * sin_t;
    const double v2x = -h / 2 * sin_t, v2y = h / 2 * cos_t;
    const double xs[4] = {cx + v1x + v2x, cx + v1x - v2x, cx - v1x - v2x, cx - v1x + v2x};
    const double ys[4] = {cy + v1y + v2y, cy + v1y - v2y, cy - v1y - v2y, cy - v1y + v2y};
    double lo_x = INFINITY, lo_y = INFINITY, hi_x = -INFINITY, hi_y = -INFINITY;
    for (int i = 0; i < 4; i++) {
        const double x = xs[i] / src_w, y = ys[i] / src_h;
        corners[2 * i] = (float)x;
        corners[2 * i + 1] = (float)y;
        lo_x = x < lo_x ? x : lo_x;
        lo_y = y < lo_y ? y : lo_y;
        hi_x = x > hi_x ? x : hi_x;
        hi_y = y > hi_y ? y : hi_y;
    }
    box[0] = (float)clampd(lo_x, 0.0, 1.0);
    box[1] = (float)clampd(lo_y, 0.0, 1.0);
    box[2] = (float)clampd(hi_x, 0.0, 1.0);
    box[3] = (float)clampd(hi_y, 0.0, 1.0);
}

int dk_decode(const dk_layout *layout, const dk_prediction *pred, const dk_params *params,
              void *scratch, const dk_outputs *out)
{
    const int m = max_candidates(layout, pred), capacity = dk_capacity(layout, pred, params);
    if (m == 0 || capacity == 0)
        return 0;

    char *p = (char *)scratch;
    uint64_t *keys = (uint64_t *)p;
    p += (size_t)m * sizeof(uint64_t);
    uint64_t *spare = (uint64_t *)p;
    p += (size_t)m * sizeof(uint64_t);
    float *best = NULL;
    int32_t *best_class = NULL;
    if (layout->score_mode != DK_SCORE_PAIRS) {
        best = (float *)p;
        p += (size_t)pred->num_rows * sizeof(float);
        best_class = (int32_t *)p;
        p += (size_t)pred->num_rows * sizeof(int32_t);
    }

    int num_candidates = collect_candidates(layout, pred, params, best, best_class, keys);
    if (num_candidates == 0)
        return 0;
    const uint64_t *order = radix_sort(keys, spare, num_candidates);
    if (num_candidates > layout->max_nms)
        num_candidates = layout->max_nms;

    int kept;
    if (layout->nms == DK_NMS_CLASS) {
        kept = greedy_nms(layout, pred, params, order, num_candidates, capacity, best_class, p, out);
    } else if (layout->nms == DK_NMS_ROTATED) {
        kept = rotated_fast_nms(layout, pred, params, order, num_candidates, capacity, best_class,
                                p, out);
    } else {
        kept = min_int(num_candidates, capacity);
        for (int k = 0; k < kept; k++) {
            int row, cls;
            candidate(layout, best_class, (uint32_t)order[k], &row, &cls);
            emit(out, k, order[k], row, cls);
        }
    }

    for (int k = 0; k < kept; k++) {
        if (layout->angle_field >= 0) {
            float rbox[5];
            read_rotated(layout, pred, out->rows[k], rbox);
            write_rotated(params, rbox, out->rotated + 5 * k, out->corners + 8 * k,
                          out->boxes + 4 * k);
        } else {
            float box[4];
            read_box(layout, pred, out->rows[k], box);
            write_box(params, box, out->boxes + 4 * k);
        }
    }
    return kept;
}
