/* The native fast path of MGUP's exact top-k selection for one tensor: sample, bracket, one counting pass,
 * settle (mgup_dist/ops/select.py, `_native_mask`).
 *
 * mgup_select_sampled runs in one call what mgup_dist/ops/threshold.py's search_threshold does in its usual
 * single pass: the bracket around the k-th score from a strided sample it gathers (mgup_first_bracket, the same
 * float operations as `_bracket` with widen 1 on the interval (-inf, inf)), one counting pass that writes the
 * mask s > upper and collects the band (mgup_count_band), then the k-th score from the band and the band's
 * positions settled in the mask (or, when the bracket is a block of ties, the first ties marked from the bits of
 * them the pass recorded, reading no scores again). When the pass misses the k-th score or its band overflows
 * the buffers, it says so and the Python search takes over; the result is exact either way.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* out[t] = the score at start + t*stride for t < size: a (times b), or with v not NULL adam_quotient(a, v, eps)
 * times b, where with coef not NULL a and v are first updated as adam_moments would (in registers: the arrays are
 * left unchanged); split into `parts` ranges of t. */
static void sample_scores(const float *a, const float *b, const float *v, const float *coef, float eps,
                          int64_t start, int64_t stride, int64_t size, float *out, int64_t parts)
{
    /* scores fetched ahead, into L2 (prefetcht1): every sampled score is on its own cache line. Measured with
     * benchmarks.native_ab: 3-5 ms less per GPT-2-small MGUP-AdamW step than 16 ahead into L1 */
    const int64_t ahead = 48;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t part = 0; part < parts; part++) {
        int64_t end = part_start(size, part + 1, parts);
        for (int64_t t = part_start(size, part, parts); t < end; t++) {
            int64_t i = start + t * stride;
            if (t + ahead < end) {
                int64_t later = i + ahead * stride;
                __builtin_prefetch(a + later, 0, 2);
                if (b != NULL)
                    __builtin_prefetch(b + later, 0, 2);
                if (v != NULL)
                    __builtin_prefetch(v + later, 0, 2);
            }
            float x = a[i];
            if (v != NULL) {
                float second = v[i];
                if (coef != NULL)
                    adam_moments(&x, &second, b[i], coef);
                x = adam_quotient(x, second, eps);
            }
            out[t] = b != NULL ? x * b[i] : x;
        }
    }
}

/* The largest float smaller than x (-denorm_min for either zero; -inf stays -inf): s > float_below(x) is
 * s >= x. */
static inline float float_below(float x)
{
    return nextafterf(x, -INFINITY);
}

/* bracket[0] <= bracket[1]: the thresholds of the first counting pass for the k-th largest (1 <= k < n) of n
 * scores, from the sample pool[0, size) (size >= 1; the pool is left unchanged): the sample values a margin of
 * margin_sd standard deviations of the sample quantile (plus one) below and above the k-th's expected rank,
 * the upper one lowered to the float below it; -inf or inf where a rank falls outside the pool; swapped when
 * both fall in one block of ties. keys holds size uint32, work 2*size; up to `threads` threads order the pool. */
void mgup_first_bracket(const float *pool, int64_t size, int64_t n, int64_t k, double margin_sd, float *bracket,
                        uint32_t *keys, uint32_t *work, int64_t threads)
{
    double fraction = (double)k / (double)n;
    double centre = (double)size * (1 - fraction);
    double margin = margin_sd * sqrt((double)size * fraction * (1 - fraction)) + 1;
    int64_t ranks[2] = {(int64_t)floor(centre - margin), (int64_t)ceil(centre + margin)};
    int64_t wanted[2], count = 0;
    float stats[2];
    for (int j = 0; j < 2; j++)
        if (ranks[j] >= 0 && ranks[j] < size)
            wanted[count++] = ranks[j];
    mgup_segment_order_statistics(pool, size, &size, 1, wanted, count, stats, keys, work, threads);
    int used = 0;
    float lower = ranks[0] >= 0 && ranks[0] < size ? stats[used++] : -INFINITY;
    float upper = ranks[1] >= 0 && ranks[1] < size ? float_below(stats[used]) : INFINITY;
    bracket[0] = lower <= upper ? lower : upper;
    bracket[1] = lower <= upper ? upper : lower;
}

