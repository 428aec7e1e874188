/* The fp32 image tower of an open_clip class-token ViT, batch of uint8 images -> unit embeddings.
 *
 * Why it exists: at batch 1 a ViT-B/32 forward is ~50 GEMMs of 50 rows, and on the 2-core AVX2
 * machines this project targets ONNX Runtime's MLAS runs them at ~156 GFLOP/s while streaming the
 * weights from memory; this file's GEMM runs them at 175-190 (2 threads, the same shapes), which
 * is the difference between ~1.8x and ~2x open_clip eager. Everything else here (LayerNorm,
 * attention, GELU) is cheap at these sizes and written plainly, except the last block: it runs for
 * the class token alone, with the other tokens' keys and values folded away (attend_class_token).
 *
 * Layout contract with kernels/vit/tower.py (which packs the weights and passes one float buffer plus
 * an offsets table):
 *   - a weight matrix [K, N] (y = x W) is stored in panels of NR = 24 columns, N padded with zeros
 *     to a multiple of 24: panel p holds, for k = 0..K-1, the 24 floats W[k, 24p .. 24p+23];
 *   - activations that feed a GEMM are written "packed": strips of MR = 4 rows, strip s holds for
 *     k = 0..K-1 the 4 floats A[4s .. 4s+3, k]; rows past M are never read (the last strip's
 *     tile computes only its own rows).
 * The micro-kernel keeps a 4 x 24 tile in 12 ymm registers and, per k, loads 3 weight vectors and
 * broadcasts 4 activations for 12 FMAs. Each thread owns a contiguous range of panels; while it
 * computes panel p it prefetches panel p + 1, spread over the strips, so the weight stream from
 * memory overlaps the arithmetic.
 *
 * Threads: one call starts threads - 1 pthreads; all run the same stage sequence and meet at a
 * spinning barrier (yielding after a while) between stages, so a stage's work split is static.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CLIPFOLD_X86 1
#include "../_exp8.h"
#endif

enum { NR = 24, MR = 4 };
enum { ACT_GELU_ERF = 0, ACT_QUICK_GELU = 1 };
enum { OUT_STORE = 0, OUT_ADD = 1, OUT_PACKED_ACT = 2 };

/* config[] indices (int64), shared with kernels/vit/tower.py */
enum { C_LAYERS, C_WIDTH, C_HEADS, C_MLP, C_GRID_H, C_GRID_W, C_PATCH, C_OUT_DIM, C_ACT, C_LN_PRE, C_COUNT };
/* offsets[]: these globals first, then LAYER_SLOTS per block (the last block: Q and KV apart) */
enum { O_PATCH_W, O_PATCH_B, O_POS, O_LN_PRE_W, O_LN_PRE_B, O_LN_POST_W, O_LN_POST_B, O_PROJ_W, O_PROJ_B, O_GLOBALS };
enum { L_LN1_W, L_LN1_B, L_QKV_W, L_QKV_B, L_OUT_W, L_OUT_B, L_LN2_W, L_LN2_B, L_FC1_W, L_FC1_B, L_FC2_W, L_FC2_B,
       LAYER_SLOTS };

int clipfold_vit_isa(void) {
#ifdef CLIPFOLD_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#ifdef CLIPFOLD_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* --- barrier --------------------------------------------------------------------------------- */

typedef struct {
    volatile int count, phase;
    int n;
} barrier_t;

static void barrier_wait(barrier_t *b) {
    if (b->n == 1) return;
    int phase = __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == b->n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->phase, phase + 1, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE) == phase;) {
        if (++spins < 4096) _mm_pause();
        else { sched_yield(); spins = 0; }
    }
}

