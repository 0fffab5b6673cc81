/* Native CPU kernels for the elementwise parts of the Adam-family updates (float32, contiguous).
 *
 * Built together with select_kernels.c (see mgup_dist/native/__init__.py) and called through
 * mgup_dist/native/kernels.py. Each result is bit for bit what the torch operations the rules would otherwise
 * run give (built with -ffp-contract=off, so only the explicit fmaf fuses). The `parts` drivers split [0, n)
 * into that many ranges on torch's OpenMP team.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* param[i] <- fma(direction[i] * f_i, alpha, param[i]) with f_i = high where the mask is set at i else low
 * (bool bytes, or bits when packed): bit for bit torch's param.add_(direction * where(mask, high, low),
 * alpha=alpha) on CPUs with FMA. */
static void masked_update(float *param, const float *direction, const uint8_t *mask, int64_t packed, int64_t n,
                          float high, float low, float alpha)
{
    int64_t i = 0;
#if defined(__AVX2__)
    if (packed) { /* eight lanes per mask byte: lane j takes bit j */
        const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 highs = _mm256_set1_ps(high), lows = _mm256_set1_ps(low), step = _mm256_set1_ps(alpha);
        for (; i + 8 <= n; i += 8) {
            __m256i bits = _mm256_and_si256(_mm256_set1_epi32(mask[i >> 3]), lanes);
            __m256 factor = _mm256_blendv_ps(lows, highs, _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, lanes)));
            __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(direction + i), factor);
            _mm256_storeu_ps(param + i, _mm256_fmadd_ps(scaled, step, _mm256_loadu_ps(param + i)));
        }
    }
#endif
    if (!packed) { /* vectorised by the compiler */
        for (; i < n; i++) {
            float factor = mask[i] ? high : low;
            param[i] = fmaf(direction[i] * factor, alpha, param[i]);
        }
    }
    for (; i < n; i++) {
        float factor = mask_get(mask, packed, i) ? high : low;
        param[i] = fmaf(direction[i] * factor, alpha, param[i]);
    }
}

void mgup_masked_update(float *param, const float *direction, const uint8_t *mask, int64_t packed, int64_t n,
                        float high, float low, float alpha, int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = mask_part_start(n, t, parts), hi = mask_part_start(n, t + 1, parts);
        masked_update(param + lo, direction + lo, mask + mask_offset(lo, packed), packed, hi - lo, high, low, alpha);
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
