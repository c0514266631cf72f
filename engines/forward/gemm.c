/* The lean decode step's kernels on x86 CPUs with AVX2 and FMA: matrix products with int8 weights (one
 * bf16 scale per output channel) or float32 weights, float32 activations and accumulators, optionally
 * adding the residual as they store; the float32 step's SiLU gate, RMS norm, rotary embedding with
 * the K/V column write, and attention of one new token per row over the batch cache; unmerged adapters'
 * low-rank terms; and decode_step_f32, which runs all of them for a whole step in one call.
 *
 * Built at first use by engines/forward/kernels.py with the machine's C compiler (cc -O3 -mavx2 -mfma -fopenmp),
 * loaded with ctypes; without a compiler the gateway keeps torch's kernels. Why, measured on a 2-core
 * AVX2 EPYC without native bf16, whose memory streams about 15 GB/s: on a small model's 576-column
 * matrices torch's int8 kernel (_weight_int8pack_mm, bf16 activations) streams 2-6 GB/s and oneDNN's
 * float32 product 4-13 GB/s at one row, 3-5 GB/s at eight; these stream 5-16 GB/s at one row and 2-10
 * at eight, because each output channel's weights are read front to back as one stream (short rows
 * prefetch as well as long ones) and used for up to four rows of activations while in registers.
 * OpenMP here resolves to the libgomp torch already loaded, so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
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

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }

/* One output channel n for MB rows (constants in each instantiation), U independent accumulators per
 * row to hide the FMA latency. The channel's weights are read front to back, one stream, so short rows
 * (576 columns) prefetch as well as long ones; the MB rows of x come from L1. SCALE is the channel's
 * factor (its int8 scale, or 1).
 * Every block size uses the same U, so a row's sum runs in the same order whichever block it falls in:
 * a row's result does not depend on how many rows share the product (batch-invariant: a greedy answer
 * is the same alone and in any batch). Two chains per row keep the FMAs ahead of the weights' memory
 * stream, which bounds these products, and 4 rows x 2 leave registers for the weight vector; per-block
 * counts (8, 4, 2 for 1, 2, 4 rows) were no faster and summed a row in another order at each size. */
#define ACCUMULATORS 2

#define BLOCK(NAME, WTYPE, LOAD, SCALE, MB, U)                                                       \
    static inline __attribute__((always_inline)) void NAME##_##MB(                                  \
        const float *x, const WTYPE *w, const uint16_t *scales, const float *add, float *out, long N, \
        long K, long n, long m0) {                                                                   \
        __m256 acc[MB][U];                                                                           \
        for (int r = 0; r < MB; r++)                                                                 \
            for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();                             \
        const WTYPE *wn = w + n * K;                                                                 \
        const float *xm = x + m0 * K;                                                                \
        long k = 0;                                                                                  \
        for (; k + 8 * U <= K; k += 8 * U) {                                                         \
            for (int u = 0; u < U; u++) {                                                            \
                __m256 wv = LOAD(wn + k + 8 * u);                                                    \
                for (int r = 0; r < MB; r++)                                                         \
                    acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + r * K + k + 8 * u), wv, acc[r][u]); \
            }                                                                                        \
        }                                                                                            \
        for (; k < K; k += 8) {                                                                      \
            __m256 wv = LOAD(wn + k);                                                                \
            for (int r = 0; r < MB; r++)                                                             \
                acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + r * K + k), wv, acc[r][0]);         \
        }                                                                                            \
        float s = SCALE;                                                                             \
        for (int r = 0; r < MB; r++) {                                                               \
            __m256 total = acc[r][0];                                                                \
            for (int u = 1; u < U; u++) total = _mm256_add_ps(total, acc[r][u]);                     \
            float value = hsum(total) * s;                                                           \
            out[(m0 + r) * N + n] = add ? add[(m0 + r) * N + n] + value : value;                     \
        }                                                                                            \
    }

