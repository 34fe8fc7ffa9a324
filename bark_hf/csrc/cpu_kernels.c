/* bark-hf's CPU kernels for decoding on x86 CPUs with AVX2 and FMA (bark_hf/cpu_kernels.py builds them).
 *
 * A decoding step reads every weight once for a few rows of inputs, so it runs at the speed of memory.
 * bark_hf_matvec is one product: y[r, j] = sum_i x[r, i] * w[j, i] (+ bias[j]). Each thread takes blocks of eight
 * weight rows and keeps eight independent sums (one per row), so the loads of eight streams overlap; one sum per
 * row would wait on its own additions, and eight streams read faster than four on a 2-core AMD EPYC
 * (docs/performance.md). bark_hf_block_step is a whole pre-LayerNorm GPT block for one new position per item:
 * its four products, LayerNorms, GELU, residual sums and attention over the KV cache in one call, so a step
 * pays neither PyTorch's per-operator costs nor SDPA's slow reading of the cache for a single query. Its weights
 * may be int8 (BarkHfModel.quantize_int8), read as a quarter of the bytes and multiplied with float32 inputs, and
 * its KV cache float16 (half the bytes; converted with F16C), as int8 models keep it.
 *
 * Every output is computed by one thread in one order, whatever the thread count or the number of items, so a
 * batch gets each item's values bit for bit. The threads are OpenMP's: linked by soname against libgomp.so.1,
 * the library joins the OpenMP runtime that PyTorch has already loaded, and shares its threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline float sum_lanes(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#define BLOCK_ROWS 8

/* What a product does with each finished sum (after its bias): store it, store its GELU, or add it to y. */
enum epilogue { STORE, STORE_GELU, ADD };

static inline float finish(float value, enum epilogue epilogue, float old) {
    if (epilogue == STORE_GELU) return 0.5f * value * (1.0f + erff(value * (float)M_SQRT1_2));  /* nn.GELU() */
    return epilogue == ADD ? old + value : value;
}

/* A weight matrix [n, k]: float32 values, row by row; or int8 values with one scale per row (a row's weights are
 * its values times its scale, as in torch's symmetric int8 quantisation), read as they are: a quarter of the
 * bytes. int8 values come in tiles (cpu_kernels.prepare_block packs them): [n / 8][k / 8][8 rows][8 columns], so
 * that a block of eight rows is one stream of memory. Read row by row, as float32 weights are (eight streams of
 * 8-byte loads), they came at less than half the speed (docs/performance.md). n and k are multiples of 8 for int8. */
typedef struct {
    const void *values;
    const float *scales; /* NULL: float32 values */
} weights_t;

/* The sums of x with `count` rows (<= BLOCK_ROWS) of w starting at row `first`, into sums[0..count). A short
 * block (float32 only) reads its first row in place of the missing ones and drops those sums. */
static void row_sums(const float *x, long k, weights_t w, long first, int count, float *sums) {
    __m256 acc[BLOCK_ROWS];
    for (int j = 0; j < BLOCK_ROWS; j++) acc[j] = _mm256_setzero_ps();
    if (!w.scales) {
        const float *rows[BLOCK_ROWS];
        long i = 0;
        for (int j = 0; j < BLOCK_ROWS; j++) rows[j] = (const float *)w.values + (first + (j < count ? j : 0)) * k;
        for (; i + 8 <= k; i += 8) {
            __m256 xv = _mm256_loadu_ps(x + i);
            for (int j = 0; j < BLOCK_ROWS; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[j] + i), xv, acc[j]);
        }
        for (int j = 0; j < count; j++) {
            sums[j] = sum_lanes(acc[j]);
            for (long t = i; t < k; t++) sums[j] += rows[j][t] * x[t];
        }
        return;
    }
    const signed char *tile = (const signed char *)w.values + first * k;
    for (long i = 0; i < k; i += 8, tile += 8 * BLOCK_ROWS) {
        __m256 xv = _mm256_loadu_ps(x + i);
        for (int j = 0; j < BLOCK_ROWS; j++) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(tile + 8 * j)));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, acc[j]);
        }
    }
    for (int j = 0; j < count; j++) sums[j] = sum_lanes(acc[j]) * w.scales[first + j];
}