static inline void split(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* --- vector math -------------------------------------------------------------------------------- */

/* erf by Abramowitz & Stegun 7.1.26: 1 - t (a1 + a2 t + ... + a5 t^4) exp(-x^2), t = 1 / (1 + p|x|),
 * absolute error below 1.5e-7 (2e-7 in float), odd-extended. In GELU, x (1 + erf(x / sqrt 2)) / 2,
 * that is an absolute error below 1e-7 |x|. */
AVX2 static inline __m256 erf8(__m256 x) {
    const __m256 signbit = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    __m256 sign = _mm256_and_ps(x, signbit), a = _mm256_andnot_ps(signbit, x);
    __m256 den = _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, _mm256_set1_ps(1.0f));
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), den);
    __m256 q = _mm256_set1_ps(1.061405429f);
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.453152027f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.421413741f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.284496736f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.254829592f));
    q = _mm256_mul_ps(q, t);
    __m256 r = _mm256_fnmadd_ps(q, exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a)), _mm256_set1_ps(1.0f));
    return _mm256_or_ps(r, sign);
}

AVX2 static inline __m256 activation8(__m256 x, int act) {
    if (act == ACT_QUICK_GELU) {  /* x sigmoid(1.702 x) */
        __m256 e = exp8(_mm256_mul_ps(x, _mm256_set1_ps(-1.702f)));
        return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    }
    __m256 e = erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

AVX2 static float activation1(float x, int act) {
    float v[8] = {x}, out[8];
    _mm256_storeu_ps(out, activation8(_mm256_loadu_ps(v), act));
    return out[0];
}

/* --- GEMM --------------------------------------------------------------------------------------- */

typedef struct {
    const float *a;     /* packed activations, strips of MR rows */
    const float *w;     /* packed weights, panels of NR columns */
    const float *bias;  /* [n] */
    int64_t m, k, n;
    int mode, act;
    float *out;         /* OUT_STORE / OUT_ADD: row-major [m, ldo]; OUT_PACKED_ACT: packed [m, n] for the next GEMM */
    int64_t ldo;
} gemm_t;

/* One R x 24 tile (R <= 4 rows of a strip) over all of K; prefetches 1/strips of the next panel
 * (two lines per NR floats). A strip's last rows past M are not computed: for ViT-B/32's 50 rows
 * the 13th strip has 2, and a 2-row tile costs about half a 4-row one. */
static inline __attribute__((always_inline, target("avx2,fma"))) void tile_rows(
    const int R, const float *a, const float *w, const float *next, int64_t k, int64_t strips, int64_t strip,
    float *acc) {
    __m256 c[MR][3];
    for (int r = 0; r < R; r++) c[r][0] = c[r][1] = c[r][2] = _mm256_setzero_ps();
    int64_t chunk = (k + strips - 1) / strips, line = strip * chunk, count = 0;  /* line: next panel's row */
    for (int64_t i = 0; i < k; i++) {
        if (count == 0) {
            if (next && line < k) {
                const float *pf = next + line * NR;
                _mm_prefetch((const char *)pf, _MM_HINT_T0);
                _mm_prefetch((const char *)(pf + 16), _MM_HINT_T0);
            }
            line++;
            count = strips;
        }
        count--;
        const float *wk = w + i * NR, *ak = a + i * MR;
        __m256 b0 = _mm256_loadu_ps(wk), b1 = _mm256_loadu_ps(wk + 8), b2 = _mm256_loadu_ps(wk + 16);
        for (int r = 0; r < R; r++) {
            __m256 x = _mm256_broadcast_ss(ak + r);
            c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
            c[r][2] = _mm256_fmadd_ps(x, b2, c[r][2]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 3; j++) _mm256_storeu_ps(acc + r * NR + 8 * j, c[r][j]);
}

AVX2 static void tile(int rows, const float *a, const float *w, const float *next, int64_t k, int64_t strips,
                      int64_t strip, float *acc) {
    switch (rows) {
        case 1: tile_rows(1, a, w, next, k, strips, strip, acc); break;
        case 2: tile_rows(2, a, w, next, k, strips, strip, acc); break;
        case 3: tile_rows(3, a, w, next, k, strips, strip, acc); break;
        default: tile_rows(4, a, w, next, k, strips, strip, acc);
    }
}

/* acc + bias, then stored, added to the output (a residual), or activated and written packed. */
AVX2 static void epilogue(const gemm_t *g, const float *acc, int64_t row0, int64_t col0) {
    int64_t rows = g->m - row0 < MR ? g->m - row0 : MR, cols = g->n - col0 < NR ? g->n - col0 : NR;
    if (g->mode == OUT_PACKED_ACT && rows == MR && cols == NR) {
        /* a full tile: activate 4 rows x 8 columns, transpose them into the packed [column][4 rows]
         * order, and write 4 vectors instead of 32 scalars */
        float *dst = g->out + ((row0 / MR) * g->n + col0) * MR;
        for (int64_t j = 0; j < NR; j += 8) {
            __m256 bias = _mm256_loadu_ps(g->bias + col0 + j), v[MR];
            for (int r = 0; r < MR; r++)
                v[r] = activation8(_mm256_add_ps(_mm256_loadu_ps(acc + r * NR + j), bias), g->act);
            __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
            __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);  /* columns 0|4, 1|5 */
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);  /* columns 2|6, 3|7 */
            float *out = dst + j * MR;
            _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
            _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
            _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
            _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *src = acc + r * NR;
        int64_t j = 0;
        if (g->mode == OUT_PACKED_ACT) {
            float *dst = g->out + ((row0 / MR) * g->n + col0) * MR + (row0 + r) % MR;
            for (; j + 8 <= cols; j += 8) {
                float v[8];
                __m256 x = _mm256_add_ps(_mm256_loadu_ps(src + j), _mm256_loadu_ps(g->bias + col0 + j));
                _mm256_storeu_ps(v, activation8(x, g->act));
                for (int u = 0; u < 8; u++) dst[(j + u) * MR] = v[u];
            }
            for (; j < cols; j++) dst[j * MR] = activation1(src[j] + g->bias[col0 + j], g->act);
            continue;
        }
        float *dst = g->out + (row0 + r) * g->ldo + col0;
        for (; j + 8 <= cols; j += 8) {
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(src + j), _mm256_loadu_ps(g->bias + col0 + j));
            if (g->mode == OUT_ADD) v = _mm256_add_ps(_mm256_loadu_ps(dst + j), v);
            _mm256_storeu_ps(dst + j, v);
        }
        for (; j < cols; j++) {
            float v = src[j] + g->bias[col0 + j];
            dst[j] = g->mode == OUT_ADD ? dst[j] + v : v;
        }
    }
}

AVX2 static void gemm_part(const gemm_t *g, int t, int nt) {
    int64_t panels = (g->n + NR - 1) / NR, strips = (g->m + MR - 1) / MR, lo, hi;
    split(panels, t, nt, &lo, &hi);
    float acc[MR * NR];
    for (int64_t p = lo; p < hi; p++) {
        const float *w = g->w + p * g->k * NR, *next = p + 1 < hi ? w + g->k * NR : NULL;
        for (int64_t s = 0; s < strips; s++) {
            int rows = g->m - s * MR < MR ? (int)(g->m - s * MR) : MR;
            tile(rows, g->a + s * g->k * MR, w, next, g->k, strips, s, acc);
            epilogue(g, acc, s * MR, p * NR);
        }
    }
}

/* --- LayerNorm, attention, patches ---------------------------------------------------------------- */

static inline float *packed_at(float *base, int64_t k, int64_t row, int64_t col) {
    return base + ((row / MR) * k + col) * MR + row % MR;
}

/* Rows [lo, hi) of x (row r at x + r * stride), normalized over w; written row-major into `out`
 * (row r at out + r * w, may be x itself when stride == w) or, when `packed`, into packed rows. */
AVX2 static void layer_norm(const float *x, int64_t stride, int64_t lo, int64_t hi, int64_t w, const float *gamma,
                            const float *beta, float eps, float *out, int packed) {
    for (int64_t r = lo; r < hi; r++) {
        const float *row = x + r * stride;
        __m256 s = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= w; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(row + j));
        float buf[8], sum = 0.f, sq = 0.f;
        _mm256_storeu_ps(buf, s);
        for (int u = 0; u < 8; u++) sum += buf[u];
        for (; j < w; j++) sum += row[j];
        float mean = sum / (float)w;
        __m256 mv = _mm256_set1_ps(mean), q = _mm256_setzero_ps();
        for (j = 0; j + 8 <= w; j += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + j), mv);
            q = _mm256_fmadd_ps(d, d, q);
        }
        _mm256_storeu_ps(buf, q);
        for (int u = 0; u < 8; u++) sq += buf[u];
        for (; j < w; j++) sq += (row[j] - mean) * (row[j] - mean);
        float inv = 1.0f / sqrtf(sq / (float)w + eps);
        for (j = 0; j < w; j++) {
            float v = (row[j] - mean) * inv * gamma[j] + beta[j];
            if (packed) *packed_at(out, w, r, j) = v;
            else out[r * w + j] = v;
        }
    }
}

