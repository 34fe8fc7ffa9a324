/* bark-hf's matrix-vector product for decoding on x86 CPUs with AVX2 and FMA (bark_hf/cpu_matvec.py builds it).
 *
 * y[r, j] = sum_i x[r, i] * w[j, i] (+ bias[j]) for a few rows r of x: a decoding step's products, which read
 * every weight once and so run at the speed of memory. Each thread takes blocks of eight weight rows and keeps
 * eight independent sums (one per row), so the loads of eight streams overlap; one sum per row would wait on its
 * own additions, and eight streams read faster than four on a 2-core AMD EPYC (docs/performance.md). Every output
 * is summed by one thread in one order, whatever the thread count or the number of rows of x, so a batch gets each
 * item's values bit for bit. The threads are OpenMP's: linked by soname against
 * libgomp.so.1, the library joins the OpenMP runtime that PyTorch has already loaded, and shares its threads.
 */
#include <immintrin.h>

static inline float sum_lanes(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#define BLOCK_ROWS 8

/* Rows [first, first + count) of y (count <= BLOCK_ROWS) for every row of x. A short block reads its first
 * row in place of the missing ones and drops those sums. */
static void weight_rows(const float *x, long m, long n, long k, const float *w, const float *bias, float *y,
                        long first, int count) {
    const float *rows[BLOCK_ROWS];
    for (int j = 0; j < BLOCK_ROWS; j++) rows[j] = w + (first + (j < count ? j : 0)) * k;
    for (long r = 0; r < m; r++) {
        const float *xr = x + r * k;
        __m256 acc[BLOCK_ROWS];
        for (int j = 0; j < BLOCK_ROWS; j++) acc[j] = _mm256_setzero_ps();
        long i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256 xv = _mm256_loadu_ps(xr + i);
            for (int j = 0; j < BLOCK_ROWS; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[j] + i), xv, acc[j]);
        }
        for (int j = 0; j < count; j++) {
            float sum = sum_lanes(acc[j]);
            for (long t = i; t < k; t++) sum += rows[j][t] * xr[t];
            y[r * n + first + j] = bias ? sum + bias[first + j] : sum;
        }
    }
}

/* x: m rows of k; w: n rows of k; bias: n or NULL; y: m rows of n. All contiguous float32. */
void bark_hf_matvec(const float *x, long m, long n, long k, const float *w, const float *bias, float *y,
                    int threads) {
    long blocks = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long first = BLOCK_ROWS * b;
        weight_rows(x, m, n, k, w, bias, y, first, n - first < BLOCK_ROWS ? (int)(n - first) : BLOCK_ROWS);
    }
}
