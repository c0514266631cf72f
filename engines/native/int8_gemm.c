/* Weight-only int8 matrix products for the lean decode step on x86 CPUs with AVX2 and FMA.
 *
 * Built at first use by engines/native.py with the machine's C compiler (cc -O3 -mavx2 -mfma -fopenmp),
 * loaded with ctypes; without a compiler the gateway keeps torch's _weight_int8pack_mm. Why: torch's
 * kernel takes bf16 activations and streams 2-6 GB/s on a small model's 576-column matrices on a 2-core
 * AVX2 CPU; this one keeps float32 activations and accumulators (about 1e-7 relative error against the
 * dequantized product, where bf16 activations give about 3e-3) and streams 5-13 GB/s on the same
 * matrices. OpenMP here resolves to the libgomp torch already loaded, so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One output channel n for MB rows (constants in each instantiation), U independent accumulators per
 * row to hide the FMA latency. The channel's weights are read front to back, one stream, so short rows
 * (576 columns) prefetch as well as long ones; the MB rows of x come from L1. */
#define BLOCK(MB, U)                                                                            \
    static inline __attribute__((always_inline)) void block_##MB(                              \
        const float *x, const int8_t *w, const uint16_t *scales, float *out, long N, long K,   \
        long n, long m0) {                                                                      \
        __m256 acc[MB][U];                                                                      \
        for (int r = 0; r < MB; r++)                                                            \
            for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();                        \
        const int8_t *wn = w + n * K;                                                           \
        const float *xm = x + m0 * K;                                                           \
        long k = 0;                                                                             \
        for (; k + 8 * U <= K; k += 8 * U) {                                                    \
            for (int u = 0; u < U; u++) {                                                       \
                __m256 wv = load8_i8(wn + k + 8 * u);                                           \
                for (int r = 0; r < MB; r++)                                                    \
                    acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + r * K + k + 8 * u), wv, acc[r][u]); \
            }                                                                                   \
        }                                                                                       \
        for (; k < K; k += 8) {                                                                 \
            __m256 wv = load8_i8(wn + k);                                                       \
            for (int r = 0; r < MB; r++)                                                        \
                acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + r * K + k), wv, acc[r][0]);    \
        }                                                                                       \
        float s = bf16_to_f32(scales[n]);                                                       \
        for (int r = 0; r < MB; r++) {                                                          \
            __m256 total = acc[r][0];                                                           \
            for (int u = 1; u < U; u++) total = _mm256_add_ps(total, acc[r][u]);                \
            out[(m0 + r) * N + n] = hsum(total) * s;                                            \
        }                                                                                       \
    }
BLOCK(1, 8)
BLOCK(2, 4)
BLOCK(4, 2)

/* out[M, N] = x[M, K] @ (w[N, K] * scales[N, None]).T: float32 activations and accumulation, bf16
 * scales. Requires K % 8 == 0 (the caller checks). Threads split the output channels. */
void int8_gemm_f32(const float *x, const int8_t *w, const uint16_t *scales, float *out, long M, long N,
                   long K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        long m = 0;
        for (; m + 4 <= M; m += 4) block_4(x, w, scales, out, N, K, n, m);
        for (; m + 2 <= M; m += 2) block_2(x, w, scales, out, N, K, n, m);
        for (; m < M; m++) block_1(x, w, scales, out, N, K, n, m);
    }
}
