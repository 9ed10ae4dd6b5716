/* yolo_decode.c: YOLOv8 decode + per-class NMS for one image (see yolo_decode.h).
 *
 * The arithmetic follows Ultralytics' non_max_suppression on CPU: boxes cx +- w/2 in
 * float32, IoU = inter / (area_kept + area - inter) in float32 as torchvision computes
 * it, compared with the threshold in double; scores compared with the confidence
 * threshold in float32 (as torch and numpy compare a float32 tensor with a Python float).
 */
#include "yolo_decode.h"

#include <string.h>

#include "vas_debug.h"
#include "vector_clones.h"

/* Element [row, anchor] of the prediction (any strides). */
static inline float element(const yd_prediction *pred, int row, int anchor)
{
    return *(const float *)(pred->data + row * pred->row_stride + anchor * pred->col_stride);
}

int yd_capacity(const yd_prediction *pred, const yd_params *params)
{
    int capacity = params->max_detections;
    if (capacity > pred->num_anchors)
        capacity = pred->num_anchors;
    if (capacity > params->max_nms)
        capacity = params->max_nms;
    return capacity < 0 ? 0 : capacity;
}

size_t yd_scratch_nbytes(const yd_prediction *pred, const yd_params *params)
{
    const size_t n = (size_t)pred->num_anchors, kept = (size_t)yd_capacity(pred, params);
    return 2 * n * sizeof(uint64_t)                       /* sort keys + radix buffer */
           + n * (sizeof(float) + sizeof(int32_t))        /* best score, best class */
           + kept * (5 * sizeof(float) + sizeof(int32_t)) /* kept boxes, areas, chain */
           + (size_t)pred->num_classes * sizeof(int32_t); /* per-class chain heads */
}

/* ------------------------------------------------------------------------------------ */
/* Best class per anchor: classes in the outer loop, so each pass reads one contiguous   */
/* row of the [4 + nc, N] output. Strict > keeps the first maximum, as argmax does.      */

static inline void best_class_pass(const float *restrict scores, ptrdiff_t step, int n,
                                   int32_t cls, float *restrict best,
                                   int32_t *restrict best_class)
{
    for (int i = 0; i < n; i++) {
        const float v = scores[i * step], b = best[i];
        const int32_t k = best_class[i];
        const int better = v > b;
        best[i] = better ? v : b;
        best_class[i] = better ? cls : k;
    }
}

/* Vectorised with AVX2 (blends); the SSE2 baseline has none (vector_clones.h). */
static VAS_VECTOR_CLONES void best_classes(const yd_prediction *pred, float *best, int32_t *best_class)
{
    const int n = pred->num_anchors;
    for (int i = 0; i < n; i++) {
        best[i] = element(pred, 4, i);
        best_class[i] = 0;
    }
    const int contiguous = pred->col_stride == (ptrdiff_t)sizeof(float);
    const ptrdiff_t step = pred->col_stride / (ptrdiff_t)sizeof(float);
    for (int c = 1; c < pred->num_classes; c++) {
        const float *row = (const float *)(pred->data + (4 + c) * pred->row_stride);
        if (contiguous)
            best_class_pass(row, 1, n, c, best, best_class);  /* inlined with step 1 */
        else if (pred->col_stride % (ptrdiff_t)sizeof(float) == 0)
            best_class_pass(row, step, n, c, best, best_class);
        else
            for (int i = 0; i < n; i++) {
                const float v = element(pred, 4 + c, i);
                if (v > best[i]) {
                    best[i] = v;
                    best_class[i] = c;
                }
            }
    }
}

/* ------------------------------------------------------------------------------------ */
/* Candidate order: one uint64 key per candidate, ascending = score descending, then     */
/* anchor ascending, sorted by an LSD radix sort (stable, no comparator calls).          */

