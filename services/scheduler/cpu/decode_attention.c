/* Paged decode attention for the CPU, float32: one query token per request, read through the
 * request's KV slot list, with no gather into a padded copy. Built by cpu/__init__.py with
 * gcc -O3 -mavx2 -mfma (the loops over head_dim vectorize) and called through ctypes.
 *
 * q, out:       [B, H, D]          contiguous
 * k, v:         [N, KVH, D]        the layer's pool tensors (slot-major), contiguous
 * kv_indptr:    [B + 1]            request b's slots are kv_indices[kv_indptr[b] .. kv_indptr[b+1])
 * kv_indices:   [kv_indptr[B]]     int64 slots
 * Query head h reads kv head h / (H / KVH) (HF's repeat_kv layout).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int decode_attention_f32(const float *q, const float *k, const float *v, float *out,
                         const int64_t *kv_indptr, const int64_t *kv_indices, int64_t batch,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale) {
    const int64_t groups = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim; /* floats per slot: every kv head, read at once */
    int64_t max_len = 1;
    for (int64_t b = 0; b < batch; b++) {
        int64_t len = kv_indptr[b + 1] - kv_indptr[b];
        if (len > max_len) max_len = len;
    }
    float *scores = malloc(sizeof(float) * (size_t)(num_heads * max_len)); /* [H, len] */
    if (scores == NULL) return 1;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t *slots = kv_indices + kv_indptr[b];
        const int64_t len = kv_indptr[b + 1] - kv_indptr[b];
        const float *qb = q + b * num_heads * head_dim;
        float *ob = out + b * num_heads * head_dim;
        for (int64_t s = 0; s < len; s++) {
            const float *ks = k + slots[s] * row;
            for (int64_t h = 0; h < num_heads; h++) {
                const float *qh = qb + h * head_dim, *kh = ks + (h / groups) * head_dim;
                float dot = 0.f;
                for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
                scores[h * len + s] = dot * scale;
            }
        }
        for (int64_t h = 0; h < num_heads; h++) {
            float *sc = scores + h * len;
            float m = -INFINITY, sum = 0.f;
            for (int64_t s = 0; s < len; s++) m = sc[s] > m ? sc[s] : m;
            for (int64_t s = 0; s < len; s++) {
                sc[s] = expf(sc[s] - m);
                sum += sc[s];
            }
            const float inv = len > 0 ? 1.f / sum : 0.f;
            for (int64_t s = 0; s < len; s++) sc[s] *= inv;
        }
        for (int64_t i = 0; i < num_heads * head_dim; i++) ob[i] = 0.f;
        for (int64_t s = 0; s < len; s++) {
            const float *vs = v + slots[s] * row;
            for (int64_t h = 0; h < num_heads; h++) {
                const float p = scores[h * len + s];
                const float *vh = vs + (h / groups) * head_dim;
                float *oh = ob + h * head_dim;
                for (int64_t d = 0; d < head_dim; d++) oh[d] += p * vh[d];
            }
        }
    }
    free(scores);
    return 0;
}
