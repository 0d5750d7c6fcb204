/* Grouped LoRA for decoding steps on the CPU: Punica's BGMV (shrink, then expand) for one token per row.
 *
 * Row b of x (one token) is composed with its own k LoRAs, pair p = b * k + j: a down projection A_p
 * (rank x in, row-major), an up projection BT_p (rank x out, row-major, B transposed) and a weight
 * w_p (routing weight times scaling); out_b += sum_p w_p * (A_p x_b) BT_p. The factors are read
 * where the adapters keep them (a pointer per pair), so an adapter shared by several rows is read
 * from memory once and then from cache, not once per row from a per-row copy; a pair of rank 0 adds
 * nothing. Rows are split among threads, so no two threads write one row. float32, contiguous.
 */
#include <stdint.h>

#define MAX_RANK 256 /* grouped_lora.py refuses larger ranks (they take the batched-matmul path) */

void grouped_lora_decode(const float *x, float *out, int64_t rows, int64_t k, int64_t in_features,
                         int64_t out_features, const int64_t *a_ptr, const int64_t *b_ptr,
                         const int64_t *rank, const float *weight, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < rows; b++) {
        const float *xb = x + b * in_features;
        float *ob = out + b * out_features;
        for (int64_t p = b * k; p < (b + 1) * k; p++) {
            const float *A = (const float *)(intptr_t)a_ptr[p];
            const float *BT = (const float *)(intptr_t)b_ptr[p];
            const int64_t r = rank[p];
            float h[MAX_RANK];
            for (int64_t j = 0; j < r; j++) {
                const float *Aj = A + j * in_features;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t i = 0; i < in_features; i++) acc += Aj[i] * xb[i];
                h[j] = acc * weight[p];
            }
            for (int64_t j = 0; j < r; j++) {
                const float *Bj = BT + j * out_features;
                const float hj = h[j];
#pragma omp simd
                for (int64_t o = 0; o < out_features; o++) ob[o] += hj * Bj[o];
            }
        }
    }
}
