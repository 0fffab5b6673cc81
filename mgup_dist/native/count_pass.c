/* The counting pass of MGUP's exact top-k selection (float32, contiguous): one pass over a tensor's scores that
 * counts those above two thresholds, collects the scores between them (the band) with their positions, writes
 * the mask s > upper (bool bytes, or packed bits) and flags non-finite scores; see mgup_dist/native/kernels.py
 * (`count_band`) and sampled_select.c, its usual caller.
 *
 * A score is a[i]*b[i] rounded to float32 (the MGUP alignment direction * gradient), or a[i] when b is NULL.
 * The first counting pass of an Adam rule may also form the direction itself: a[i] is then the first moment m,
 * and the direction adam_quotient(m, v, eps) is written to u as the scores are counted; with moment coefficients
 * the pass first updates m and v in place from the gradient b (adam_moments), so one pass does the Adam moment
 * update, the direction and the count.
 * Every element gets the same float operations whatever its position (no reassociation, no FMA contraction:
 * built with -ffp-contract=off), so results do not depend on how a tensor is split into ranges or shards.
 * Where the loader adds -mavx2 -mfma -mpopcnt the pass runs on AVX2 intrinsics (count_vector), which perform
 * the same float operations as its scalar form (count_scalar), lane by lane.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* How a counting pass gets its scores: a[i], a[i]*b[i], adam_quotient(a[i], v[i], eps)*b[i] with the quotient
 * also written to u[i], or (MOMENTS) the same after a[i] and v[i] are updated in place (adam_moments). */
enum score_mode { SCORES, PRODUCT, QUOTIENT, MOMENTS };

/* The Adam direction the QUOTIENT and MOMENTS modes form while counting (NULL pointers otherwise): m is a
 * writable alias of a (MOMENTS writes m and v), and coef adam_moments' coefficients. */
struct quotient {
    float *m, *v;
    float eps;
    float *u;
    float coef[4];
};

/* Where a counting pass puts its band: the first `capacity` band scores go to band (and their positions plus
 * offset to where, when not NULL); written counts them all. A pass that does not collect (band NULL) may instead
 * mark the band's positions in ties (packed bits of the range, when not NULL). */
struct band_sink {
    float *band;
    int64_t *where;
    int64_t capacity, offset, written;
    uint8_t *ties;
};

static inline void keep(struct band_sink *sink, float s, int64_t i)
{
    if (sink->written < sink->capacity) {
        sink->band[sink->written] = s;
        if (sink->where != NULL)
            sink->where[sink->written] = sink->offset + i;
    }
    sink->written++;
}

/* The score at i (forming and storing the quotient in QUOTIENT mode, after updating and storing the moments in
 * MOMENTS mode). */
static inline __attribute__((always_inline)) float score_at(const float *a, const float *b, struct quotient q,
                                                            enum score_mode mode, int64_t i)
{
    if (mode == QUOTIENT || mode == MOMENTS) {
        float m = a[i], v = q.v[i];
        if (mode == MOMENTS) {
            adam_moments(&m, &v, b[i], q.coef);
            q.m[i] = m;
            q.v[i] = v;
        }
        float u = adam_quotient(m, v, q.eps);
        q.u[i] = u;
        return u * b[i];
    }
    return mode == PRODUCT ? a[i] * b[i] : a[i];
}

/* The counters of one counting pass over one range. */
struct tally {
    int64_t above, over_lower, nonfinite;
};

/* Scores [start, n) one at a time: counts, mask = s > upper (when not NULL; bits when packed), band into sink
 * (when its band is not NULL). */
static inline __attribute__((always_inline)) void count_scalar(const float *a, const float *b, struct quotient q,
                                                               enum score_mode mode, int64_t start, int64_t n,
                                                               float lower, float upper, uint8_t *mask, int packed,
                                                               struct band_sink *sink, struct tally *tally)
{
    for (int64_t i = start; i < n; i++) {
        float s = score_at(a, b, q, mode, i);
        int high = s > upper, low = s > lower;
        if (mask != NULL)
            mask_put(mask, packed, i, high);
        tally->above += high;
        tally->over_lower += low;
        tally->nonfinite += !(fabsf(s) <= FLT_MAX);
        if (sink->band != NULL && low && !high)
            keep(sink, s, i);
        if (sink->ties != NULL)
            mask_put(sink->ties, 1, i, low && !high);
    }
}

