/* y = x @ W^T for a few rows of x, with W kept in its GGUF blocks (llama.cpp's Q4_1 / Q8_0) and
 * decoded on the fly: a decode step of a small batch is bound by the bytes of weights it reads,
 * and these blocks are 0.625 (Q4_1) or 1.06 (Q8_0) bytes a weight against float32's 4. The
 * decoded values are exactly the float32 weights the converter wrote (d * q + m), so this
 * changes only the order of float32 additions. Built by cpu/__init__.py (gcc -O3 -mavx2 -mfma
 * -mf16c) and called through ctypes.
 *
 * x:   [rows, k] float32, contiguous; k a multiple of 32
 * w:   [n, k / 32 * block_bytes] uint8, row r = the blocks of weight row r along k
 * out: [rows, n] float32
 * Q4_1 block (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles: element j < 16 is the low nibble of
 *   byte j, element j >= 16 the high nibble of byte j - 16; value = d * q + m.
 * Q8_0 block (34 bytes): fp16 d, 32 int8 q; value = d * q.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 16

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

static inline void q4_1_decode(const uint8_t *blk, __m256 q[4]) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
    const __m128i lo = _mm_and_si128(raw, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline __m256 dot32(const float *xb, const __m256 q[4]) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(xb), q[0]);
    __m256 b = _mm256_mul_ps(_mm256_loadu_ps(xb + 8), q[1]);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q[2], a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q[3], b);
    return _mm256_add_ps(a, b);
}

/* One row of x (a single decode): the accumulators stay in registers. */
static void gemv_q4_1_row(const float *x, const uint8_t *w, float *out, int64_t n, int64_t k) {
    const int64_t blocks = k / 32, row_bytes = blocks * 20;
    float xsum[blocks];
    for (int64_t b = 0; b < blocks; b++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += x[b * 32 + j];
        xsum[b] = s;
    }
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *wr = w + o * row_bytes;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        float macc = 0.f;
        int64_t b = 0;
        for (; b + 1 < blocks; b += 2) {
            __m256 q[4];
            q4_1_decode(wr + b * 20, q);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wr + b * 20)), dot32(x + b * 32, q), acc0);
            q4_1_decode(wr + (b + 1) * 20, q);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wr + (b + 1) * 20)), dot32(x + (b + 1) * 32, q), acc1);
            macc += half_to_float(wr + b * 20 + 2) * xsum[b] + half_to_float(wr + (b + 1) * 20 + 2) * xsum[b + 1];
        }
        for (; b < blocks; b++) {
            __m256 q[4];
            q4_1_decode(wr + b * 20, q);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wr + b * 20)), dot32(x + b * 32, q), acc0);
            macc += half_to_float(wr + b * 20 + 2) * xsum[b];
        }
        out[o] = hsum(_mm256_add_ps(acc0, acc1)) + macc;
    }
}

int gemv_q4_1(const float *x, const uint8_t *w, float *out, int64_t rows, int64_t n, int64_t k) {
    if (rows > MAX_ROWS || k % 32) return 1;
    if (rows == 1) {
        gemv_q4_1_row(x, w, out, n, k);
        return 0;
    }
    const int64_t blocks = k / 32, row_bytes = blocks * 20;
    float xsum[MAX_ROWS][blocks]; /* per row and block: sum of x, for the m * sum(x) term */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < blocks; b++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += x[r * k + b * 32 + j];
            xsum[r][b] = s;
        }
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *wr = w + o * row_bytes;
        __m256 acc[MAX_ROWS];
        float macc[MAX_ROWS];
        for (int64_t r = 0; r < rows; r++) {
            acc[r] = _mm256_setzero_ps();
            macc[r] = 0.f;
        }
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *blk = wr + b * 20;
            const __m256 d = _mm256_set1_ps(half_to_float(blk));
            const float m = half_to_float(blk + 2);
            const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
            const __m128i lo = _mm_and_si128(raw, low);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            const __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            for (int64_t r = 0; r < rows; r++) {
                const float *xb = x + r * k + b * 32;
                __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xb), q0);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q1, s);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q2, s);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q3, s);
                acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
                macc[r] += m * xsum[r][b];
            }
        }
        for (int64_t r = 0; r < rows; r++) out[r * n + o] = hsum(acc[r]) + macc[r];
    }
    return 0;
}

static inline void q8_0_decode(const uint8_t *blk, __m256 q[4]) {
    const __m128i qa = _mm_loadu_si128((const __m128i *)(blk + 2));
    const __m128i qb = _mm_loadu_si128((const __m128i *)(blk + 18));
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qa));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qa, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qb));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qb, 8)));
}

static void gemv_q8_0_row(const float *x, const uint8_t *w, float *out, int64_t n, int64_t k) {
    const int64_t blocks = k / 32, row_bytes = blocks * 34;
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *wr = w + o * row_bytes;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 1 < blocks; b += 2) {
            __m256 q[4];
            q8_0_decode(wr + b * 34, q);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wr + b * 34)), dot32(x + b * 32, q), acc0);
            q8_0_decode(wr + (b + 1) * 34, q);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wr + (b + 1) * 34)), dot32(x + (b + 1) * 32, q), acc1);
        }
        for (; b < blocks; b++) {
            __m256 q[4];
            q8_0_decode(wr + b * 34, q);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wr + b * 34)), dot32(x + b * 32, q), acc0);
        }
        out[o] = hsum(_mm256_add_ps(acc0, acc1));
    }
}

int gemv_q8_0(const float *x, const uint8_t *w, float *out, int64_t rows, int64_t n, int64_t k) {
    if (rows > MAX_ROWS || k % 32) return 1;
    if (rows == 1) {
        gemv_q8_0_row(x, w, out, n, k);
        return 0;
    }
    const int64_t blocks = k / 32, row_bytes = blocks * 34;
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *wr = w + o * row_bytes;
        __m256 acc[MAX_ROWS];
        for (int64_t r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *blk = wr + b * 34;
            const __m256 d = _mm256_set1_ps(half_to_float(blk));
            const __m128i qa = _mm_loadu_si128((const __m128i *)(blk + 2));
            const __m128i qb = _mm_loadu_si128((const __m128i *)(blk + 18));
            const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qa));
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qa, 8)));
            const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qb));
            const __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qb, 8)));
            for (int64_t r = 0; r < rows; r++) {
                const float *xb = x + r * k + b * 32;
                __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xb), q0);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q1, s);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q2, s);
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q3, s);
                acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
            }
        }
        for (int64_t r = 0; r < rows; r++) out[r * n + o] = hsum(acc[r]);
    }
    return 0;
}
