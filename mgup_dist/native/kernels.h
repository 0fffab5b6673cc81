/* Shared by the native kernel sources: the Adam quotient, how a pass splits into per-thread ranges, and the
 * selection kernels the sampled selection calls. */
#ifndef MGUP_KERNELS_H
#define MGUP_KERNELS_H

#include <math.h>
#include <stdint.h>

/* u = m / (sqrt(v) + eps), each operation correctly rounded to float32 (the IEEE square root, which torch's
 * CPU sqrt is not; see mgup_dist/rules/adam_direction.py). */
static inline float adam_quotient(float m, float v, float eps)
{
    return m / (sqrtf(v) + eps);
}

static inline int64_t part_start(int64_t n, int64_t part, int64_t parts)
{
    return n * part / parts; /* n < 2**55 and parts < 256: no overflow */
}

/* Kernels of select_kernels.c that sampled_select.c drives (documented there). */
void mgup_count_band(const float *a, const float *b, const float *v, float eps, float *u, int64_t n, float lower,
                     float upper, float *band, int64_t *where, int64_t capacity, uint8_t *mask, int64_t *out,
                     int64_t parts);
int64_t mgup_mark_ties(const float *a, const float *b, int64_t n, float value, int64_t r, uint8_t *mask);
void mgup_settle_band(const float *band, const int64_t *where, int64_t count, float value, int64_t r,
                      uint8_t *mask);
void mgup_order_statistics(const float *values, int64_t n, const int64_t *ranks, int64_t count, float *out,
                           uint32_t *keys, uint32_t *work);

#endif