#if defined(__AVX2__)
/* Eight scores from i: the same operations as score_at, eight lanes at a time (bit for bit). */
static inline __attribute__((always_inline)) __m256 score8(const float *a, const float *b, struct quotient q,
                                                           enum score_mode mode, int64_t i)
{
    __m256 x = _mm256_loadu_ps(a + i);
    if (mode == SCORES)
        return x;
    __m256 g = _mm256_loadu_ps(b + i);
    if (mode == QUOTIENT || mode == MOMENTS) {
        __m256 second = _mm256_loadu_ps(q.v + i);
        if (mode == MOMENTS) { /* adam_moments, lane by lane */
            x = _mm256_fmadd_ps(g, _mm256_set1_ps(q.coef[1]), _mm256_mul_ps(x, _mm256_set1_ps(q.coef[0])));
            second = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(q.coef[3]), g), g,
                                     _mm256_mul_ps(second, _mm256_set1_ps(q.coef[2])));
            _mm256_storeu_ps(q.m + i, x);
            _mm256_storeu_ps(q.v + i, second);
        }
        __m256 root = _mm256_sqrt_ps(second);
        x = _mm256_div_ps(x, _mm256_add_ps(root, _mm256_set1_ps(q.eps)));
        _mm256_storeu_ps(q.u + i, x);
    }
    return _mm256_mul_ps(x, g);
}

/* Four 8-lane comparison results (all-ones or zero lanes) as 32 bool bytes, in lane order. */
static inline __attribute__((always_inline)) __m256i bool_bytes(const __m256 *flags)
{
    __m256i low = _mm256_packs_epi32(_mm256_castps_si256(flags[0]), _mm256_castps_si256(flags[1]));
    __m256i high = _mm256_packs_epi32(_mm256_castps_si256(flags[2]), _mm256_castps_si256(flags[3]));
    __m256i bytes = _mm256_packs_epi16(low, high); /* 128-bit lanes interleave the four inputs' halves */
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    return _mm256_and_si256(bytes, _mm256_set1_epi8(1));
}

/* pack_lanes[x]: the lanes whose bit is set in x, in order, then zeros (for _mm256_permutevar8x32). */
static int32_t pack_lanes[256][8];

__attribute__((constructor)) static void fill_pack_lanes(void)
{
    for (int x = 0; x < 256; x++)
        for (int lane = 0, kept = 0; lane < 8; lane++)
            if (x >> lane & 1)
                pack_lanes[x][kept++] = lane;
}

/* Appends the scores of s whose bit is set in `inside` (bit j: lane j of s[j / 8]), and their positions
 * first + j when sink->where is not NULL, to the sink without a branch per score: each group of eight holding
 * any is left-packed and written whole, so the sink needs room for 32 more entries (the caller checks). */
static inline __attribute__((always_inline)) void pack_band(const __m256 *s, uint32_t inside, int64_t first,
                                                            struct band_sink *sink)
{
    for (int lane = 0; lane < 4; lane++) {
        uint32_t bits = (inside >> (8 * lane)) & 0xff;
        if (bits == 0) /* most lanes: the band is a few percent of the scores */
            continue;
        __m256i order = _mm256_loadu_si256((const __m256i *)pack_lanes[bits]);
        _mm256_storeu_ps(sink->band + sink->written, _mm256_permutevar8x32_ps(s[lane], order));
        if (sink->where != NULL) {
            __m256i base = _mm256_set1_epi64x(sink->offset + first + 8 * lane);
            int64_t *where = sink->where + sink->written;
            __m256i front = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(order));
            __m256i back = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(order, 1));
            _mm256_storeu_si256((__m256i *)where, _mm256_add_epi64(front, base));
            _mm256_storeu_si256((__m256i *)(where + 4), _mm256_add_epi64(back, base));
        }
        sink->written += __builtin_popcount(bits);
    }
}

