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

/* The Adam moment update of one element, in place: m <- fma(g, c1, m*beta1), v <- fma(c2*g, g, v*beta2), with
 * coef = {beta1, c1, beta2, c2} (c1 = 1 - beta1 and c2 = 1 - beta2, each rounded to float32): bit for bit torch's
 * m.mul_(beta1).add_(g, alpha=c1) and v.mul_(beta2).addcmul_(g, g, value=c2) on CPUs with FMA. */
static inline void adam_moments(float *m, float *v, float g, const float *coef)
{
    *m = fmaf(g, coef[1], *m * coef[0]);
    *v = fmaf(coef[3] * g, g, *v * coef[2]);
}

static inline int64_t part_start(int64_t n, int64_t part, int64_t parts)
{
    return n * part / parts; /* n < 2**55 and parts < 256: no overflow */
}

/* part_start rounded down to a multiple of 64 elements (n for the last part): ranges of a packed mask (one bit per
 * element, see mask_or) then never share a byte, and a range's mask starts at byte part_start / 8. */
static inline int64_t mask_part_start(int64_t n, int64_t part, int64_t parts)
{
    return part >= parts ? n : part_start(n, part, parts) & ~(int64_t)63;
}

/* A mask's offset for element i: byte i of bool bytes, or byte i / 8 of packed bits (i a multiple of 8). */
static inline int64_t mask_offset(int64_t i, int64_t packed)
{
    return packed ? i >> 3 : i;
}

/* Sets the mask at element i when flag (0 or 1) is 1, leaving it otherwise: the bool byte i, or when packed bit
 * i % 8 of byte i / 8. */
static inline void mask_or(uint8_t *mask, int64_t packed, int64_t i, int flag)
{
    if (packed)
        mask[i >> 3] |= (uint8_t)(flag << (i & 7));
    else
        mask[i] |= (uint8_t)flag;
}

/* Writes flag (0 or 1) to the mask at element i (see mask_or). */
static inline void mask_put(uint8_t *mask, int64_t packed, int64_t i, int flag)
{
    if (!packed) {
        mask[i] = (uint8_t)flag;
        return;
    }
    uint8_t bit = (uint8_t)(1u << (i & 7));
    mask[i >> 3] = (uint8_t)(flag ? mask[i >> 3] | bit : mask[i >> 3] & ~bit);
}

/* The mask at element i (0 or 1). */
static inline int mask_get(const uint8_t *mask, int64_t packed, int64_t i)
{
    return packed ? mask[i >> 3] >> (i & 7) & 1 : mask[i];
}

/* Kernels of count_pass.c, select_kernels.c and update_kernels.c that the other sources call (documented there). */
void mgup_count_band(const float *a, const float *b, float *v, const float *coef, float eps, float *u, int64_t n,
                     float lower, float upper, float *band, int64_t *where, int64_t capacity, uint8_t *ties,
                     uint8_t *mask, int64_t packed, int64_t *out, int64_t parts);
void mgup_adam_direction(float *m, float *v, const float *g, const float *coef, int64_t n, float eps, float *u,
                         int64_t parts);
int64_t mgup_mark_ties(const float *a, const float *b, int64_t n, float value, int64_t r, uint8_t *mask,
                       int64_t packed);
int64_t mgup_mark_tie_bits(const uint8_t *ties, int64_t n, int64_t r, uint8_t *mask, int64_t packed);
int64_t mgup_mark_above(const float *band, const int64_t *where, int64_t count, float value, uint8_t *mask,
                        int64_t packed);
int64_t mgup_mark_band_ties(const float *band, const int64_t *where, int64_t count, float value, int64_t r,
                            uint8_t *mask, int64_t packed);
void mgup_segment_order_statistics(const float *values, int64_t stride, const int64_t *lengths, int64_t parts,
                                   const int64_t *ranks, int64_t count, float *out, uint32_t *keys, uint32_t *work,
                                   int64_t threads);

#endif