/* One head of softmax(q k^T scale) v for nq queries over t keys; query i's output goes to packed
 * row out_row0 + i, columns [col0, col0 + d) of a packed [., out_k] buffer. `kt` (d x t8 floats,
 * t8 = t rounded up to 8) receives the keys transposed, so that a query's scores come 8 keys per
 * vector without horizontal sums; `p` holds t8 scores. */
AVX2 static void attend(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                        int64_t nq, int64_t t, int64_t d, float scale, float *out, int64_t out_k, int64_t out_row0,
                        int64_t col0, float *kt, float *p) {
    int64_t t8 = (t + 7) / 8 * 8;
    for (int64_t c = 0; c < d; c++) {
        float *row = kt + c * t8;
        for (int64_t j = 0; j < t; j++) row[j] = k[j * kv_stride + c];
        for (int64_t j = t; j < t8; j++) row[j] = 0.f;
    }
    for (int64_t i = 0; i < nq; i++) {
        const float *qi = q + i * q_stride;
        for (int64_t j0 = 0; j0 < t8; j0 += 64) {  /* up to 8 blocks of 8 keys at once */
            int64_t blocks = (t8 - j0) / 8 < 8 ? (t8 - j0) / 8 : 8;
            __m256 acc[8];
            for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c++) {
                __m256 x = _mm256_set1_ps(qi[c] * scale);
                const float *row = kt + c * t8 + j0;
                for (int u = 0; u < blocks; u++) acc[u] = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 8 * u), acc[u]);
            }
            for (int u = 0; u < blocks; u++) _mm256_storeu_ps(p + j0 + 8 * u, acc[u]);
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < t; j++) mx = p[j] > mx ? p[j] : mx;
        for (int64_t j = t; j < t8; j++) p[j] = -INFINITY;
        __m256 sv = _mm256_setzero_ps(), mv = _mm256_set1_ps(mx);
        for (int64_t j = 0; j < t8; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
            e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(_mm256_loadu_ps(p + j),
                                                                        _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
            _mm256_storeu_ps(p + j, e);
            sv = _mm256_add_ps(sv, e);
        }
        float buf[8], sum = 0.f;
        _mm256_storeu_ps(buf, sv);
        for (int u = 0; u < 8; u++) sum += buf[u];
        float inv = 1.0f / sum;
        for (int64_t c0 = 0; c0 < d; c0 += 64) {  /* up to 8 vectors of the output in registers */
            int64_t vecs = (d - c0) / 8 < 8 ? (d - c0) / 8 : 8;
            __m256 acc[8];
            for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
            for (int64_t j = 0; j < t; j++) {
                __m256 w = _mm256_set1_ps(p[j]);
                const float *vj = v + j * kv_stride + c0;
                for (int u = 0; u < vecs; u++) acc[u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * u), acc[u]);
            }
            for (int u = 0; u < vecs; u++) {
                _mm256_storeu_ps(buf, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
                for (int e = 0; e < 8; e++) *packed_at(out, out_k, out_row0 + i, col0 + c0 + 8 * u + e) = buf[e];
            }
            for (int64_t c = c0 + 8 * vecs; c < (c0 + 64 < d ? c0 + 64 : d); c++) {  /* d not a multiple of 8 */
                float o = 0.f;
                for (int64_t j = 0; j < t; j++) o += p[j] * v[j * kv_stride + c];
                *packed_at(out, out_k, out_row0 + i, col0 + c) = o * inv;
            }
        }
    }
}