/* count_scalar over [0, n), 32 scores per step: comparison bits give the counts (popcount) and the packed mask,
 * the comparisons themselves the mask bytes (bool_bytes), and the band is left-packed eight scores at a time (pack_band; one
 * by one only near the end of the sink's room). Non-finite scores are only flagged here and counted by a
 * second look at the range when there are any. Specialised on `collect` (sink->band != NULL) and `packed` by
 * inlining. */
static inline __attribute__((always_inline)) void count_vector(const float *a, const float *b, struct quotient q,
                                                               enum score_mode mode, int collect, int64_t n,
                                                               float lower, float upper, uint8_t *mask, int packed,
                                                               struct band_sink *sink, struct tally *tally)
{
    const __m256 low = _mm256_set1_ps(lower), high = _mm256_set1_ps(upper), largest = _mm256_set1_ps(FLT_MAX);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 flagged = _mm256_setzero_ps();
    int64_t above = 0, over_lower_total = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 s[4], over[4];
        uint32_t over_upper = 0, over_lower = 0;
        for (int lane = 0; lane < 4; lane++) {
            s[lane] = score8(a, b, q, mode, i + 8 * lane);
            over[lane] = _mm256_cmp_ps(s[lane], high, _CMP_GT_OQ);
            over_upper |= (uint32_t)_mm256_movemask_ps(over[lane]) << (8 * lane);
            over_lower |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s[lane], low, _CMP_GT_OQ)) << (8 * lane);
            flagged = _mm256_or_ps(flagged, _mm256_cmp_ps(_mm256_and_ps(s[lane], magnitude), largest, _CMP_NLE_UQ));
        }
        above += __builtin_popcount(over_upper);
        over_lower_total += __builtin_popcount(over_lower);
        if (mask != NULL && packed)
            memcpy(mask + i / 8, &over_upper, sizeof over_upper); /* bit j: score i + j (little-endian) */
        else if (mask != NULL)
            _mm256_storeu_si256((__m256i *)(mask + i), bool_bytes(over));
        uint32_t inside = over_lower & ~over_upper;
        if (!collect) {
            if (sink->ties != NULL)
                memcpy(sink->ties + i / 8, &inside, sizeof inside);
            continue;
        }
        if (sink->written + 32 <= sink->capacity) {
            pack_band(s, inside, i, sink);
            continue;
        }
        float kept[32];
        for (int lane = 0; lane < 4; lane++)
            _mm256_storeu_ps(kept + 8 * lane, s[lane]);
        for (; inside; inside &= inside - 1) {
            int j = __builtin_ctz(inside);
            keep(sink, kept[j], i + j);
        }
    }
    tally->above += above;
    tally->over_lower += over_lower_total;
    count_scalar(a, b, q, mode, i, n, lower, upper, mask, packed, sink, tally);
    if (_mm256_movemask_ps(flagged)) { /* rare: count the non-finite scores of the vector part */
        const float *scores = mode == QUOTIENT || mode == MOMENTS ? q.u : a;
        for (int64_t j = 0; j < i; j++) {
            float s = mode == SCORES ? scores[j] : scores[j] * b[j];
            tally->nonfinite += !(fabsf(s) <= FLT_MAX);
        }
    }
}

