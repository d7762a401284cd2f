/* out = x @ W^T for the rows of a decode step, with W kept in its GGUF blocks (llama.cpp's Q4_1
 * and Q8_0) and decoded on the fly: a decode step is bound by the bytes of weights it reads, and
 * these blocks are 0.625 (Q4_1) or 1.06 (Q8_0) bytes a weight against float32's 4. Each block
 * decodes to exactly the float32 weights the converter wrote (d * q is exact in float32: an
 * 11-bit mantissa times a 4- or 8-bit integer; Q4_1 then adds m once), so only the order of the
 * float32 additions differs from a float32 GEMM. Built by cpu/__init__.py (gcc -O3 -mavx2 -mfma
 * -mf16c) and called through ctypes.
 *
 * x:   [rows, k] float32, contiguous; k a multiple of 32
 * w:   [n, k / 32 * block bytes] uint8: row o holds weight row o's blocks along k
 * out: [rows, n] float32
 * Q4_1 block (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles: element j < 16 is the low nibble of
 *   byte j, element j >= 16 the high nibble of byte j - 16; weight = d * q + m.
 * Q8_0 block (34 bytes): fp16 d, 32 int8 q; weight = d * q.
 *
 * A block is decoded once per group of up to 8 rows of x, whose accumulators stay in
 * registers, so a batch of rows costs about 4 FMAs per row per block.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void decode_q4_1(const uint8_t *blk, __m256 w[4]) {
    const __m256 d = _mm256_set1_ps(half_to_float(blk)), m = _mm256_set1_ps(half_to_float(blk + 2));
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
    const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
}

static inline void decode_q8_0(const uint8_t *blk, __m256 w[4]) {
    const __m256 d = _mm256_set1_ps(half_to_float(blk));
    const __m128i qa = _mm_loadu_si128((const __m128i *)(blk + 2));
    const __m128i qb = _mm_loadu_si128((const __m128i *)(blk + 18));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qa)), d);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qa, 8))), d);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qb)), d);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qb, 8))), d);
}

static inline __m256 fma32(const float *xb, const __m256 w[4], __m256 acc) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(xb), w[0], acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), w[1], acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), w[2], acc);
    return _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), w[3], acc);
}

/* One weight row o against rows [r0, r0 + R) of x; R is a compile-time constant in each
 * instantiation, so the accumulators are registers. */
#define GEMV_GROUP(NAME, DECODE, BYTES, R)                                                        \
    static void NAME(const float *x, const uint8_t *wr, float *out, int64_t r0, int64_t o,      \
                     int64_t n, int64_t k) {                                                     \
        __m256 acc[R];                                                                           \
        for (int r = 0; r < (R); r++) acc[r] = _mm256_setzero_ps();                              \
        for (int64_t b = 0; b < k / 32; b++) {                                                   \
            __m256 wv[4];                                                                        \
            DECODE(wr + b * (BYTES), wv);                                                        \
            for (int r = 0; r < (R); r++) acc[r] = fma32(x + (r0 + r) * k + b * 32, wv, acc[r]); \
        }                                                                                        \
        for (int r = 0; r < (R); r++) out[(r0 + r) * n + o] = hsum(acc[r]);                      \
    }

GEMV_GROUP(q4_1_rows1, decode_q4_1, 20, 1)
GEMV_GROUP(q4_1_rows2, decode_q4_1, 20, 2)
GEMV_GROUP(q4_1_rows4, decode_q4_1, 20, 4)
GEMV_GROUP(q4_1_rows8, decode_q4_1, 20, 8)
GEMV_GROUP(q8_0_rows1, decode_q8_0, 34, 1)
GEMV_GROUP(q8_0_rows2, decode_q8_0, 34, 2)
GEMV_GROUP(q8_0_rows4, decode_q8_0, 34, 4)
GEMV_GROUP(q8_0_rows8, decode_q8_0, 34, 8)

typedef void (*group_fn)(const float *, const uint8_t *, float *, int64_t, int64_t, int64_t, int64_t);

/* Weight row by weight row (it stays in L1 while every group of rows reads it): rows in groups
 * of 8, the remainder in groups of 4, 2, 1. */
static int gemv(const group_fn fns[4], int64_t block_bytes, const float *x, const uint8_t *w, float *out,
                int64_t rows, int64_t n, int64_t k) {
    if (k % 32) return 1;
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *wr = w + o * (k / 32) * block_bytes;
        int64_t r = 0;
        for (; r + 8 <= rows; r += 8) fns[3](x, wr, out, r, o, n, k);
        if (r + 4 <= rows) fns[2](x, wr, out, r, o, n, k), r += 4;
        if (r + 2 <= rows) fns[1](x, wr, out, r, o, n, k), r += 2;
        if (r < rows) fns[0](x, wr, out, r, o, n, k);
    }
    return 0;
}

int gemv_q4_1(const float *x, const uint8_t *w, float *out, int64_t rows, int64_t n, int64_t k) {
    static const group_fn fns[4] = {q4_1_rows1, q4_1_rows2, q4_1_rows4, q4_1_rows8};
    return gemv(fns, 20, x, w, out, rows, n, k);
}

int gemv_q8_0(const float *x, const uint8_t *w, float *out, int64_t rows, int64_t n, int64_t k) {
    static const group_fn fns[4] = {q8_0_rows1, q8_0_rows2, q8_0_rows4, q8_0_rows8};
    return gemv(fns, 34, x, w, out, rows, n, k);
}