static inline uint64_t order_key(float score, int anchor)
{
    uint32_t bits;
    score += 0.0f;  /* -0.0 -> +0.0: equal scores must have equal keys */
    memcpy(&bits, &score, sizeof bits);
    /* IEEE float -> unsigned with the same order, then inverted for descending. */
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((uint64_t)~bits << 32) | (uint32_t)anchor;
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

/* ------------------------------------------------------------------------------------ */

static inline float clampf(float v, float lo, float hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

int yd_decode(const yd_prediction *pred, const yd_params *params, void *scratch,
              float *boxes, float *scores, int32_t *class_ids)
{
    const int n = pred->num_anchors, capacity = yd_capacity(pred, params);
    if (n == 0 || capacity == 0)
        return 0;

    char *p = (char *)scratch;
    uint64_t *keys = (uint64_t *)p;
    p += (size_t)n * sizeof(uint64_t);
    uint64_t *spare = (uint64_t *)p;
    p += (size_t)n * sizeof(uint64_t);
    float *best = (float *)p;
    p += (size_t)n * sizeof(float);
    int32_t *best_class = (int32_t *)p;
    p += (size_t)n * sizeof(int32_t);
    float *kept_box = (float *)p;                   /* x1, y1, x2, y2 in input pixels */
    p += (size_t)capacity * 4 * sizeof(float);
    float *kept_area = (float *)p;
    p += (size_t)capacity * sizeof(float);
    int32_t *next_same_class = (int32_t *)p;        /* kept boxes chained per class */
    p += (size_t)capacity * sizeof(int32_t);
    int32_t *class_head = (int32_t *)p;

    best_classes(pred, best, best_class);

    const float conf = params->conf_threshold;
    const uint8_t *mask = params->class_mask;
    int num_candidates = 0;
    for (int i = 0; i < n; i++)
        if (best[i] >= conf && (mask == NULL || mask[best_class[i]]))
            keys[num_candidates++] = order_key(best[i], i);
    if (num_candidates == 0)
        return 0;
    const uint64_t *order = radix_sort(keys, spare, num_candidates);
    if (num_candidates > params->max_nms)
        num_candidates = params->max_nms;

    for (int c = 0; c < pred->num_classes; c++)
        class_head[c] = -1;
    const double iou_threshold = params->iou_threshold;
    int kept = 0;
    /* Greedy in score order: a box survives unless a kept box of its class overlaps it
     * by more than the threshold. The first max_detections survivors are final, since
     * later candidates never suppress earlier ones: stop there. */
    for (int r = 0; r < num_candidates && kept < capacity; r++) {
        const int anchor = (int)(uint32_t)order[r];
        const int32_t cls = best_class[anchor];
        const float cx = element(pred, 0, anchor), cy = element(pred, 1, anchor);
        const float half_w = element(pred, 2, anchor) / 2;
        const float half_h = element(pred, 3, anchor) / 2;
        const float x1 = cx - half_w, y1 = cy - half_h, x2 = cx + half_w, y2 = cy + half_h;
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
        VAS_DEBUG_ASSERT(kept < capacity && cls >= 0 && cls < pred->num_classes);
        float *kb = kept_box + 4 * kept;
        kb[0] = x1;
        kb[1] = y1;
        kb[2] = x2;
        kb[3] = y2;
        kept_area[kept] = area;
        next_same_class[kept] = class_head[cls];
        class_head[cls] = kept;
        scores[kept] = best[anchor];
        class_ids[kept] = cls;
        kept++;
    }

    /* Undo the letterbox, clip to the source frame, normalise. */
    const double scale = params->scale, pad_x = params->pad_left, pad_y = params->pad_top;
    const double src_w = params->src_w, src_h = params->src_h;
    for (int k = 0; k < kept; k++) {
        const float *kb = kept_box + 4 * k;
        float *out = boxes + 4 * k;
        out[0] = clampf((float)((((double)kb[0] - pad_x) / scale) / src_w), 0.0f, 1.0f);
        out[1] = clampf((float)((((double)kb[1] - pad_y) / scale) / src_h), 0.0f, 1.0f);
        out[2] = clampf((float)((((double)kb[2] - pad_x) / scale) / src_w), 0.0f, 1.0f);
        out[3] = clampf((float)((((double)kb[3] - pad_y) / scale) / src_h), 0.0f, 1.0f);
    }
    return kept;
}