static inline __attribute__((always_inline)) void count_range(const float *a, const float *b, struct quotient q,
                                                              enum score_mode mode, int64_t n, float lower,
                                                              float upper, uint8_t *mask, int packed,
                                                              struct band_sink *sink, struct tally *tally)
{
    int collect = sink->band != NULL;
    if (collect && packed)
        count_vector(a, b, q, mode, 1, n, lower, upper, mask, 1, sink, tally);
    else if (collect)
        count_vector(a, b, q, mode, 1, n, lower, upper, mask, 0, sink, tally);
    else if (packed)
        count_vector(a, b, q, mode, 0, n, lower, upper, mask, 1, sink, tally);
    else
        count_vector(a, b, q, mode, 0, n, lower, upper, mask, 0, sink, tally);
}
#else
static inline __attribute__((always_inline)) void count_range(const float *a, const float *b, struct quotient q,
                                                              enum score_mode mode, int64_t n, float lower,
                                                              float upper, uint8_t *mask, int packed,
                                                              struct band_sink *sink, struct tally *tally)
{
    count_scalar(a, b, q, mode, 0, n, lower, upper, mask, packed, sink, tally);
}
#endif

/* Counts over the scores of [0, n): out[0] = #(s > upper), out[1] = #(lower < s <= upper), out[2] = #non-finite,
 * out[3] = how many band scores (lower < s <= upper) there are to write. When band is not NULL the first
 * min(out[3], capacity) of them go to band in index order, and their positions plus offset to where (when not
 * NULL); otherwise ties (when not NULL) gets the band's bits, packed. When mask is not NULL it gets s > upper (so
 * False in the band, for the caller to settle): bool bytes, or bits when packed. Specialised on the score mode by
 * inlining. */
static void count_band(const float *a, const float *b, struct quotient q, int64_t n, int64_t offset, float lower,
                       float upper, float *band, int64_t *where, int64_t capacity, uint8_t *ties, uint8_t *mask,
                       int packed, int64_t *out)
{
    struct band_sink sink = {band, where, capacity, offset, 0, band == NULL ? ties : NULL};
    struct tally tally = {0, 0, 0};
    if (q.v != NULL && q.m != NULL)
        count_range(a, b, q, MOMENTS, n, lower, upper, mask, packed, &sink, &tally);
    else if (q.v != NULL)
        count_range(a, b, q, QUOTIENT, n, lower, upper, mask, packed, &sink, &tally);
    else if (b != NULL)
        count_range(a, b, q, PRODUCT, n, lower, upper, mask, packed, &sink, &tally);
    else
        count_range(a, b, q, SCORES, n, lower, upper, mask, packed, &sink, &tally);
    out[0] = tally.above;
    out[1] = tally.over_lower - tally.above;
    out[2] = tally.nonfinite;
    out[3] = band != NULL ? sink.written : 0;
}

/* count_band over `parts` ranges (mask_part_start's): range t's counts go to out[4t..4t+3], its band to
 * band[t*capacity...] and the band's flat positions to where[t*capacity...] (where and mask may be NULL; the mask
 * is bool bytes, or bits when packed). A pass that does not collect (band NULL) writes the band's bits to ties
 * (packed, (n + 7) / 8 bytes) when that is not NULL. With v not NULL the pass is in QUOTIENT mode: a is m, b the
 * gradient, and u receives the direction adam_quotient(m, v, eps); with coef not NULL (MOMENTS mode) m = a and v
 * are first updated in place from b (adam_moments with coef). */
void mgup_count_band(const float *a, const float *b, float *v, const float *coef, float eps, float *u, int64_t n,
                     float lower, float upper, float *band, int64_t *where, int64_t capacity, uint8_t *ties,
                     uint8_t *mask, int64_t packed, int64_t *out, int64_t parts)
{
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t lo = mask_part_start(n, t, parts), hi = mask_part_start(n, t + 1, parts);
        struct quotient q = {coef ? (float *)a + lo : NULL, v ? v + lo : NULL, eps, u ? u + lo : NULL, {0, 0, 0, 0}};
        if (coef != NULL)
            memcpy(q.coef, coef, sizeof q.coef);
        count_band(a + lo, b ? b + lo : NULL, q, hi - lo, lo, lower, upper, band ? band + t * capacity : NULL,
                   where ? where + t * capacity : NULL, capacity, ties ? ties + mask_offset(lo, 1) : NULL,
                   mask ? mask + mask_offset(lo, packed) : NULL, (int)packed, out + 4 * t);
    }
}