/* NAME shares the channels out among the threads of the enclosing parallel region (an orphaned
 * `omp for`, so decode_step runs it inside its one region; called outside any, it runs on one thread). */
#define KERNEL(NAME, WTYPE, LOAD, SCALE)                                                              \
    BLOCK(NAME, WTYPE, LOAD, SCALE, 1, ACCUMULATORS)                                                 \
    BLOCK(NAME, WTYPE, LOAD, SCALE, 2, ACCUMULATORS)                                                 \
    BLOCK(NAME, WTYPE, LOAD, SCALE, 4, ACCUMULATORS)                                                 \
    static void NAME(const float *x, const WTYPE *w, const uint16_t *scales, const float *add,       \
                     float *out, long M, long N, long K) {                                           \
        _Pragma("omp for schedule(static)")                                                          \
        for (long n = 0; n < N; n++) {                                                               \
            long m = 0;                                                                              \
            for (; m + 4 <= M; m += 4) NAME##_4(x, w, scales, add, out, N, K, n, m);                 \
            for (; m + 2 <= M; m += 2) NAME##_2(x, w, scales, add, out, N, K, n, m);                 \
            for (; m < M; m++) NAME##_1(x, w, scales, add, out, N, K, n, m);                         \
        }                                                                                            \
    }

KERNEL(int8_kernel, int8_t, load8_i8, bf16_to_f32(scales[n]))
KERNEL(f32_kernel, float, load8_f32, 1.0f)

/* out[M, N] = add[M, N] + x[M, K] @ (w[N, K] * scales[N, None]).T, int8 w, bf16 scales; add may be
 * NULL (nothing added; with it, the step's residual add costs no operator of its own). K % 8 == 0. */
void int8_gemm_f32(const float *x, const int8_t *w, const uint16_t *scales, const float *add, float *out,
                   long M, long N, long K, int threads) {
#pragma omp parallel num_threads(threads)
    int8_kernel(x, w, scales, add, out, M, N, K);
}

/* out[M, N] = add[M, N] + x[M, K] @ w[N, K].T, float32 w; add may be NULL. K % 8 == 0. */
void f32_gemm(const float *x, const float *w, const float *add, float *out, long M, long N, long K,
              int threads) {
#pragma omp parallel num_threads(threads)
    f32_kernel(x, w, 0, add, out, M, N, K);
}

/* silu(gate) * up, as transformers computes silu(x) = x / (1 + e^-x); one definition for the separate
 * call and decode_step, so both give the same bits. */
