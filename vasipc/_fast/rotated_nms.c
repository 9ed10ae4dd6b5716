/* rotated_nms.c: ProbIoU of rotated boxes, Ultralytics 8.4's arithmetic (see rotated_nms.h).
 *
 * Every expression keeps the operand order of the torch source, since float32 rounding
 * depends on it: torch evaluates `(a1 + a2) * (y1 - y2).pow(2) + ...` left to right, one
 * rounding per operation. The build targets baseline x86-64 (no FMA), so the compiler
 * cannot fuse a multiply-add and change a rounding.
 */
#include "rotated_nms.h"

#include <math.h>

static const float EPS = 1e-7f;  /* batch_probiou's eps, as a float32 tensor sees it */

/* The float32 result of the double function: what tests/reference_decode.py computes too. */
static inline float cos32(float x) { return (float)cos((double)x); }
static inline float sin32(float x) { return (float)sin((double)x); }
static inline float log32(float x) { return (float)log((double)x); }
static inline float exp32(float x) { return (float)exp((double)x); }

void rn_gaussian_of(float cx, float cy, float w, float h, float angle, int cls, rn_gaussian *g)
{
    const float offset = (float)cls * RN_CLASS_OFFSET;
    g->x = cx + offset;
    g->y = cy + offset;
    /* _get_covariance_matrix: a = w^2/12, b = h^2/12, rotated by the angle. */
    const float a = (w * w) / 12.0f, b = (h * h) / 12.0f;
    const float cos_t = cos32(angle), sin_t = sin32(angle);
    const float cos2 = cos_t * cos_t, sin2 = sin_t * sin_t;
    g->a = a * cos2 + b * sin2;
    g->b = a * sin2 + b * cos2;
    g->c = (a - b) * cos_t * sin_t;
    const float det = g->a * g->b - g->c * g->c;
    g->det = det < 0.0f ? 0.0f : det;  /* clamp_(0); NaN stays NaN */
}

float rn_probiou(const rn_gaussian *g1, const rn_gaussian *g2)
{
    const float a = g1->a + g2->a, b = g1->b + g2->b, c = g1->c + g2->c;
    const float dx = g1->x - g2->x, dy = g1->y - g2->y;
    const float det = a * b - c * c;
    const float t1 = ((a * (dy * dy) + b * (dx * dx)) / (det + EPS)) * 0.25f;
    const float t2 = ((c * (g2->x - g1->x) * dy) / (det + EPS)) * 0.5f;
    const float t3 = log32(det / (4.0f * sqrtf(g1->det * g2->det) + EPS) + EPS) * 0.5f;
    float bd = t1 + t2 + t3;
    /* clamp(eps, 100); comparisons are false for NaN, which passes through as in torch */
    bd = bd < EPS ? EPS : (bd > 100.0f ? 100.0f : bd);
    const float hd = sqrtf(1.0f - exp32(-bd) + EPS);
    return 1.0f - hd;
}