AVX2 static float dot(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    float buf[8], out = 0.f;
    _mm256_storeu_ps(buf, _mm256_add_ps(s0, s1));
    for (int u = 0; u < 8; u++) out += buf[u];
    for (; j < n; j++) out += a[j] * b[j];
    return out;
}

/* The class token's attention in the last block without keys or values for the other tokens:
 * with X the block's normalized rows and q the class token's query (head h),
 *   scores_j = (X_j Wk_h + bk_h) . q = X_j . (Wk_h q) + bk_h . q, and bk_h . q is the same for every
 *   j, so the softmax drops it;
 *   out = sum_j p_j (X_j Wv_h + bv_h) = (sum_j p_j X_j) Wv_h + bv_h, since the p_j sum to 1.
 * Per head that is four products of X's width by the head's, instead of projecting every token:
 * for ViT-B/32, 2.1 M multiply-adds for the block instead of 59 M, and Wk, Wv are read once.
 * `wkv` is [Wk | Wv] row-major (w rows of 2w); `scratch` holds 2w + t8 floats. */
AVX2 static void attend_class_token(const float *q, const float *x, int64_t t, int64_t w, int64_t d, int64_t h,
                                    const float *wkv, const float *bv, float scale, float *out, int64_t out_row,
                                    float *scratch, float *p) {
    float *qk = scratch, *xbar = scratch + w;
    for (int64_t i = 0; i < w; i++) qk[i] = dot(wkv + i * 2 * w + h * d, q, d) * scale;
    float mx = -INFINITY;
    for (int64_t j = 0; j < t; j++) {
        p[j] = dot(x + j * w, qk, w);
        mx = p[j] > mx ? p[j] : mx;
    }
    float sum = 0.f;
    for (int64_t j = 0; j < t; j++) {
        float rest[8] = {p[j] - mx}, e[8];
        _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(rest)));
        p[j] = e[0];
        sum += e[0];
    }
    float inv = 1.0f / sum;
    memset(xbar, 0, (size_t)w * sizeof(float));
    for (int64_t j = 0; j < t; j++) {
        __m256 pj = _mm256_set1_ps(p[j] * inv);
        const float *xj = x + j * w;
        int64_t i = 0;
        for (; i + 8 <= w; i += 8)
            _mm256_storeu_ps(xbar + i, _mm256_fmadd_ps(pj, _mm256_loadu_ps(xj + i), _mm256_loadu_ps(xbar + i)));
        for (; i < w; i++) xbar[i] += p[j] * inv * xj[i];
    }
    const float *wv = wkv + w + h * d;
    for (int64_t c0 = 0; c0 < d; c0 += 64) {  /* up to 8 vectors of the output in registers */
        int64_t vecs = (d - c0) / 8 < 8 ? (d - c0) / 8 : 8, end = c0 + 64 < d ? c0 + 64 : d;
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (int64_t i = 0; i < w; i++) {
            __m256 xi = _mm256_set1_ps(xbar[i]);
            const float *row = wv + i * 2 * w + c0;
            for (int u = 0; u < vecs; u++) acc[u] = _mm256_fmadd_ps(xi, _mm256_loadu_ps(row + 8 * u), acc[u]);
        }
        float buf[8];
        for (int u = 0; u < vecs; u++) {
            _mm256_storeu_ps(buf, acc[u]);
            for (int e = 0; e < 8; e++)
                *packed_at(out, w, out_row, h * d + c0 + 8 * u + e) = buf[e] + bv[h * d + c0 + 8 * u + e];
        }
        for (int64_t c = c0 + 8 * vecs; c < end; c++) {  /* d not a multiple of 8 */
            float o = 0.f;
            for (int64_t i = 0; i < w; i++) o += xbar[i] * wv[i * 2 * w + c];
            *packed_at(out, w, out_row, h * d + c) = o + bv[h * d + c];
        }
    }
}