static inline float silu_gate(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

/* out[r, i] = silu(gate_up[r, i]) * gate_up[r, I + i]: the SiLU-gated MLP's activation from the fused
 * gate/up product [rows, 2 * I] (row stride given). */
void silu_mul_f32(const float *gate_up, long row_stride, float *out, long rows, long I) {
    for (long r = 0; r < rows; r++) {
        const float *gate = gate_up + r * row_stride, *up = gate + I;
        for (long i = 0; i < I; i++) out[r * I + i] = silu_gate(gate[i], up[i]);
    }
}

/* out[r] = x[r] * 1/sqrt(mean(x[r]^2) + eps) * weight, float32, K % 8 == 0: transformers' float32
 * LlamaRMSNorm in one call (torch's takes seven operators, each paying for the caches the previous
 * product evicted). Rows are few (a decode step's), so one thread. */
void rms_norm_f32(const float *x, const float *weight, float *out, long M, long K, float eps) {
    for (long r = 0; r < M; r++) {
        const float *xr = x + r * K;
        __m256 acc = _mm256_setzero_ps();
        for (long k = 0; k < K; k += 8) {
            __m256 v = _mm256_loadu_ps(xr + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        __m256 scale = _mm256_set1_ps(1.0f / sqrtf(hsum(acc) / (float)K + eps));
        for (long k = 0; k < K; k += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xr + k), scale);
            _mm256_storeu_ps(out + r * K + k, _mm256_mul_ps(v, _mm256_loadu_ps(weight + k)));
        }
    }
}

/* Attention of one new token per row over its cached keys and values, float32, head size D % 8 == 0.
 * q: [rows, kv_heads * group, D] with row stride q_row_stride (the query heads that share a KV head are
 * adjacent, as transformers' repeat_kv orders them); keys/values: the batch cache's buffers,
 * [row capacity, kv_heads, column capacity, D] with the given row and head strides; row r attends to
 * columns [starts[r], length) (left padding before starts[r]); out: [rows, kv_heads * group * D];
 * scratch: rows * kv_heads * group * length floats. Exact two-pass softmax per query head; the query
 * heads are shared out among the enclosing region's threads (one row has few KV heads: 3 on 2 threads
 * would leave one idle a third of the time, 9 query heads split 5/4). */
static void attention(const float *q, long q_row_stride, const float *keys, const float *values,
                      long kv_row_stride, long kv_head_stride, const long *starts, long length, float *out,
                      float *scratch, long rows, long kv_heads, long group, long D, float scale) {
#pragma omp for schedule(static)
    for (long task = 0; task < rows * kv_heads * group; task++) {
        long r = task / (kv_heads * group), head = task % (kv_heads * group), h = head / group;
        long n = length - starts[r];
        const float *K = keys + r * kv_row_stride + h * kv_head_stride + starts[r] * D;
        const float *V = values + r * kv_row_stride + h * kv_head_stride + starts[r] * D;
        const float *qh = q + r * q_row_stride + head * D;
        float *p = scratch + task * length;
        float best = -INFINITY;
        for (long j = 0; j < n; j++) {
            __m256 acc = _mm256_setzero_ps();
            for (long d = 0; d < D; d += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(K + j * D + d), acc);
            p[j] = hsum(acc) * scale;
            if (p[j] > best) best = p[j];
        }
        float total = 0.0f;
        for (long j = 0; j < n; j++) {
            p[j] = expf(p[j] - best);
            total += p[j];
        }
        float *o = out + r * kv_heads * group * D + head * D;
        for (long d = 0; d < D; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (long j = 0; j < n; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(V + j * D + d), acc);
            _mm256_storeu_ps(o + d, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / total)));
        }
    }
}

void decode_attention_f32(const float *q, long q_row_stride, const float *keys, const float *values,
                          long kv_row_stride, long kv_head_stride, const long *starts, long length,
                          float *out, float *scratch, long rows, long kv_heads, long group, long D,
                          float scale, int threads) {
#pragma omp parallel num_threads(threads)
    attention(q, q_row_stride, keys, values, kv_row_stride, kv_head_stride, starts, length, out, scratch,
              rows, kv_heads, group, D, scale);
}