/* Settles the band of a counting pass over `parts` ranges (range t's band scores at band + t*capacity, their
 * positions at where + t*capacity, lengths[t] of each) once its k-th score value is known, with r of the k still
 * to choose among the band: those above value (the ranges on concurrent threads: their masks share no byte), then
 * the first ties in flat order. */
static void settle_parts(const float *band, const int64_t *where, int64_t capacity, const int64_t *lengths,
                         int64_t parts, float value, int64_t r, uint8_t *mask, int64_t packed)
{
    int64_t above[parts];
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t t = 0; t < parts; t++)
        above[t] = mgup_mark_above(band + t * capacity, where + t * capacity, lengths[t], value, mask, packed);
    for (int64_t t = 0; t < parts; t++)
        r -= above[t];
    for (int64_t t = 0; t < parts && r > 0; t++)
        r -= mgup_mark_band_ties(band + t * capacity, where + t * capacity, lengths[t], value, r, mask, packed);
}

/* Outcomes of mgup_select_sampled. */
enum { SELECTED = 0, MISSED = 1, NONFINITE = 2 };

/* The exact top-k (1 <= k < n) of the scores (as in mgup_count_band: a, a*b, or with v the quotient
 * adam_quotient(a, v, eps), written to u, times b, where with coef the counting pass first updates a and v in place
 * by adam_moments) into mask (bool bytes, or bits when packed), ties to the lowest indices, from the sample pool[0,
 * size): SELECTED, or NONFINITE (some score is NaN or infinite), or MISSED (the first bracket did not hold the k-th
 * score, or a range's band outgrew `capacity`; the mask is then unsettled and the caller searches on, with u formed
 * and the moments updated). The sample is gathered first into pool[0, size): the scores at start + t*stride (start
 * + (size - 1)*stride < n), split into sample_parts ranges; it stays there for the caller's search. band and where
 * hold parts*capacity entries (band also holds the bits of a block of ties when it has room for n bits); keys
 * max(size, parts*capacity) uint32 and work twice that; counts 4*parts int64 (mgup_count_band's out). */
int64_t mgup_select_sampled(const float *a, const float *b, float *v, const float *coef, float eps, float *u, int64_t n,
                            int64_t k, uint8_t *mask, int64_t packed, int64_t start, int64_t stride, float *pool,
                            int64_t size, int64_t sample_parts, double margin_sd, float *band, int64_t *where,
                            int64_t capacity, uint32_t *keys, uint32_t *work, int64_t *counts, int64_t parts)
{
    sample_scores(a, b, v, coef, eps, start, stride, size, pool, sample_parts);
    float bracket[2];
    mgup_first_bracket(pool, size, n, k, margin_sd, bracket, keys, work, sample_parts);
    float lower = bracket[0], upper = bracket[1];
    int collect = lower != float_below(upper);
    /* a block of ties is not collected: the band buffer holds its bits instead, when it has room for them */
    uint8_t *ties = !collect && parts * capacity * (int64_t)sizeof(float) >= (n + 7) / 8 ? (uint8_t *)band : NULL;
    mgup_count_band(a, b, v, coef, eps, u, n, lower, upper, collect ? band : NULL, collect ? where : NULL, capacity,
                    ties, mask, packed, counts, parts);
    int64_t above = 0, inside = 0, nonfinite = 0, lengths[parts];
    for (int64_t t = 0; t < parts; t++) {
        above += counts[4 * t];
        inside += counts[4 * t + 1];
        nonfinite += counts[4 * t + 2];
        lengths[t] = counts[4 * t + 3];
        if (lengths[t] > capacity)
            return nonfinite ? NONFINITE : MISSED;
    }
    if (nonfinite)
        return NONFINITE;
    if (above >= k || above + inside < k)
        return MISSED;
    if (!collect) { /* the bracket is one block of ties, all equal to upper: the first k - above join the mask */
        int64_t marked = ties != NULL ? mgup_mark_tie_bits(ties, n, k - above, mask, packed)
                                      : mgup_mark_ties(v != NULL ? u : a, b, n, upper, k - above, mask, packed);
        return marked == k - above ? SELECTED : MISSED;
    }
    int64_t rank = inside - (k - above);
    float value;
    mgup_segment_order_statistics(band, capacity, lengths, parts, &rank, 1, &value, keys, work, parts);
    settle_parts(band, where, capacity, lengths, parts, value, k - above, mask, packed);
    return SELECTED;
}