/* --- the forward ------------------------------------------------------------------------------------ */

typedef struct {
    const int64_t *cfg, *off;
    const float *wts;
    const uint8_t *pixels;
    int64_t batch;
    float eps;
    float *ws, *emb;
    barrier_t bar;
    int threads;
    volatile int go;  /* workers wait for 1 (run) or -1 (a thread could not start: leave) */
} forward_t;

typedef struct { forward_t *f; int t; } worker_t;

/* The workspace, in floats, for `batch` images: every buffer a multiple of 16 floats. */
static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

typedef struct { float *x, *qkv, *ap, *hp, *tok, *xc, *q, *cp, *cp2, *hp2, *att; } buffers_t;

static int64_t layout(const int64_t *cfg, int64_t batch, int threads, float *base, buffers_t *b) {
    int64_t w = cfg[C_WIDTH], f = cfg[C_MLP], g = cfg[C_GRID_H] * cfg[C_GRID_W], t = g + 1, m = batch * t;
    int64_t kp = 3 * cfg[C_PATCH] * cfg[C_PATCH], m4 = (m + MR - 1) / MR * MR, b4 = (batch + MR - 1) / MR * MR;
    int64_t widest = kp > f ? kp : f;
    widest = widest > w ? widest : w;
    int64_t scratch = round16(((t + 7) / 8 * 8) * (w / cfg[C_HEADS] + 1) + 2 * w);  /* attention, per thread */
    int64_t sizes[11] = {m * w, m * 3 * w, m4 * widest, m4 * f, batch * g * w, batch * w, batch * w,
                         b4 * w, b4 * w, b4 * f, (int64_t)threads * scratch};
    float **slots[11] = {&b->x, &b->qkv, &b->ap, &b->hp, &b->tok, &b->xc, &b->q, &b->cp, &b->cp2, &b->hp2, &b->att};
    int64_t total = 0;
    for (int i = 0; i < 11; i++) {
        if (base) *slots[i] = base + total;
        total += round16(sizes[i]);
    }
    return total;
}