/* The rotary embedding of each row's one new position, and the new K/V column written into the batch
 * cache: qkv is the fused q/k/v product [rows, (heads + 2 * kv_heads) * D] (row stride given); cos and
 * sin [rows, D]; q_out [rows, heads, D] gets the rotated queries; the rotated keys and the values go to
 * column `column` of keys/values ([row capacity, kv_heads, column capacity, D], strides given).
 * x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x[D/2:], x[:D/2]], as transformers computes it. */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out, long D) {
    long half = D / 2;
    for (long i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (long i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

void rotary_kv_write_f32(const float *qkv, long qkv_row_stride, const float *cos, const float *sin,
                         float *q_out, float *keys, float *values, long kv_row_stride, long kv_head_stride,
                         long column, long rows, long heads, long kv_heads, long D) {
    for (long r = 0; r < rows; r++) {
        const float *row = qkv + r * qkv_row_stride;
        const float *c = cos + r * D, *s = sin + r * D;
        for (long h = 0; h < heads; h++) rotate(row + h * D, c, s, q_out + (r * heads + h) * D, D);
        for (long h = 0; h < kv_heads; h++) {
            long at = r * kv_row_stride + h * kv_head_stride + column * D;
            rotate(row + (heads + h) * D, c, s, keys + at, D);
            memcpy(values + at, row + (heads + kv_heads + h) * D, D * sizeof(float));
        }
    }
}

/* One decoder layer's weights for decode_step. A product's weights are int8 with one bf16 scale per
 * output channel where its scales pointer is set, float32 where it is NULL. q/k/v and gate/up are each
 * one fused matrix: [(heads + 2 * kv_heads) * D, hidden] and [2 * intermediate, hidden]. */
typedef struct {
    const float *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    const uint16_t *qkv_scales, *o_scales, *gate_up_scales, *down_scales;
} step_layer;

/* The step's sizes; column is where every row's new K/V go, and attention covers columns up to it. */
typedef struct {
    long rows, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    long column, kv_row_stride, kv_head_stride;
    float eps;
} step_shape;

static void product(const float *x, const void *w, const uint16_t *scales, const float *add, float *out,
                    long M, long N, long K) {
    if (scales)
        int8_kernel(x, (const int8_t *)w, scales, add, out, M, N, K);
    else
        f32_kernel(x, (const float *)w, 0, add, out, M, N, K);
}

/* One projection's unmerged adapters, stacked by slot: a [slots, rank, in], b [slots, out, rank] (its
 * scale folded in); slot 0 (no adapter) is all zeros. a NULL: no adapter targets the projection. */
typedef struct {
    const float *a, *b;
    long rank;
} lora_pair;

/* A layer's adapters for decode_step, one pair per projection. */
typedef struct {
    lora_pair q, k, v, o, gate, up, down;
} step_lora;

/* out[r, n] += b[slot, n] . (a[slot] @ x[r]) for each row r whose slot (slots[r]) is not 0: the term
 * engines/forward/multilora.py's hook adds, inside the region: t = a[slot] @ x[r] (rows * rank floats), then
 * out, each step's work shared out among the threads (reading a and b is most of it: an adapter on all
 * seven projections is as many bytes as 10% of a small int8 model's weights). */
static void lora_add(const lora_pair *p, const long *slots, const float *x, long x_stride, long K, float *out,
                     long out_stride, long N, long rows, float *t) {
    if (!p->a || p->rank == 0) return; /* the same branch on every thread: the barriers stay paired */
    const long R = p->rank;
#pragma omp for schedule(static)
    for (long task = 0; task < rows * R; task++) {
        long r = task / R, j = task % R;
        if (!slots[r]) continue;
        const float *a = p->a + (slots[r] * R + j) * K, *xr = x + r * x_stride;
        __m256 acc = _mm256_setzero_ps();
        for (long k = 0; k < K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(xr + k), acc);
        t[task] = hsum(acc);
    }
#pragma omp for schedule(static)
    for (long n = 0; n < N; n++) {
        for (long r = 0; r < rows; r++) {
            if (!slots[r]) continue;
            const float *b = p->b + (slots[r] * N + n) * R, *tr = t + r * R;
            float sum = 0.0f;
            for (long j = 0; j < R; j++) sum += b[j] * tr[j];
            out[r * out_stride + n] += sum;
        }
    }
}

/* Floats of the work buffer decode_step carves its intermediates from (the caller allocates it). */
long decode_step_work_floats(const step_shape *s) {
    long qkv = (s->heads + 2 * s->kv_heads) * s->head_dim, attended = s->heads * s->head_dim;
    return s->rows * (s->hidden + qkv + 2 * attended + 3 * s->intermediate + s->heads * (s->column + 1));
}

/* A whole float32 decode step of a Llama-family model in one call: for each layer the RMS norm, the
 * fused q/k/v product, rotary embedding with the K/V write, attention, the output product onto the
 * residual, the second norm, the fused gate/up product, the SiLU gate and the down product onto the
 * residual; then the final norm and the LM head into logits [rows, vocab]. With lora (one step_lora
 * per layer; NULL: none), each row's unmerged adapter term is added to each projection it targets,
 * slots[r] naming row r's adapter and lora_t holding rows * (largest rank) floats. x [rows, hidden] holds the
 * token embeddings and is overwritten with the last hidden state; keys/values are each layer's cache
 * buffers. The same kernels, in the same order, as the step made of separate calls (so the same
 * logits): what goes is the interpreter between them, about 200 us a layer on a 2-core CPU, a quarter
 * of a small int8 model's step. One parallel region for the whole step: the products, the attention
 * and the gate share out work, the norms and the rotary (a few hundred floats a row) run on one
 * thread, and the region's barriers order them. */
void decode_step_f32(const step_layer *layers, long n_layers, float *const *keys, float *const *values,
                     const float *final_norm, const void *lm_head, const uint16_t *lm_head_scales,
                     const step_shape *s, float *x, const float *cos, const float *sin, const long *starts,
                     float *work, float *logits, const step_lora *lora, const long *slots, float *lora_t,
                     int threads) {
    const long rows = s->rows, hidden = s->hidden, D = s->head_dim, I = s->intermediate;
    const long qkv_width = (s->heads + 2 * s->kv_heads) * D, attended_width = s->heads * D;
    float *h = work, *qkv = h + rows * hidden, *q = qkv + rows * qkv_width;
    float *attended = q + rows * attended_width, *gate_up = attended + rows * attended_width;
    float *act = gate_up + rows * 2 * I, *scratch = act + rows * I;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel num_threads(threads)
    {
        for (long l = 0; l < n_layers; l++) {
            const step_layer *L = &layers[l];
#pragma omp single
            rms_norm_f32(x, L->input_norm, h, rows, hidden, s->eps);
            product(h, L->qkv, L->qkv_scales, 0, qkv, rows, qkv_width, hidden);
            if (lora) {
                const step_lora *A = &lora[l];
                lora_add(&A->q, slots, h, hidden, hidden, qkv, qkv_width, attended_width, rows, lora_t);
                lora_add(&A->k, slots, h, hidden, hidden, qkv + attended_width, qkv_width, s->kv_heads * D,
                         rows, lora_t);
                lora_add(&A->v, slots, h, hidden, hidden, qkv + attended_width + s->kv_heads * D, qkv_width,
                         s->kv_heads * D, rows, lora_t);
            }
#pragma omp single
            rotary_kv_write_f32(qkv, qkv_width, cos, sin, q, keys[l], values[l], s->kv_row_stride,
                                s->kv_head_stride, s->column, rows, s->heads, s->kv_heads, D);
            attention(q, attended_width, keys[l], values[l], s->kv_row_stride, s->kv_head_stride, starts,
                      s->column + 1, attended, scratch, rows, s->kv_heads, s->heads / s->kv_heads, D, scale);
            product(attended, L->o, L->o_scales, x, x, rows, hidden, attended_width);
            if (lora)
                lora_add(&lora[l].o, slots, attended, attended_width, attended_width, x, hidden, hidden, rows,
                         lora_t);
#pragma omp single
            rms_norm_f32(x, L->post_norm, h, rows, hidden, s->eps);
            product(h, L->gate_up, L->gate_up_scales, 0, gate_up, rows, 2 * I, hidden);
            if (lora) {
                lora_add(&lora[l].gate, slots, h, hidden, hidden, gate_up, 2 * I, I, rows, lora_t);
                lora_add(&lora[l].up, slots, h, hidden, hidden, gate_up + I, 2 * I, I, rows, lora_t);
            }
#pragma omp for schedule(static)
            for (long e = 0; e < rows * I; e++) {
                const float *gate = gate_up + (e / I) * 2 * I + e % I;
                act[e] = silu_gate(gate[0], gate[I]);
            }
            product(act, L->down, L->down_scales, x, x, rows, hidden, I);
            if (lora) lora_add(&lora[l].down, slots, act, I, I, x, hidden, hidden, rows, lora_t);
        }
#pragma omp single
        rms_norm_f32(x, final_norm, h, rows, hidden, s->eps);
        product(h, lm_head, lm_head_scales, 0, logits, rows, s->vocab, hidden);
    }
}
