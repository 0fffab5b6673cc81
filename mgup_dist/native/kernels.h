/* Shared by the native kernel sources: the Adam quotient and how a pass splits into per-thread ranges. */
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

#endif
