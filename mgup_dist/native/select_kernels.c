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
 * The loader adds -mavx2 -mfma -mpopcnt where torch reports AVX2 or better, so the loops vectorise to 256 bits
 * and fmaf is one instruction; the counting pass then runs on AVX2 intrinsics (count_range), which perform the
 * same float operations as its scalar form, lane by lane.
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

/* How a counting pass gets its scores: a[i], a[i]*b[i], or adam_quotient(a[i], v[i], eps)*b[i] with the
 * quotient also written to u[i]. */
enum score_mode { SCORES, PRODUCT, QUOTIENT };

/* The Adam direction the QUOTIENT mode forms while counting (NULL fields otherwise). */
struct quotient {
    const float *v;
    float eps;
    float *u;
};

/* Where a counting pass puts its band: the first `capacity` band scores go to band (and their positions plus
 * offset to where, when not NULL); written counts them all. */
struct band_sink {
    float *band;
    int64_t *where;
    int64_t capacity, offset, written;
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

/* The score at i (forming and storing the quotient in QUOTIENT mode). */
static inline __attribute__((always_inline)) float score_at(const float *a, const float *b, struct quotient q,
                                                            enum score_mode mode, int64_t i)
{
    if (mode == QUOTIENT) {
        float u = adam_quotient(a[i], q.v[i], q.eps);
        q.u[i] = u;
        return u * b[i];
    }
    return mode == PRODUCT ? a[i] * b[i] : a[i];
}

/* The counters of one counting pass over one range. */
struct tally {
    int64_t above, over_lower, nonfinite;
};

/* Scores [start, n) one at a time: counts, mask = s > upper (when not NULL), band into sink (when its band is
 * not NULL). */
static inline __attribute__((always_inline)) void count_scalar(const float *a, const float *b, struct quotient q,
                                                               enum score_mode mode, int64_t start, int64_t n,
                                                               float lower, float upper, uint8_t *mask,
                                                               struct band_sink *sink, struct tally *tally)
{
    for (int64_t i = start; i < n; i++) {
        float s = score_at(a, b, q, mode, i);
        int high = s > upper, low = s > lower;
        if (mask != NULL)
            mask[i] = (uint8_t)high;
        tally->above += high;
        tally->over_lower += low;
        tally->nonfinite += !(fabsf(s) <= FLT_MAX);
        if (sink->band != NULL && low && !high)
            keep(sink, s, i);
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
    if (mode == QUOTIENT) {
        __m256 root = _mm256_sqrt_ps(_mm256_loadu_ps(q.v + i));
        x = _mm256_div_ps(x, _mm256_add_ps(root, _mm256_set1_ps(q.eps)));
        _mm256_storeu_ps(q.u + i, x);
    }
    return _mm256_mul_ps(x, _mm256_loadu_ps(b + i));
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

/* count_scalar over [0, n), 32 scores per step: comparison bits give the counts (popcount), the comparisons
 * themselves the mask bytes (bool_bytes), and the band is left-packed eight scores at a time (pack_band; one
 * by one only near the end of the sink's room). Non-finite scores are only flagged here and counted by a
 * second look at the range when there are any. Specialised on `collect` (sink->band != NULL) by inlining. */
static inline __attribute__((always_inline)) void count_vector(const float *a, const float *b, struct quotient q,
                                                               enum score_mode mode, int collect, int64_t n,
                                                               float lower, float upper, uint8_t *mask,
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
        if (mask != NULL)
            _mm256_storeu_si256((__m256i *)(mask + i), bool_bytes(over));
        if (!collect)
            continue;
        uint32_t inside = over_lower & ~over_upper;
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
    count_scalar(a, b, q, mode, i, n, lower, upper, mask, sink, tally);
    if (_mm256_movemask_ps(flagged)) { /* rare: count the non-finite scores of the vector part */
        const float *scores = mode == QUOTIENT ? q.u : a;
        for (int64_t j = 0; j < i; j++) {
            float s = mode == SCORES ? scores[j] : scores[j] * b[j];
            tally->nonfinite += !(fabsf(s) <= FLT_MAX);
        }
    }
}

static inline __attribute__((always_inline)) void count_range(const float *a, const float *b, struct quotient q,
                                                              enum score_mode mode, int64_t n, float lower,
                                                              float upper, uint8_t *mask, struct band_sink *sink,
                                                              struct tally *tally)
{
    if (sink->band != NULL)
        count_vector(a, b, q, mode, 1, n, lower, upper, mask, sink, tally);
    else
        count_vector(a, b, q, mode, 0, n, lower, upper, mask, sink, tally);
}
#else
static inline __attribute__((always_inline)) void count_range(const float *a, const float *b, struct quotient q,
                                                              enum score_mode mode, int64_t n, float lower,
                                                              float upper, uint8_t *mask, struct band_sink *sink,
                                                              struct tally *tally)
{
    count_scalar(a, b, q, mode, 0, n, lower, upper, mask, sink, tally);
}
#endif

/* Counts over the scores of [0, n): out[0] = #(s > upper), out[1] = #(lower < s <= upper), out[2] = #non-finite,
 * out[3] = how many band scores (lower < s <= upper) there are to write. When band is not NULL the first
 * min(out[3], capacity) of them go to band in index order, and their positions plus offset to where (when not
 * NULL). When mask is not NULL it gets s > upper (so False in the band, for the caller to settle).
 * Specialised on the score mode by inlining. */
static void count_band(const float *a, const float *b, struct quotient q, int64_t n, int64_t offset, float lower,
                       float upper, float *band, int64_t *where, int64_t capacity, uint8_t *mask, int64_t *out)
{
    struct band_sink sink = {band, where, capacity, offset, 0};
    struct tally tally = {0, 0, 0};
    if (q.v != NULL)
        count_range(a, b, q, QUOTIENT, n, lower, upper, mask, &sink, &tally);
    else if (b != NULL)
        count_range(a, b, q, PRODUCT, n, lower, upper, mask, &sink, &tally);
    else
        count_range(a, b, q, SCORES, n, lower, upper, mask, &sink, &tally);
    out[0] = tally.above;
    out[1] = tally.over_lower - tally.above;
    out[2] = tally.nonfinite;
    out[3] = band != NULL ? sink.written : 0;
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

/* Which bin of count[] holds the rank-th (0-based) key; *rank becomes the rank within that bin. */
static inline uint32_t choose_bin(const int64_t *count, int64_t *rank)
{
    uint32_t chosen = 0;
    while (*rank >= count[chosen]) {
        *rank -= count[chosen];
        chosen++;
    }
    return chosen;
}

/* The digit that ends at bit top (0 <= top <= 31): up to 11 bits; returns its shift, *digits its bit mask. */
static inline int digit_at(int top, uint32_t *digits)
{
    int width = top + 1 < 11 ? top + 1 : 11;
    *digits = (1u << width) - 1;
    return top + 1 - width;
}

/* The rank-th smallest (0-based, rank < n) of keys[0, n), all of which agree with prefix above bit `top` (top
 * -1: all equal to prefix), by radix select on digits of up to 11 bits from bit `top` down. keys is overwritten
 * (the candidates are compacted into it without a branch per key). */
static uint32_t radix_select(uint32_t *keys, int64_t n, int64_t rank, int top, uint32_t prefix)
{
    int64_t count[2048];
    while (top >= 0) {
        uint32_t digits;
        int shift = digit_at(top, &digits);
        memset(count, 0, ((size_t)digits + 1) * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++)
            count[(keys[i] >> shift) & digits]++;
        uint32_t chosen = choose_bin(count, &rank);
        prefix |= chosen << shift;
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++) {
            uint32_t key = keys[i];
            keys[kept] = key;
            kept += ((key >> shift) & digits) == chosen;
        }
        n = kept;
        top = shift - 1;
    }
    return prefix;
}

/* keys[i] = order_key(values[i]) for i < n (n >= 1); returns the highest bit at which two keys differ (-1 when
 * all are equal), so every key agrees with keys[0] above it. */
static int form_keys(const float *values, int64_t n, uint32_t *keys)
{
    uint32_t first = order_key(values[0]), differ = 0;
    for (int64_t i = 0; i < n; i++) {
        keys[i] = order_key(values[i]);
        differ |= keys[i] ^ first;
    }
    return differ ? 31 - __builtin_clz(differ) : -1;
}

/* The bits of key above bit top (-1 <= top <= 31). */
static inline uint32_t above_bit(uint32_t key, int top)
{
    if (top < 0)
        return key;
    return top >= 31 ? 0 : key & ~((2u << top) - 1);
}

/* The rank-th smallest (0-based, 0 <= rank < n) of finite values[0, n), by radix select on the values'
 * order-preserving keys (-0.0 orders just below +0.0, which the callers treat as equal), from the highest bit at
 * which they differ. values is overwritten (it holds the candidate keys). */
static float order_statistic(float *values, int64_t n, int64_t rank)
{
    uint32_t *keys = (uint32_t *)values;
    int top = form_keys(values, n, keys);
    return key_value(radix_select(keys, n, rank, top, above_bit(keys[0], top)));
}

/* out[j] = the ranks[j]-th smallest (0-based, each in [0, n)) of finite values[0, n) (n >= 1), left unchanged:
 * the keys and the counts of their first digit are formed once for all ranks. keys and work hold n uint32
 * each. */
void mgup_order_statistics(const float *values, int64_t n, const int64_t *ranks, int64_t count, float *out,
                           uint32_t *keys, uint32_t *work)
{
    int top = form_keys(values, n, keys);
    uint32_t prefix = above_bit(keys[0], top);
    if (top < 0) {
        for (int64_t j = 0; j < count; j++)
            out[j] = key_value(prefix);
        return;
    }
    uint32_t digits;
    int shift = digit_at(top, &digits);
    int64_t bins[2048] = {0};
    for (int64_t i = 0; i < n; i++)
        bins[(keys[i] >> shift) & digits]++;
    for (int64_t j = 0; j < count; j++) {
        int64_t rank = ranks[j], kept = 0;
        uint32_t chosen = choose_bin(bins, &rank);
        for (int64_t i = 0; i < n; i++) {
            uint32_t key = keys[i];
            work[kept] = key;
            kept += ((key >> shift) & digits) == chosen;
        }
        out[j] = key_value(radix_select(work, kept, rank, shift - 1, prefix | chosen << shift));
    }
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
    float threshold = order_statistic(keys, n, n - k);
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