/* Rows [first, first + count) of y for every row of x. */
static void weight_rows(const float *x, long m, long n, long k, weights_t w, const float *bias, float *y,
                        long first, int count, enum epilogue epilogue) {
    float sums[BLOCK_ROWS];
    for (long r = 0; r < m; r++) {
        row_sums(x + r * k, k, w, first, count, sums);
        for (int j = 0; j < count; j++) {
            float *out = y + r * n + first + j;
            *out = finish(bias ? sums[j] + bias[first + j] : sums[j], epilogue, *out);
        }
    }
}

/* x: m rows of k; w: n rows of k; bias: n or NULL; y: m rows of n. All contiguous. */
static void products(const float *x, long m, long n, long k, weights_t w, const float *bias, float *y,
                     enum epilogue epilogue, int threads) {
    long blocks = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long first = BLOCK_ROWS * b;
        weight_rows(x, m, n, k, w, bias, y, first, n - first < BLOCK_ROWS ? (int)(n - first) : BLOCK_ROWS, epilogue);
    }
}

/* The functions' arguments, as bark_hf/cpu_kernels.py declares them (KERNELS_INTERFACE there): a copy of that module
 * loaded as a model folder's remote code builds an installed bark-hf's source, which may be another version's. */
int bark_hf_interface(void) { return 1; }

void bark_hf_matvec(const float *x, long m, long n, long k, const float *w, const float *bias, float *y,
                    int threads) {
    weights_t weights = {w, NULL};
    products(x, m, n, k, weights, bias, y, STORE, threads);
}

/* nn.LayerNorm over each of m rows of width values; weight and bias may be NULL. */
static void layer_norm(const float *x, long m, long width, const float *weight, const float *bias, float eps,
                       float *y) {
    for (long r = 0; r < m; r++) {
        const float *xr = x + r * width;
        double sum = 0.0, squares = 0.0;
        for (long i = 0; i < width; i++) sum += xr[i];
        double mean = sum / width;
        for (long i = 0; i < width; i++) squares += (xr[i] - mean) * (xr[i] - mean);
        float scale = (float)(1.0 / sqrt(squares / width + eps));
        for (long i = 0; i < width; i++) {
            float value = (float)(xr[i] - mean) * scale;
            y[r * width + i] = (weight ? value * weight[i] : value) + (bias ? bias[i] : 0.0f);
        }
    }
}

static inline float dot(const float *a, const float *b, long n) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = sum_lanes(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* y += scale * x over n values. */
static inline void add_scaled(float *y, const float *x, float scale, long n) {
    __m256 s = _mm256_set1_ps(scale);
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), s, _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += x[i] * scale;
}

/* The same two over float16 values (IEEE half precision, as torch.float16 stores them). */
static inline float dot_half(const float *a, const unsigned short *b, long n) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), acc);
    float sum = sum_lanes(acc);
    for (; i < n; i++) sum += a[i] * _cvtsh_ss(b[i]);
    return sum;
}

static inline void add_scaled_half(float *y, const unsigned short *x, float scale, long n) {
    __m256 s = _mm256_set1_ps(scale);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(xv, s, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += _cvtsh_ss(x[i]) * scale;
}

/* n float32 values as float16, rounded to nearest even and clamped to its largest finite value (+-65504), as
 * BarkHfKVCache stores them; NaN stays NaN. */
#define HALF_MAX 65504.0f
static inline void store_half(unsigned short *y, const float *x, long n) {
    const __m256 high = _mm256_set1_ps(HALF_MAX), low = _mm256_set1_ps(-HALF_MAX);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        /* min/max return their second operand where either is NaN: x goes second, so NaN passes through. */
        __m256 clamped = _mm256_max_ps(low, _mm256_min_ps(high, _mm256_loadu_ps(x + i)));
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(clamped, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) y[i] = _cvtss_sh(isnan(x[i]) ? x[i] : fmaxf(-HALF_MAX, fminf(HALF_MAX, x[i])),
                                        _MM_FROUND_TO_NEAREST_INT);
}

/* Each item's query (the first third of its row of qkv) attends to its first `length` cached positions, those
 * that key_mask (m rows of length, or NULL for all) allows, head by head; the result goes to m rows of width.
 * Keys and values are float32, or float16 where `half` is set. One thread per (item, head) pair, so the sums'
 * order never depends on the threads. */
static void attend(const float *qkv, long m, long width, long heads, const void *keys, const void *values, int half,
                   long item_stride, long head_stride, long length, const unsigned char *key_mask, float *scores,
                   float *attended, int threads) {
    long d = width / heads;
    float scale = 1.0f / sqrtf((float)d);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long pair = 0; pair < m * heads; pair++) {
        long r = pair / heads, h = pair % heads;
        const float *query = qkv + r * 3 * width + h * d;
        long first = r * item_stride + h * head_stride;
        const float *k = (const float *)keys + first, *v = (const float *)values + first;
        const unsigned short *k_half = (const unsigned short *)keys + first;
        const unsigned short *v_half = (const unsigned short *)values + first;
        const unsigned char *allowed = key_mask ? key_mask + r * length : NULL;
        float *s = scores + pair * length, *out = attended + r * width + h * d;
        float highest = -INFINITY, total = 0.0f;
        for (long t = 0; t < length; t++) {
            if (allowed && !allowed[t]) s[t] = -INFINITY;
            else s[t] = (half ? dot_half(query, k_half + t * d, d) : dot(query, k + t * d, d)) * scale;
            highest = fmaxf(highest, s[t]);
        }
        memset(out, 0, sizeof(float) * d);
        for (long t = 0; t < length; t++) {
            if (allowed && !allowed[t]) continue;
            float weight = expf(s[t] - highest);
            total += weight;
            if (half) add_scaled_half(out, v_half + t * d, weight, d);
            else add_scaled(out, v + t * d, weight, d);
        }
        for (long i = 0; i < d; i++) out[i] /= total;
    }
}

