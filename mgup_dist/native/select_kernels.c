/* Native CPU kernels for MGUP's exact top-k selection (float32, contiguous).
 *
 * Loaded through ctypes by mgup_dist/native/__init__.py, which builds this file (with update_kernels.c) with the
 * system C compiler on first use; mgup_dist/native/kernels.py holds the Python side (argument checks, threads).
 * Every kernel works on one index range and keeps no state, so ranges run on concurrent threads; ctypes releases
 * the GIL.
 *
 * A score is a[i]*b[i] rounded to float32 (the MGUP alignment direction * gradient), or a[i] when b is NULL.
 * The first counting pass of an Adam rule may also form the direction itself: a[i] is then the first moment m,
 * and the direction adam_quotient(m, v, eps) is written to u as the scores are counted.
 * Every element gets the same float operations whatever its position (no reassociation, no FMA contraction:
 * built with -ffp-contract=off), so results do not depend on how a tensor is split into ranges or shards.
 * The loader adds -mavx2 -mfma where torch reports AVX2 or better, so the loops vectorise to 256 bits and fmaf
 * is one instruction.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 2048

static inline void block_scores(const float *a, const float *b, int64_t n, float *s)
{
    if (b == NULL) {
        memcpy(s, a, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < n; i++)
        s[i] = a[i] * b[i];
}

static inline int64_t block_length(int64_t start, int64_t n)
{
    return n - start < BLOCK ? n - start : BLOCK;
}

/* Copies the scores of x[0, m) in (lower, upper] to kept and their positions to at, in order; returns how many. */
static inline int64_t collect_band(const float *x, int64_t m, float lower, float upper, float *kept, int32_t *at)
{
    int64_t count = 0, i = 0;
#if defined(__AVX2__)
    const __m256 low = _mm256_set1_ps(lower), high = _mm256_set1_ps(upper);
    for (; i + 32 <= m; i += 32) { /* 32 at a time; the rare hits are picked from the comparisons' bits */
        uint32_t bits = 0;
        for (int lane = 0; lane < 4; lane++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * lane);
            __m256 inside = _mm256_and_ps(_mm256_cmp_ps(v, low, _CMP_GT_OQ), _mm256_cmp_ps(v, high, _CMP_LE_OQ));
            bits |= (uint32_t)_mm256_movemask_ps(inside) << (8 * lane);
        }
        while (bits) {
            int j = __builtin_ctz(bits);
            kept[count] = x[i + j];
            at[count++] = (int32_t)(i + j);
            bits &= bits - 1;
        }
    }
#endif
    for (; i < m; i++) { /* branch-free */
        kept[count] = x[i];
        at[count] = (int32_t)i;
        count += (x[i] > lower) & (x[i] <= upper);
    }
    return count;
}

/* How a counting pass gets its scores: a[i], a[i]*b[i], or adam_quotient(a[i], v[i], eps)*b[i] with the
 * quotient also written to u[i]. */
enum score_mode { SCORES, PRODUCT, QUOTIENT };

/* The Adam direction the QUOTIENT mode forms while counting (NULL fields otherwise). */
struct quotient {
    const float *v;
    float eps;
    float *u;
};

/* One fused loop over a block: its scores into s, flags = s > upper, and the counts above upper, above lower
 * and non-finite. Specialised on mode by inlining. */
static inline __attribute__((always_inline)) void score_block(const float *a, const float *b, struct quotient q,
                                                              enum score_mode mode, int64_t m, float lower,
                                                              float upper, float *s, uint8_t *flags,
                                                              int32_t *over_upper, int32_t *over_lower, int32_t *bad)
{
    int32_t high_count = 0, low_count = 0, bad_count = 0;
    for (int64_t i = 0; i < m; i++) {
        float v;
        if (mode == QUOTIENT) {
            float u = adam_quotient(a[i], q.v[i], q.eps);
            q.u[i] = u;
            v = u * b[i];
        } else {
            v = mode == PRODUCT ? a[i] * b[i] : a[i];
        }
        int high = v > upper;
        s[i] = v;
        flags[i] = (uint8_t)high;
        high_count += high;
        low_count += v > lower;
        bad_count += !(fabsf(v) <= FLT_MAX);
    }
    *over_upper = high_count;
    *over_lower = low_count;
    *bad = bad_count;
}

