/* Fused GEMM kernels of the evaluation (compiled at first use by slade_dist/eval/native.py).
 *
 * simfilter_tile, for the exact kNN (knn.py): with the similarities of a tile computed by BLAS into
 * memory and scanned afterwards, the scan costs a third of the GEMM on these CPUs (every value is
 * written, read back and compared). Here each 6 x 16 block of similarities is compared with its
 * thresholds while still in AVX registers, and only the values above them leave the kernel.
 *
 * min2_tile, for the k-means assignment (lloyd.py): each point's nearest and second-nearest
 * centroid in the same way; only values below the row's current second best leave the registers.
 *
 * Layout (pack_rows): a matrix of n rows of width d is stored in slivers of `mr` rows, k-major
 * (sliver s holds rows s*mr .. s*mr+mr-1 as out[s][k][r]), zero rows padding the last sliver.
 * Rows (queries, points) are packed with mr = MR, columns (references, centroids) with mr = NR:
 * the micro-kernel then reads MR row values and NR column values per k as contiguous runs.
 *
 * Compiled with gcc/cc -O3 -march=native; without AVX2 and FMA the compile fails on the #error
 * below and the callers use their portable numba/numpy paths.
 * Tests: tests/unit/test_knn.py and tests/unit/test_lloyd.py (both paths). */
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the fused kernel needs AVX2 and FMA"
#endif
#include <immintrin.h>

#define MR 6   /* query rows per micro-kernel: 6 x 2 accumulators + 2 loads + 1 broadcast = 15 of */
#define NR 16  /* the 16 ymm registers (the usual AVX2 GEMM shape) */
#define MC 384 /* query slivers per pass over a reference panel: 384 x 6 x 128 floats ~ L2 */

int kernel_mr(void) { return MR; }  /* the block shape, for the callers' packing (native.py) */
int kernel_nr(void) { return NR; }

void pack_rows(const float *x, int64_t n, int64_t d, int64_t mr, float *out) {
    int64_t slivers = (n + mr - 1) / mr;
    for (int64_t s = 0; s < slivers; s++) {
        float *o = out + s * d * mr;
        int64_t rows = n - s * mr < mr ? n - s * mr : mr;
        const float *xs = x + s * mr * d;
        for (int64_t k = 0; k < d; k++, o += mr) {  /* sequential writes; mr read streams */
            int64_t r = 0;
            for (; r < rows; r++) o[r] = xs[r * d + k];
            for (; r < mr; r++) o[r] = 0.0f;
        }
    }
}

/* out[r][j] = the similarity of query row r with reference j of the panel. Each value is a
 * sequential fused multiply-add over k, so S[i][j] and S[j][i] agree bit for bit. The twelve
 * accumulators are named variables: an array of them is kept in memory by gcc (a store per FMA). */
static inline void micro_kernel(const float *a, const float *b, int64_t d, float out[MR][NR]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    _Pragma("GCC unroll 4")  /* measured: ~10% faster than the plain loop with two threads */
    for (int64_t k = 0; k < d; k++, a += MR, b += NR) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), av;
#define ROW(r, lo, hi) av = _mm256_broadcast_ss(a + r); \
        lo = _mm256_fmadd_ps(av, b0, lo); hi = _mm256_fmadd_ps(av, b1, hi);
        ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41) ROW(5, c50, c51)
#undef ROW
    }
#define OUT(r, lo, hi) _mm256_storeu_ps(out[r], lo); _mm256_storeu_ps(out[r] + 8, hi);
    OUT(0, c00, c01) OUT(1, c10, c11) OUT(2, c20, c21) OUT(3, c30, c31) OUT(4, c40, c41) OUT(5, c50, c51)
#undef OUT
}

static inline unsigned above(__m256 lo, __m256 hi, __m256 t_lo, __m256 t_hi) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(lo, t_lo, _CMP_GT_OQ))
         | (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(hi, t_hi, _CMP_GT_OQ)) << 8;
}

static inline unsigned below(__m256 lo, __m256 hi, __m256 t) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(lo, t, _CMP_LT_OQ))
         | (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(hi, t, _CMP_LT_OQ)) << 8;
}

/* The loop all three kernels share: every MR x NR block of a (packed rows, h) x b (packed columns,
 * w) product, computed into `block` and handed to visit(ctx, first row, first column, mask of the
 * real columns, block). A nonzero return of visit stops the loop and is returned. MC slivers of
 * rows (~L2) are run against one NR-column panel (~L1) at a time. Always inlined with a constant
 * visit, so each kernel compiles to one loop nest with its visitor inside. */
typedef int (*block_visitor)(void *ctx, int64_t i0, int64_t j0, unsigned valid, float block[MR][NR]);