AVX2 static void run_stage_gemm(forward_t *f, int t, const float *a, int64_t wslot, int64_t bslot, int64_t m, int64_t k,
                                int64_t n, int mode, float *out, int64_t ldo) {
    gemm_t g = {a, f->wts + f->off[wslot], f->wts + f->off[bslot], m, k, n, mode, (int)f->cfg[C_ACT], out, ldo};
    gemm_part(&g, t, f->threads);
}

/* A block after its attention, for `rows` rows: x += attention output . Wout + b; then
 * x += GELU(LN2(x) . Wfc1 + b) . Wfc2 + b. `ln` and `hidden` receive the packed LN2 output and
 * GELU output (`ln` may be the attention's own buffer: a barrier separates the reads and writes). */
AVX2 static void block_tail(forward_t *f, int t, int64_t base, const float *attention, int64_t rows, float *x,
                            float *ln, float *hidden) {
    const float *W = f->wts;
    const int64_t *lay = f->off + base;
    int64_t w = f->cfg[C_WIDTH], mlp = f->cfg[C_MLP], lo, hi;
    run_stage_gemm(f, t, attention, base + L_OUT_W, base + L_OUT_B, rows, w, w, OUT_ADD, x, w);
    barrier_wait(&f->bar);
    split(rows, t, f->threads, &lo, &hi);
    layer_norm(x, w, lo, hi, w, W + lay[L_LN2_W], W + lay[L_LN2_B], f->eps, ln, 1);
    barrier_wait(&f->bar);
    run_stage_gemm(f, t, ln, base + L_FC1_W, base + L_FC1_B, rows, w, mlp, OUT_PACKED_ACT, hidden, 0);
    barrier_wait(&f->bar);
    run_stage_gemm(f, t, hidden, base + L_FC2_W, base + L_FC2_B, rows, mlp, w, OUT_ADD, x, w);
    barrier_wait(&f->bar);
}

