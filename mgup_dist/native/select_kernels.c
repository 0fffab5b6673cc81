/* Native CPU kernels for MGUP's exact top-k selection (float32, contiguous), besides the counting pass
 * (count_pass.c): ties, masks from a known threshold, radix order statistics, small tensors, settling a band.
 *
 * Loaded through ctypes by mgup_dist/native/__init__.py, which builds the sources with the system C compiler on
 * first use; mgup_dist/native/kernels.py holds the Python side (argument checks, threads). Every kernel works on
 * one index range and keeps no state, so ranges run on concurrent threads; ctypes releases the GIL.
 *
 * A score is a[i]*b[i] rounded to float32 (the MGUP alignment direction * gradient), or a[i] when b is NULL.
 * Every element gets the same float operations whatever its position (built with -ffp-contract=off), so results
 * do not depend on how a tensor is split into ranges or shards. A mask holds a bool byte per element, or, where
 * a kernel takes `packed`, one bit per element (see mask_or in kernels.h).
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

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

/* Sets the mask (bool bytes, or bits when packed) at the first r scores equal to value, in index order; returns
 * how many it set (< r only when [0, n) holds fewer). Reads only up to the r-th. */
int64_t mgup_mark_ties(const float *a, const float *b, int64_t n, float value, int64_t r, uint8_t *mask,
                       int64_t packed)
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
                mask_or(mask, packed, start + i, s[i] == value);
            marked += equal;
            continue;
        }
        for (int64_t i = 0; i < m && marked < r; i++) {
            if (s[i] == value) {
                mask_or(mask, packed, start + i, 1);
                marked++;
            }
        }
    }
    return marked;
}

/* The packed bits of elements [i, i + 64) (i a multiple of 8) as one word, element i + j in bit j. */
static inline uint64_t load_bits(const uint8_t *bits, int64_t i)
{
    uint64_t word;
    memcpy(&word, bits + i / 8, sizeof word);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    word = __builtin_bswap64(word);
#endif
    return word;
}

/* Writes a load_bits word back. */
static inline void store_bits(uint8_t *bits, int64_t i, uint64_t word)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    word = __builtin_bswap64(word);
#endif
    memcpy(bits + i / 8, &word, sizeof word);
}

/* Sets the mask (bool bytes, or bits when packed) at the first r set bits of ties (packed bits of n elements, as a
 * counting pass marks the k-th score's ties), in index order, 64 at a time; returns how many it set (< r only when
 * ties holds fewer). Reads ties only up to the r-th. */
