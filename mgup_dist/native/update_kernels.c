/* Native CPU kernels for the elementwise parts of the updates: the Adam moments and direction, the Muon momentum, and
 * the (masked, decayed) scaled step (float32, contiguous; a step's direction may be bfloat16).
 *
 * Built together with select_kernels.c (see mgup_dist/native/__init__.py) and called through
 * mgup_dist/native/kernels.py. Each result is bit for bit what the torch operations the rules would otherwise
 * run give (built with -ffp-contract=off, so only the explicit fmaf fuses). The `parts` drivers split [0, n)
 * into that many ranges on torch's OpenMP team.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Element i of a direction given as float32 (bf16 == 0) or as bfloat16 bits (widened exactly). */
static inline float direction_at(const void *direction, int64_t bf16, int64_t i)
{
    if (!bf16)
        return ((const float *)direction)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)direction)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

#if defined(__AVX2__)
static inline __m256 direction8(const void *direction, int64_t bf16, int64_t i)
{
    if (!bf16)
        return _mm256_loadu_ps((const float *)direction + i);
    __m128i bits = _mm_loadu_si128((const __m128i *)((const uint16_t *)direction + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#endif

/* param[i] <- fma(direction[i] * f_i, alpha, param[i] * decay), f_i = high where the mask is set at i else low
 * (bool bytes, or bits when packed; no mask: f_i = 1). Bit for bit torch's param.mul_(decay) (a multiplication
 * by 1 changes no bit) followed by param.add_(direction * where(mask, high, low), alpha=alpha), or
 * param.add_(direction, alpha=alpha) without a mask, on CPUs with FMA; a bfloat16 direction is first widened to
 * float32, which is exact. */
static void scaled_update(float *param, const void *direction, int64_t bf16, const uint8_t *mask, int64_t packed,
                          int64_t n, float decay, float high, float low, float alpha)
{
    int64_t i = 0;
#if defined(__AVX2__)
    const __m256 highs = _mm256_set1_ps(high), lows = _mm256_set1_ps(low), step = _mm256_set1_ps(alpha);
    const __m256 decays = _mm256_set1_ps(decay), ones = _mm256_set1_ps(1.0f);
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; i + 8 <= n; i += 8) {
        __m256 factor = ones;
        if (mask != NULL && packed) { /* eight lanes per mask byte: lane j takes bit j */
            __m256i bits = _mm256_and_si256(_mm256_set1_epi32(mask[i >> 3]), lanes);
            factor = _mm256_blendv_ps(lows, highs, _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, lanes)));
        } else if (mask != NULL) {
            __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mask + i)));
            __m256i set = _mm256_cmpgt_epi32(bytes, _mm256_setzero_si256());
            factor = _mm256_blendv_ps(lows, highs, _mm256_castsi256_ps(set));
        }
        __m256 scaled = _mm256_mul_ps(direction8(direction, bf16, i), factor);
        __m256 decayed = _mm256_mul_ps(_mm256_loadu_ps(param + i), decays);
        _mm256_storeu_ps(param + i, _mm256_fmadd_ps(scaled, step, decayed));
    }
#endif
    for (; i < n; i++) {
        float factor = mask == NULL ? 1.0f : mask_get(mask, packed, i) ? high : low;
        param[i] = fmaf(direction_at(direction, bf16, i) * factor, alpha, param[i] * decay);
    }
}

void mgup_scaled_update(float *param, const void *direction, int64_t bf16, const uint8_t *mask, int64_t packed,
                        int64_t n, float decay, float high, float low, float alpha, int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = mask_part_start(n, t, parts), hi = mask_part_start(n, t + 1, parts);
        const void *part = bf16 ? (const void *)((const uint16_t *)direction + lo)
                                : (const void *)((const float *)direction + lo);
        scaled_update(param + lo, part, bf16, mask == NULL ? NULL : mask + mask_offset(lo, packed), packed, hi - lo,
                      decay, high, low, alpha);
    }
}

/* Sum-style momentum of one range: buf[i] <- buf[i]*mu + grad[i] (two roundings: torch's buf.mul_(mu).add_(grad));
 * with a direction, direction[i] <- fma(buf[i], mu, grad[i]) (torch's grad.add(buf, alpha=mu) on CPUs with FMA). */
static void momentum(float *restrict buf, const float *restrict grad, float *restrict direction, int64_t n, float mu)
{
    if (direction == NULL) {
        for (int64_t i = 0; i < n; i++)
            buf[i] = buf[i] * mu + grad[i];
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float updated = buf[i] * mu + grad[i];
        buf[i] = updated;
        direction[i] = fmaf(updated, mu, grad[i]);
    }
}

void mgup_momentum(float *buf, const float *grad, float *direction, int64_t n, float mu, int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = part_start(n, t, parts), hi = part_start(n, t + 1, parts);
        momentum(buf + lo, grad + lo, direction == NULL ? NULL : direction + lo, hi - lo, mu);
    }
}

/* u[i] = m[i] / (sqrt(v[i]) + eps) over [0, n) (u may alias m or v). */
static void direction(const float *m, const float *v, int64_t n, float eps, float *u)
{
    for (int64_t i = 0; i < n; i++)
        u[i] = adam_quotient(m[i], v[i], eps);
}

/* The moments updated in place from the gradient g (adam_moments with coef), then u[i] = m[i] / (sqrt(v[i]) + eps)
 * (u aliases none of m, v, g). */
static void moments_direction(float *restrict m, float *restrict v, const float *restrict g,
                              const float *restrict coef, int64_t n, float eps, float *restrict u)
{
    for (int64_t i = 0; i < n; i++) {
        float first = m[i], second = v[i];
        adam_moments(&first, &second, g[i], coef);
        m[i] = first;
        v[i] = second;
        u[i] = adam_quotient(first, second, eps);
    }
}

/* The Adam direction u of m and v over [0, n), split into `parts` ranges; with coef not NULL the moments are first
 * updated in place from g (see moments_direction, which fuses both into one pass). */
void mgup_adam_direction(float *m, float *v, const float *g, const float *coef, int64_t n, float eps, float *u,
                         int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = part_start(n, t, parts), hi = part_start(n, t + 1, parts);
        if (coef != NULL)
            moments_direction(m + lo, v + lo, g + lo, coef, hi - lo, eps, u + lo);
        else
            direction(m + lo, v + lo, hi - lo, eps, u + lo);
    }
}
