/* rotated_nms.h: ProbIoU between rotated boxes, as Ultralytics 8.4 computes it for its
 * rotated NMS (utils/metrics.py: _get_covariance_matrix, batch_probiou).
 *
 * Each box (cx, cy, w, h, angle in radians) becomes a Gaussian: its centre and the
 * covariance [[a, c], [c, b]] of a uniform w x h rectangle turned by the angle. ProbIoU is
 * 1 - the Hellinger distance of two such Gaussians. Everything is float32, operation for
 * operation as torch evaluates the Ultralytics expressions (eps 1e-7); cos, sin, log and
 * exp are the double functions rounded to float32 (correctly rounded in practice, so the
 * numpy reference in tests/ reproduces them bit for bit).
 */
#ifndef VASIPC_ROTATED_NMS_H
#define VASIPC_ROTATED_NMS_H

#ifdef __cplusplus
extern "C" {
#endif

/* Ultralytics' max_wh: NMS separates classes by offsetting centres by class * 7680. */
#define RN_CLASS_OFFSET 7680.0f

typedef struct {
    float x, y;     /* centre, offset by class * RN_CLASS_OFFSET */
    float a, b, c;  /* covariance */
    float det;      /* max(a*b - c*c, 0) */
} rn_gaussian;

/* The Gaussian of one box of class `cls` (its centre offset as Ultralytics does). */
void rn_gaussian_of(float cx, float cy, float w, float h, float angle, int cls, rn_gaussian *g);

/* ProbIoU of box 1 (the higher-scored one: batch_probiou's obb1 row) and box 2; NaN for
 * degenerate arithmetic, as torch gives it. */
float rn_probiou(const rn_gaussian *g1, const rn_gaussian *g2);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_ROTATED_NMS_H */