int64_t mgup_mark_tie_bits(const uint8_t *ties, int64_t n, int64_t r, uint8_t *mask, int64_t packed)
{
    int64_t marked = 0, i = 0;
    for (; i + 64 <= n && marked < r; i += 64) {
        uint64_t word = load_bits(ties, i);
        int64_t count = __builtin_popcountll(word);
        for (; marked + count > r; count--) /* the r-th is in this word: drop the set bits after it */
            word &= ~(UINT64_C(1) << (63 - __builtin_clzll(word)));
        marked += count;
        if (packed)
            store_bits(mask, i, load_bits(mask, i) | word);
        else
            for (; word; word &= word - 1)
                mask[i + __builtin_ctzll(word)] = 1;
    }
    for (; i < n && marked < r; i++)
        if (mask_get(ties, 1, i)) {
            mask_or(mask, packed, i, 1);
            marked++;
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

/* Compacts the keys of [lo, hi) whose digit (key >> shift & digits) is `chosen` to the front of work + lo, in order,
 * without a branch per key (work may be keys itself); returns how many there are. */
static int64_t compact_digit(const uint32_t *keys, int64_t lo, int64_t hi, int shift, uint32_t digits,
                             uint32_t chosen, uint32_t *work)
{
    int64_t kept = 0;
    for (int64_t i = lo; i < hi; i++) {
        uint32_t key = keys[i];
        work[lo + kept] = key;
        kept += ((key >> shift) & digits) == chosen;
    }
    return kept;
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
        n = compact_digit(keys, 0, n, shift, digits, chosen, keys);
        top = shift - 1;
    }
    return prefix;
}

/* The bits of key above bit top (-1 <= top <= 31). */
static inline uint32_t above_bit(uint32_t key, int top)
{
    if (top < 0)
        return key;
    return top >= 31 ? 0 : key & ~((2u << top) - 1);
}

/* keys[i] = order_key(values[i]) for i < n (keys may be values itself); returns the bits at which some key
 * differs from `first` (the OR of every key ^ first). */
static uint32_t form_keys(const float *values, int64_t n, uint32_t first, uint32_t *keys)
{
    uint32_t differ = 0;
    for (int64_t i = 0; i < n; i++) {
        keys[i] = order_key(values[i]);
        differ |= keys[i] ^ first;
    }
    return differ;
}

/* The highest set bit of x, -1 for 0: the top bit at which keys differ, given form_keys' result. */
static inline int highest_bit(uint32_t x)
{
    return x ? 31 - __builtin_clz(x) : -1;
}

/* The rank-th smallest (0-based, 0 <= rank < n) of finite values[0, n) (n >= 1), by radix select on the values'
 * order-preserving keys (-0.0 orders just below +0.0, which the callers treat as equal), from the highest bit at
 * which they differ. values is overwritten (it holds the candidate keys). */
static float order_statistic(float *values, int64_t n, int64_t rank)
{
    uint32_t *keys = (uint32_t *)values, first = order_key(values[0]);
    int top = highest_bit(form_keys(values, n, first, keys));
    return key_value(radix_select(keys, n, rank, top, above_bit(first, top)));
}

/* Keys per thread below which the order statistics do not wake another thread, and the most threads they use. */
#define ORDER_SPLIT 8192
#define MAX_SPLIT 4

/* The threads for the order statistics of `total` keys: one per ORDER_SPLIT keys, at most `threads` and
 * MAX_SPLIT, at least one. */
static int64_t order_split(int64_t total, int64_t threads)
{
    int64_t split = total / ORDER_SPLIT;
    split = split < threads ? split : threads;
    split = split < MAX_SPLIT ? split : MAX_SPLIT;
    return split > 1 ? split : 1;
}

/* Moves the keys each of `team` members compacted to the front of its range of [0, total) (kept[member] of them) to
 * one run at the front of work; returns its length. */
static int64_t join_candidates(uint32_t *work, const int64_t *kept, int64_t total, int64_t team)
{
    int64_t length = kept[0];
    for (int64_t member = 1; member < team; member++) {
        memmove(work + length, work + part_start(total, member, team), (size_t)kept[member] * sizeof(uint32_t));
        length += kept[member];
    }
    return length;
}

/* The rank-th smallest of the `length` candidate keys at the front of work (all with the bits `prefix` above bit
 * shift - 1), as a float; with keep, the candidates are left in place (radix_select orders a copy at work + total,
 * total >= length). */
static float select_candidate(uint32_t *work, int64_t length, int64_t total, int64_t rank, int shift, uint32_t prefix,
                              int keep)
{
    uint32_t *candidates = keep ? memcpy(work + total, work, (size_t)length * sizeof(uint32_t)) : work;
    return key_value(radix_select(candidates, length, rank, shift - 1, prefix));
}

/* out[j] = the ranks[j]-th smallest (0-based, each in [0, total)) of the finite values in `parts` segments taken
 * as one sequence (segment t: values + t*stride, lengths[t] of them; total = their sum >= 1), left unchanged:
 * the keys and the counts of their first digit are formed once for all ranks, and consecutive ranks whose keys
 * share that digit share its candidates. keys holds total uint32, work 2*total. The passes over the keys split into
 * up to `threads` ranges (order_split) on one OpenMP team; the result does not depend on how many. */
void mgup_segment_order_statistics(const float *values, int64_t stride, const int64_t *lengths, int64_t parts,
                                   const int64_t *ranks, int64_t count, float *out, uint32_t *keys, uint32_t *work,
                                   int64_t threads)
{
    int64_t offsets[parts + 1], start = 0;
    offsets[0] = 0;
    for (int64_t t = 0; t < parts; t++)
        offsets[t + 1] = offsets[t] + lengths[t];
    while (lengths[start] == 0)
        start++;
    int64_t total = offsets[parts], split = order_split(total, threads), kept[MAX_SPLIT];
    uint32_t first = order_key(values[start * stride]), differ = 0, digits = 0;
    int64_t bins[MAX_SPLIT][2048], length = 0;
    int shift = 0, top = -1;
#pragma omp parallel num_threads(split) if (split > 1)
    {
        /* the team may be smaller than asked for: each member takes its share of the team's ranges */
        int64_t member = omp_get_thread_num(), team = omp_get_num_threads();
        uint32_t mine = 0;
        for (int64_t t = 0; t < parts; t++) {
            int64_t lo = part_start(lengths[t], member, team), hi = part_start(lengths[t], member + 1, team);
            mine |= form_keys(values + t * stride + lo, hi - lo, first, keys + offsets[t] + lo);
        }
#pragma omp atomic
        differ |= mine;
#pragma omp barrier
#pragma omp single
        {
            top = highest_bit(differ);
            if (top >= 0)
                shift = digit_at(top, &digits);
        }
        int64_t lo = part_start(total, member, team), hi = part_start(total, member + 1, team);
        if (top >= 0) {
            int64_t *own = bins[member];
            memset(own, 0, ((size_t)digits + 1) * sizeof(int64_t));
            for (int64_t i = lo; i < hi; i++)
                own[(keys[i] >> shift) & digits]++;
        }
#pragma omp barrier
#pragma omp single
        for (int64_t other = 1; other < team && top >= 0; other++) /* bins[0] becomes the whole count */
            for (uint32_t digit = 0; digit <= digits; digit++)
                bins[0][digit] += bins[other][digit];
        uint32_t previous = 0;
        for (int64_t j = 0; j < count && top >= 0; j++) {
            int64_t rank = ranks[j], next = j + 1 < count ? ranks[j + 1] : 0;
            uint32_t chosen = choose_bin(bins[0], &rank);
            if (j == 0 || chosen != previous) { /* this digit's candidates to the front of work */
                kept[member] = compact_digit(keys, lo, hi, shift, digits, chosen, work);
#pragma omp barrier
#pragma omp single
                length = join_candidates(work, kept, total, team);
            }
            previous = chosen;
#pragma omp single
            out[j] = select_candidate(work, length, total, rank, shift, above_bit(first, top) | chosen << shift,
                                      j + 1 < count && choose_bin(bins[0], &next) == chosen);
        }
    }
    if (top < 0) /* every value has one key */
        for (int64_t j = 0; j < count; j++)
            out[j] = key_value(above_bit(first, top));
}

/* mgup_segment_order_statistics of the contiguous values[0, n) (n >= 1), on up to `threads` threads. */
void mgup_order_statistics(const float *values, int64_t n, const int64_t *ranks, int64_t count, float *out,
                           uint32_t *keys, uint32_t *work, int64_t threads)
{
    mgup_segment_order_statistics(values, n, &n, 1, ranks, count, out, keys, work, threads);
}

/* The whole selection for a small tensor, in one call: mask = the exact top-k (1 <= k < n) of the scores (a, a*b,
 * or with v the scores u*b of the Adam direction u that mgup_adam_direction forms from a and v into u, with coef
 * updating the moments a and v first), ties to the lowest indices. work holds 2n floats. Returns the number of
 * non-finite scores (mask unwritten then; the direction formed). */
int64_t mgup_topk_small(float *a, const float *b, float *v, const float *coef, float eps, float *u, int64_t n,
                        int64_t k, uint8_t *mask, float *work)
{
    float *s = work, *keys = work + n;
    int64_t bad = 0, above = 0;
    if (v != NULL)
        mgup_adam_direction(a, v, b, coef, n, eps, u, 1);
    block_scores(v != NULL ? u : a, b, n, s);
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

/* Sets the mask (bool bytes, or bits when packed) at where[j] for every band score band[j] > value; returns how
 * many there are. */
int64_t mgup_mark_above(const float *band, const int64_t *where, int64_t count, float value, uint8_t *mask,
                        int64_t packed)
{
    int64_t above = 0;
    for (int64_t j = 0; j < count; j++) { /* no branch: about half the band lies above value */
        int high = band[j] > value;
        mask_or(mask, packed, where[j], high);
        above += high;
    }
    return above;
}

/* Sets the mask at where[j] for the first r band scores band[j] == value (the band is in flat order); returns how
 * many it set. Reads the band only up to the r-th. */
int64_t mgup_mark_band_ties(const float *band, const int64_t *where, int64_t count, float value, int64_t r,
                            uint8_t *mask, int64_t packed)
{
    int64_t marked = 0;
    for (int64_t j = 0; j < count && marked < r; j++)
        if (band[j] == value) {
            mask_or(mask, packed, where[j], 1);
            marked++;
        }
    return marked;
}

/* Settles the band of the last counting pass once the k-th score value is known: the mask (bool bytes, or bits
 * when packed; False at the band's positions, as the counting pass leaves it) at where[j] becomes band[j] >
 * value, or band[j] == value for the first r such j. */
void mgup_settle_band(const float *band, const int64_t *where, int64_t count, float value, int64_t r,
                      uint8_t *mask, int64_t packed)
{
    mgup_mark_above(band, where, count, value, mask, packed);
    mgup_mark_band_ties(band, where, count, value, r, mask, packed);
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