static inline __attribute__((always_inline)) int
for_each_block(const float *a, const float *b, int64_t d, int64_t h, int64_t w, block_visitor visit, void *ctx) {
    int64_t slivers = (h + MR - 1) / MR, panels = (w + NR - 1) / NR;
    float block[MR][NR];
    for (int64_t s0 = 0; s0 < slivers; s0 += MC) {
        int64_t s1 = s0 + MC < slivers ? s0 + MC : slivers;
        for (int64_t p = 0; p < panels; p++) {
            int64_t j0 = p * NR;
            unsigned valid = w - j0 >= NR ? 0xFFFFu : (1u << (w - j0)) - 1u;  /* padding columns */
            for (int64_t s = s0; s < s1; s++) {
                micro_kernel(a + s * d * MR, b + p * d * NR, d, block);
                int rc = visit(ctx, s * MR, j0, valid, block);
                if (rc) return rc;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- kNN: threshold filter */
typedef struct {
    const float *theta_r, *theta_c;
    int both;
    int64_t h, cap_r, cap_c, off_r, off_c, n_r, n_c;
    int32_t *r_rows, *c_rows;
    float *r_vals, *c_vals;
    int64_t *r_refs, *c_refs;
} filter_ctx;

static inline __attribute__((always_inline)) int
filter_block(void *vctx, int64_t i0, int64_t j0, unsigned valid, float block[MR][NR]) {
    filter_ctx *c = vctx;
    __m256 inf = _mm256_set1_ps(__builtin_inff());
    __m256 tc0 = c->both ? _mm256_loadu_ps(c->theta_c + j0) : inf;
    __m256 tc1 = c->both ? _mm256_loadu_ps(c->theta_c + j0 + 8) : inf;
    /* quick test: any value above min(its row's, its column's threshold)? */
    __m256 any = _mm256_setzero_ps();
    for (int r = 0; r < MR; r++) {
        __m256 tr = _mm256_broadcast_ss(c->theta_r + i0 + r);
        any = _mm256_or_ps(any, _mm256_cmp_ps(_mm256_loadu_ps(block[r]), _mm256_min_ps(tr, tc0), _CMP_GT_OQ));
        any = _mm256_or_ps(any, _mm256_cmp_ps(_mm256_loadu_ps(block[r] + 8), _mm256_min_ps(tr, tc1), _CMP_GT_OQ));
    }
    if (!_mm256_movemask_ps(any)) return 0;
    if (c->n_r + MR * NR > c->cap_r || (c->both && c->n_c + MR * NR > c->cap_c)) return -1;
    for (int r = 0; r < MR; r++) {
        int64_t i = i0 + r;
        __m256 lo = _mm256_loadu_ps(block[r]), hi = _mm256_loadu_ps(block[r] + 8);
        __m256 tr = _mm256_broadcast_ss(c->theta_r + i);
        unsigned m = above(lo, hi, tr, tr) & valid;
        while (m) {
            int j = __builtin_ctz(m);
            m &= m - 1;
            c->r_rows[c->n_r] = (int32_t)i;
            c->r_vals[c->n_r] = block[r][j];
            c->r_refs[c->n_r++] = c->off_r + j0 + j;
        }
        /* padding rows (i >= h): theta_r is +inf there, but their values (0) may pass theta_c */
        m = c->both && i < c->h ? above(lo, hi, tc0, tc1) : 0;
        while (m) {
            int j = __builtin_ctz(m);
            m &= m - 1;
            c->c_rows[c->n_c] = (int32_t)(j0 + j);
            c->c_vals[c->n_c] = block[r][j];
            c->c_refs[c->n_c++] = c->off_c + i;
        }
    }
    return 0;
}

/* One tile: queries (packed slivers `a`, h rows, thresholds theta_r) against references (packed
 * panels `b`, w rows, thresholds theta_c). Appends (local query row, value, ref_off_r + local ref)
 * for every value > theta_r[row] to the r_* arrays; with `both` (an off-diagonal tile of the
 * symmetric search) also (local ref, value, ref_off_c + local query row) for every value >
 * theta_c[ref] to the c_* arrays. theta_r / theta_c must be readable (and +inf) up to the next
 * multiple of MR / NR. counts[0..1] receive the number appended to each side. Returns 0, or -1
 * when an array would overflow (nothing is valid then: grow them and call again). */
int simfilter_tile(const float *a, const float *b, int64_t d, int64_t h, int64_t w,
                   const float *theta_r, const float *theta_c, int both,
                   int32_t *r_rows, float *r_vals, int64_t *r_refs, int64_t cap_r, int64_t ref_off_r,
                   int32_t *c_rows, float *c_vals, int64_t *c_refs, int64_t cap_c, int64_t ref_off_c,
                   int64_t *counts) {
    filter_ctx c = {theta_r, theta_c, both, h, cap_r, cap_c, ref_off_r, ref_off_c, 0, 0,
                    r_rows, c_rows, r_vals, c_vals, r_refs, c_refs};
    int rc = for_each_block(a, b, d, h, w, filter_block, &c);
    counts[0] = c.n_r;
    counts[1] = c.n_c;
    return rc;
}

/* ---------------------------------------------------------------- k-means: nearest two */
typedef struct {
    const float *add;
    const int64_t *skip;
    int64_t h, col0;
    float *best_v, *second_v;
    int64_t *best_j;
} min2_ctx;

static inline __attribute__((always_inline)) int
min2_block(void *vctx, int64_t i0, int64_t j0, unsigned valid, float block[MR][NR]) {
    min2_ctx *c = vctx;
    __m256 add0 = _mm256_loadu_ps(c->add + j0), add1 = _mm256_loadu_ps(c->add + j0 + 8);
    __m256 lo[MR], hi[MR], any = _mm256_setzero_ps();
    for (int r = 0; r < MR; r++) {
        int64_t i = i0 + r;
        __m256 t = _mm256_set1_ps(i < c->h ? c->second_v[i] : -__builtin_inff());
        lo[r] = _mm256_add_ps(_mm256_loadu_ps(block[r]), add0);
        hi[r] = _mm256_add_ps(_mm256_loadu_ps(block[r] + 8), add1);
        any = _mm256_or_ps(any, _mm256_cmp_ps(lo[r], t, _CMP_LT_OQ));
        any = _mm256_or_ps(any, _mm256_cmp_ps(hi[r], t, _CMP_LT_OQ));
    }
    if (!_mm256_movemask_ps(any)) return 0;  /* the usual case once the search warmed up */
    for (int r = 0; r < MR && i0 + r < c->h; r++) {
        int64_t i = i0 + r;
        float vals[NR];
        _mm256_storeu_ps(vals, lo[r]);
        _mm256_storeu_ps(vals + 8, hi[r]);
        unsigned m = below(lo[r], hi[r], _mm256_set1_ps(c->second_v[i])) & valid;
        while (m) {
            int j = __builtin_ctz(m);
            m &= m - 1;
            int64_t col = c->col0 + j0 + j;
            float v = vals[j];
            if ((c->skip && col == c->skip[i]) || !(v < c->second_v[i])) continue;
            if (v < c->best_v[i]) {
                c->second_v[i] = c->best_v[i];
                c->best_v[i] = v;
                c->best_j[i] = col;
            } else {
                c->second_v[i] = v;
            }
        }
    }
    return 0;
}

/* Running nearest and second-nearest column of every row: v = a_i . b_j + add[j] (lloyd passes
 * b = -2 c and add = |c|^2: the squared distance less |x|^2). For rows i < h and columns j < w,
 * j != skip[i] (-1: none; skip may be NULL), updates best_v[i] / best_j[i] (strictly smaller wins:
 * the lowest column of equal values) and second_v[i] (the smallest of the others). Call it with
 * best_v = second_v = +inf, best_j = -1 to start; several calls over column ranges (offset col0)
 * continue the search. add must be readable, and +inf, up to the next multiple of NR. */
void min2_tile(const float *a, const float *b, int64_t d, int64_t h, int64_t w, const float *add,
               int64_t col0, const int64_t *skip, float *best_v, int64_t *best_j, float *second_v) {
    min2_ctx c = {add, skip, h, col0, best_v, second_v, best_j};
    for_each_block(a, b, d, h, w, min2_block, &c);
}

/* ---------------------------------------------------------------- kNN thresholds: j best */
typedef struct {
    int64_t h, j;
    float *best;
} topj_ctx;

static inline __attribute__((always_inline)) int
topj_block(void *vctx, int64_t i0, int64_t j0, unsigned valid, float block[MR][NR]) {
    topj_ctx *c = vctx;
    (void)j0;
    for (int r = 0; r < MR && i0 + r < c->h; r++) {
        float *bi = c->best + (i0 + r) * c->j;
        int64_t last = c->j - 1;
        __m256 t = _mm256_set1_ps(bi[last]);
        unsigned m = above(_mm256_loadu_ps(block[r]), _mm256_loadu_ps(block[r] + 8), t, t) & valid;
        while (m) {
            int col = __builtin_ctz(m);
            m &= m - 1;
            float v = block[r][col];
            if (!(v > bi[last])) continue;  /* an earlier insertion raised the bar */
            int64_t q = last;
            while (q > 0 && bi[q - 1] < v) {
                bi[q] = bi[q - 1];
                q--;
            }
            bi[q] = v;
        }
    }
    return 0;
}

/* Running j largest values of every row: v = a_i . b_m over the columns m < w. best holds, per
 * row, its j largest so far in decreasing order (row i at best + i*j; start with -inf); rows i < h.
 * The kNN thresholds (knn.py) are best[i*j + j-1] after the sample's columns. */
void topj_tile(const float *a, const float *b, int64_t d, int64_t h, int64_t w, int64_t j, float *best) {
    topj_ctx c = {h, j, best};
    for_each_block(a, b, d, h, w, topj_block, &c);
}