AVX2 static void forward_worker(forward_t *f, int t) {
    const int64_t *cfg = f->cfg, *off = f->off;
    const float *W = f->wts;
    int nt = f->threads;
    int64_t L = cfg[C_LAYERS], w = cfg[C_WIDTH], heads = cfg[C_HEADS], d = w / heads;
    int64_t gh = cfg[C_GRID_H], gw = cfg[C_GRID_W], ps = cfg[C_PATCH], g = gh * gw, T = g + 1, B = f->batch, M = B * T;
    int64_t kp = 3 * ps * ps, ih = gh * ps, iw = gw * ps, lo, hi;
    float scale = 1.0f / sqrtf((float)d), eps = f->eps;
    buffers_t b;
    layout(cfg, B, nt, f->ws, &b);
    int64_t T8 = (T + 7) / 8 * 8;
    float *kt = b.att + t * round16(T8 * (d + 1) + 2 * w), *p = kt + T8 * d + 2 * w;

    /* patches: im2col of the uint8 pixels, packed (the graph's input normalization is in the weights) */
    split(B * g, t, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        int64_t img = r / g, gy = (r % g) / gw, gx = r % gw;
        for (int64_t c = 0; c < 3; c++)
            for (int64_t ky = 0; ky < ps; ky++) {
                const uint8_t *src = f->pixels + ((img * 3 + c) * ih + gy * ps + ky) * iw + gx * ps;
                for (int64_t kx = 0; kx < ps; kx++) *packed_at(b.ap, kp, r, (c * ps + ky) * ps + kx) = (float)src[kx];
            }
    }
    barrier_wait(&f->bar);
    run_stage_gemm(f, t, b.ap, O_PATCH_W, O_PATCH_B, B * g, kp, w, OUT_STORE, b.tok, w);
    barrier_wait(&f->bar);
    /* tokens: the class embedding (folded into position 0), then the patches, plus positions */
    const float *pos = W + off[O_POS];
    split(M, t, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        int64_t img = r / T, i = r % T;
        float *dst = b.x + r * w;
        if (i == 0) memcpy(dst, pos, (size_t)w * sizeof(float));
        else for (int64_t j = 0; j < w; j++) dst[j] = b.tok[(img * g + i - 1) * w + j] + pos[i * w + j];
        if (cfg[C_LN_PRE]) layer_norm(b.x, w, r, r + 1, w, W + off[O_LN_PRE_W], W + off[O_LN_PRE_B], eps, b.x, 0);
    }
    barrier_wait(&f->bar);

    for (int64_t l = 0; l < L; l++) {
        int64_t base = O_GLOBALS + l * LAYER_SLOTS;
        const int64_t *lay = off + base;
        int last = l == L - 1;
        split(M, t, nt, &lo, &hi);
        if (!last) {
            layer_norm(b.x, w, lo, hi, w, W + lay[L_LN1_W], W + lay[L_LN1_B], eps, b.ap, 1);
        } else {  /* rows for the folded attention, and the class tokens: normalized (packed) and residual */
            layer_norm(b.x, w, lo, hi, w, W + lay[L_LN1_W], W + lay[L_LN1_B], eps, b.qkv, 0);
            split(B, t, nt, &lo, &hi);
            layer_norm(b.x, T * w, lo, hi, w, W + lay[L_LN1_W], W + lay[L_LN1_B], eps, b.cp, 1);
            for (int64_t i = lo; i < hi; i++) memcpy(b.xc + i * w, b.x + i * T * w, (size_t)w * sizeof(float));
        }
        barrier_wait(&f->bar);
        if (!last) {
            run_stage_gemm(f, t, b.ap, base + L_QKV_W, base + L_QKV_B, M, w, 3 * w, OUT_STORE, b.qkv, 3 * w);
            barrier_wait(&f->bar);
            split(B * heads, t, nt, &lo, &hi);
            for (int64_t i = lo; i < hi; i++) {
                int64_t img = i / heads, h = i % heads;
                const float *rows = b.qkv + img * T * 3 * w + h * d;
                attend(rows, 3 * w, rows + w, rows + 2 * w, 3 * w, T, T, d, scale, b.ap, w, img * T, h * d, kt, p);
            }
            barrier_wait(&f->bar);
            block_tail(f, t, base, b.ap, M, b.x, b.ap, b.hp);
            continue;
        }
        /* last block: the class token's query; its keys and values are never formed (see
         * attend_class_token; the QKV slots hold [Wk | Wv] row-major, the query weights follow the
         * block's slots) */
        int64_t q_slot = O_GLOBALS + L * LAYER_SLOTS;
        run_stage_gemm(f, t, b.cp, q_slot, q_slot + 1, B, w, w, OUT_STORE, b.q, w);
        barrier_wait(&f->bar);
        split(B * heads, t, nt, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) {
            int64_t img = i / heads, h = i % heads;
            attend_class_token(b.q + img * w + h * d, b.qkv + img * T * w, T, w, d, h, W + lay[L_QKV_W],
                               W + lay[L_QKV_B] + w, scale, b.cp2, img, kt, p);
        }
        barrier_wait(&f->bar);
        block_tail(f, t, base, b.cp2, B, b.xc, b.cp, b.hp2);
    }
    split(B, t, nt, &lo, &hi);
    layer_norm(b.xc, w, lo, hi, w, W + off[O_LN_POST_W], W + off[O_LN_POST_B], eps, b.cp, 1);
    barrier_wait(&f->bar);
    run_stage_gemm(f, t, b.cp, O_PROJ_W, O_PROJ_B, B, w, cfg[C_OUT_DIM], OUT_STORE, f->emb, cfg[C_OUT_DIM]);
}