/* One decoding step of a pre-LayerNorm GPT block (bark_hf.modeling_bark_hf.BarkHfBlock in evaluation) for m
 * items, one new position each: x (m rows of width) += attention(LN1(x)); x += MLP(LN2(x)), in place.
 * Weights are nn.Linear's [out, in], contiguous: float32, or int8 in tiles (weights_t; width a multiple of 8) where
 * that product's scales (one per output) are given; any bias or LayerNorm weight may be NULL. The cache holds each
 * item's keys and values, float32 or (half_cache) float16, at keys + item * item_stride + head * head_stride +
 * position * head_dim, counted in values; this step writes
 * position `past` and attends to positions 0 to past, those that key_mask (m rows of past + 1, or NULL for all)
 * allows. Returns 0, or -1 where the scratch memory could not be had. */
int bark_hf_block_step(float *x, long m, long width, long heads, float ln1_eps, float ln2_eps,
                       const float *ln1_weight, const float *ln1_bias, const void *att_weight, const float *att_bias,
                       const void *proj_weight, const float *proj_bias, const float *ln2_weight,
                       const float *ln2_bias, const void *fc_weight, const float *fc_bias, const void *fc2_weight,
                       const float *fc2_bias, const float *att_scales, const float *proj_scales,
                       const float *fc_scales, const float *fc2_scales, void *keys, void *values, int half_cache,
                       long item_stride, long head_stride, long past, const unsigned char *key_mask, int threads) {
    long d = width / heads, length = past + 1;
    float *normed = malloc(sizeof(float) * (m * width * 9 + m * heads * length));
    if (!normed) return -1;
    float *qkv = normed + m * width, *attended = qkv + 3 * m * width, *hidden = attended + m * width;
    float *scores = hidden + 4 * m * width;
    weights_t att = {att_weight, att_scales}, proj = {proj_weight, proj_scales};
    weights_t fc = {fc_weight, fc_scales}, fc2 = {fc2_weight, fc2_scales};
    layer_norm(x, m, width, ln1_weight, ln1_bias, ln1_eps, normed);
    products(normed, m, 3 * width, width, att, att_bias, qkv, STORE, threads);
    for (long r = 0; r < m; r++)
        for (long h = 0; h < heads; h++) {
            long at = r * item_stride + h * head_stride + past * d;
            const float *key = qkv + r * 3 * width + width + h * d, *value = key + width;
            if (half_cache) {
                store_half((unsigned short *)keys + at, key, d);
                store_half((unsigned short *)values + at, value, d);
            } else {
                memcpy((float *)keys + at, key, sizeof(float) * d);
                memcpy((float *)values + at, value, sizeof(float) * d);
            }
        }
    attend(qkv, m, width, heads, keys, values, half_cache, item_stride, head_stride, length, key_mask, scores,
           attended, threads);
    products(attended, m, width, width, proj, proj_bias, x, ADD, threads);
    layer_norm(x, m, width, ln2_weight, ln2_bias, ln2_eps, normed);
    products(normed, m, 4 * width, width, fc, fc_bias, hidden, STORE_GELU, threads);
    products(hidden, m, width, 4 * width, fc2, fc2_bias, x, ADD, threads);
    free(normed);
    return 0;
}