/* Counts over the scores of [0, n): out[0] = #(s > upper), out[1] = #(lower < s <= upper), out[2] = #non-finite,
 * out[3] = how many band scores (lower < s <= upper) there are to write. When band is not NULL the first
 * min(out[3], capacity) of them go to band in index order, and their positions plus offset to where (when not
 * NULL). When mask is not NULL it gets s > upper (so False in the band, for the caller to settle). */
static void count_band(const float *a, const float *b, struct quotient q, int64_t n, int64_t offset, float lower,
                       float upper, float *band, int64_t *where, int64_t capacity, uint8_t *mask, int64_t *out)
{
    float s[BLOCK], kept[BLOCK];
    int32_t at[BLOCK];
    uint8_t discard[BLOCK];
    int64_t above = 0, inside = 0, nonfinite = 0, written = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = block_length(start, n);
        int32_t over_upper = 0, over_lower = 0, bad = 0;
        uint8_t *flags = mask != NULL ? mask + start : discard;
        if (q.v != NULL) {
            struct quotient block = {q.v + start, q.eps, q.u + start};
            score_block(a + start, b + start, block, QUOTIENT, m, lower, upper, s, flags, &over_upper, &over_lower,
                        &bad);
        } else if (b != NULL) {
            score_block(a + start, b + start, q, PRODUCT, m, lower, upper, s, flags, &over_upper, &over_lower, &bad);
        } else {
            score_block(a + start, a + start, q, SCORES, m, lower, upper, s, flags, &over_upper, &over_lower, &bad);
        }
        above += over_upper;
        inside += over_lower - over_upper;
        nonfinite += bad;
        if (band == NULL || over_lower == over_upper)
            continue;
        int64_t count = collect_band(s, m, lower, upper, kept, at), room = capacity - written;
        int64_t copied = count < room ? count : room;
        if (copied > 0) {
            memcpy(band + written, kept, (size_t)copied * sizeof(float));
            if (where != NULL)
                for (int64_t j = 0; j < copied; j++)
                    where[written + j] = offset + start + at[j];
        }
        written += count;
    }
    out[0] = above;
    out[1] = inside;
    out[2] = nonfinite;
    out[3] = band != NULL ? written : 0;
}

/* mask[i] = s_i >= value for i < cut, s_i > value from cut on (cut clamped to [0, n]). */
static void fill_mask(const float *a, const float *b, int64_t n, float value, int64_t cut, uint8_t *mask)
{
    float s[BLOCK];
    cut = cut < 0 ? 0 : cut > n ? n : cut;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = block_length(start, n);
        int64_t middle = cut - start < 0 ? 0 : cut - start > m ? m : cut - start;
        block_scores(a + start, b ? b + start : NULL, m, s);
        for (int64_t i = 0; i < middle; i++)
            mask[start + i] = s[i] >= value;
        for (int64_t i = middle; i < m; i++)
            mask[start + i] = s[i] > value;
    }
}

/* The position just after the r-th (1-based) score equal to value, or -1 when [0, n) holds fewer; *ties is
 * set to the number of equal scores read (all of [0, n) when -1 is returned). */
int64_t mgup_locate_ties(const float *a, const float *b, int64_t n, float value, int64_t r, int64_t *ties)
{
    float s[BLOCK];
    int64_t seen = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = block_length(start, n);
        int64_t equal = 0;
        block_scores(a + start, b ? b + start : NULL, m, s);
        for (int64_t i = 0; i < m; i++)
            equal += s[i] == value;
        if (seen + equal >= r) {
            for (int64_t i = 0; i < m; i++) {
                seen += s[i] == value;
                if (seen == r) {
                    *ties = seen;
                    return start + i + 1;
                }
            }
        }
        seen += equal;
    }
    *ties = seen;
    return -1;
}

/* Sets mask[i] for the first r scores equal to value, in index order; returns how many it set (< r only when
 * [0, n) holds fewer). Reads only up to the r-th. */
int64_t mgup_mark_ties(const float *a, const float *b, int64_t n, float value, int64_t r, uint8_t *mask)
{
    float s[BLOCK];
    int64_t marked = 0;
    for (int64_t start = 0; start < n && marked < r; start += BLOCK) {
        int64_t m = block_length(start, n), equal = 0;
        block_scores(a + start, b ? b + start : NULL, m, s);
        for (int64_t i = 0; i < m; i++)
            equal += s[i] == value;
        if (marked + equal <= r) {
            for (int64_t i = 0; i < m; i++)
                mask[start + i] |= s[i] == value;
            marked += equal;
            continue;
        }
        for (int64_t i = 0; i < m && marked < r; i++) {
            if (s[i] == value) {
                mask[start + i] = 1;
                marked++;
            }
        }
    }
    return marked;
}