static void *worker_main(void *arg) {
    worker_t *wk = (worker_t *)arg;
    int go;
    while ((go = __atomic_load_n(&wk->f->go, __ATOMIC_ACQUIRE)) == 0) sched_yield();
    if (go > 0) forward_worker(wk->f, wk->t);
    return NULL;
}
#endif /* CLIPFOLD_X86 */

/* Floats of workspace one call with `batch` images and `threads` threads needs. */
int64_t clipfold_vit_workspace(const int64_t *cfg, int64_t batch, int threads) {
#ifdef CLIPFOLD_X86
    buffers_t b;
    return layout(cfg, batch, threads, NULL, &b);
#else
    (void)cfg; (void)batch; (void)threads;
    return -1;
#endif
}

/* pixels: uint8 [batch, 3, grid_h * patch, grid_w * patch]; emb: [batch, out_dim] (not normalized).
 * Returns 0, or -1 without AVX2 + FMA, -2 when a thread cannot start. */
int clipfold_vit_forward(const int64_t *cfg, const int64_t *offsets, const float *weights, float eps,
                         const uint8_t *pixels, int64_t batch, float *workspace, float *emb, int threads) {
#ifdef CLIPFOLD_X86
    if (!clipfold_vit_isa()) return -1;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    forward_t f = {cfg, offsets, weights, pixels, batch, eps, workspace, emb, {0, 0, threads}, threads, 0};
    pthread_t ids[64];
    worker_t workers[64];
    int started = 1;
    for (; started < threads; started++) {
        workers[started] = (worker_t){&f, started};
        if (pthread_create(&ids[started], NULL, worker_main, &workers[started]) != 0) break;
    }
    __atomic_store_n(&f.go, started == threads ? 1 : -1, __ATOMIC_RELEASE);
    if (started != threads) {
        for (int i = 1; i < started; i++) pthread_join(ids[i], NULL);
        return -2;
    }
    forward_worker(&f, 0);
    for (int i = 1; i < threads; i++) pthread_join(ids[i], NULL);
    return 0;
#else
    (void)cfg; (void)offsets; (void)weights; (void)eps; (void)pixels; (void)batch; (void)workspace; (void)emb;
    (void)threads;
    return -1;
#endif
}
