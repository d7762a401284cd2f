/* Structured outputs' token mask: logits[r, t] = -inf wherever bit t of mask row r is clear.
 * The mask is xgrammar's bitmask: int32 words, token t at bit t % 32 of word t / 32. A word of all
 * ones (free text) is skipped whole and a word of zeros (a constrained state) is a plain store loop;
 * the bit-by-bit loop of xgrammar's CPU kernel costs ~140 us a row at a 49k vocabulary.
 * Built by cpu/__init__.py and called through ctypes.
 *
 * logits: [rows, vocab] float32, contiguous
 * mask:   [rows, words] int32, contiguous; ids at or beyond words * 32 are masked
 */
#include <stdint.h>
#include <string.h>

int apply_token_bitmask_f32(float *logits, const int32_t *mask, int64_t rows, int64_t vocab, int64_t words) {
    const uint32_t neg_inf_bits = 0xff800000u; /* -inf, spelled in bits: -ffast-math assumes no infinities */
    float neg_inf;
    memcpy(&neg_inf, &neg_inf_bits, sizeof neg_inf);
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * vocab;
        const uint32_t *m = (const uint32_t *)(mask + r * words);
        for (int64_t w = 0; w * 32 < vocab; w++) {
            uint32_t bits = w < words ? m[w] : 0u;
            int64_t n = vocab - w * 32 < 32 ? vocab - w * 32 : 32;
            float *out = row + w * 32;
            if (bits == 0xffffffffu && n == 32)
                continue;
            if (bits == 0u) { /* most words, in a constrained state: a plain store loop */
                for (int64_t b = 0; b < n; b++)
                    out[b] = neg_inf;
                continue;
            }
            for (int64_t b = 0; b < n; b++)
                if (!((bits >> b) & 1u))
                    out[b] = neg_inf;
        }
    }
    return 0;
}