static inline uint32_t order_key(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

static inline float key_value(uint32_t key)
{
    uint32_t bits = key & 0x80000000u ? key & 0x7fffffffu : ~key;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* The rank-th smallest (0-based, 0 <= rank < n) of finite values[0, n), by a three-digit radix select on the
 * values' order-preserving keys (-0.0 orders just below +0.0, which the callers treat as equal). values is
 * overwritten (it holds the candidate keys). */
float mgup_order_statistic(float *values, int64_t n, int64_t rank)
{
    static const int shifts[3] = {21, 10, 0};
    static const uint32_t widths[3] = {11, 11, 10};
    uint32_t *keys = (uint32_t *)values;
    uint32_t prefix = 0;
    int64_t count[2048];
    for (int64_t i = 0; i < n; i++)
        keys[i] = order_key(values[i]);
    for (int digit = 0; digit < 3; digit++) {
        uint32_t bins = 1u << widths[digit], shift = (uint32_t)shifts[digit];
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < n; i++)
            count[(keys[i] >> shift) & (bins - 1)]++;
        uint32_t chosen = 0;
        while (rank >= count[chosen]) {
            rank -= count[chosen];
            chosen++;
        }
        prefix |= chosen << shift;
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++)
            if (((keys[i] >> shift) & (bins - 1)) == chosen)
                keys[kept++] = keys[i];
        n = kept;
    }
    return key_value(prefix);
}

/* The whole selection for a small tensor, in one call: mask = the exact top-k (1 <= k < n) of the scores, ties
 * to the lowest indices. work holds 2n floats. Returns the number of non-finite scores (mask unwritten then). */
int64_t mgup_topk_small(const float *a, const float *b, int64_t n, int64_t k, uint8_t *mask, float *work)
{
    float *s = work, *keys = work + n;
    int64_t bad = 0, above = 0;
    block_scores(a, b, n, s);
    for (int64_t i = 0; i < n; i++)
        bad += !(fabsf(s[i]) <= FLT_MAX);
    if (bad)
        return bad;
    memcpy(keys, s, (size_t)n * sizeof(float));
    float threshold = mgup_order_statistic(keys, n, n - k);
    for (int64_t i = 0; i < n; i++)
        above += s[i] > threshold;
    int64_t ties_left = k - above;
    for (int64_t i = 0; i < n; i++) {
        int equal = s[i] == threshold && ties_left > 0;
        ties_left -= equal;
        mask[i] = s[i] > threshold || equal;
    }
    return 0;
}

/* Settles the band of the last counting pass once the k-th score value is known: mask[where[j]] = band[j] >
 * value, or band[j] == value for the first r such j (the band is in flat order). */
void mgup_settle_band(const float *band, const int64_t *where, int64_t count, float value, int64_t r,
                      uint8_t *mask)
{
    for (int64_t j = 0; j < count; j++) {
        int equal = band[j] == value && r > 0;
        r -= equal;
        mask[where[j]] = band[j] > value || equal;
    }
}

/* count_band over `parts` ranges: range t's counts go to out[4t..4t+3], its band to band[t*capacity...] and the
 * band's flat positions to where[t*capacity...] (where and mask may be NULL). With v not NULL the pass is in
 * QUOTIENT mode: a is m, b the gradient, and u receives the direction adam_quotient(m, v, eps). */
void mgup_count_band(const float *a, const float *b, const float *v, float eps, float *u, int64_t n, float lower,
                     float upper, float *band, int64_t *where, int64_t capacity, uint8_t *mask, int64_t *out,
                     int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = part_start(n, t, parts), hi = part_start(n, t + 1, parts);
        struct quotient q = {v ? v + lo : NULL, eps, u ? u + lo : NULL};
        count_band(a + lo, b ? b + lo : NULL, q, hi - lo, lo, lower, upper, band ? band + t * capacity : NULL,
                   where ? where + t * capacity : NULL, capacity, mask ? mask + lo : NULL, out + 4 * t);
    }
}

void mgup_fill_mask(const float *a, const float *b, int64_t n, float value, int64_t cut, uint8_t *mask,
                    int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = part_start(n, t, parts), hi = part_start(n, t + 1, parts);
        fill_mask(a + lo, b ? b + lo : NULL, hi - lo, value, cut - lo, mask + lo);
    }
}
