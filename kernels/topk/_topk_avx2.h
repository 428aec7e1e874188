/* The AVX2 + FMA (+ F16C) scoring paths of the top-k kernel (_topk.c includes this file once, on
 * x86 only; the cost model is at the top of _topk.c). Every function is compiled for AVX2 on its
 * own (target attribute) and runs only where have_avx2() says the CPU has it, or when forced. */
#ifndef CLIPFOLD_TOPK_AVX2_H
#define CLIPFOLD_TOPK_AVX2_H

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* Sum each of four accumulators across its 8 lanes: one 4-wide vector of the four totals. */
__attribute__((target("avx2,fma"))) static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd); /* low lane: low halves of a..d, high lane: high halves */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* MQ queries x NR rows into scores[row * stride + query]; d8 = d rounded down to 8, the tail is
 * scalar. The accumulators reduce four at a time (3 hadds + 1 add per four scores). The _pf1 and
 * _pf variants also prefetch one or NR rows from `next`, a cache line per row every 16 floats: the
 * first query tile over a row tile is the one that waits on memory unless its rows were asked for
 * earlier. */
#define TILE_BODY(MQ, NR, PF)                                                                           \
        __m256 acc[MQ * NR];                                                                            \
        _Pragma("GCC unroll 32")                                                                        \
        for (int t = 0; t < MQ * NR; t++) acc[t] = _mm256_setzero_ps();                                 \
        int64_t d8 = d & ~(int64_t)7;                                                                   \
        for (int64_t j = 0; j < d8; j += 8) {                                                           \
            __m256 b[NR];                                                                               \
            for (int r = 0; r < NR; r++) b[r] = _mm256_loadu_ps(g + r * d + j);                         \
            if (PF && (j & 15) == 0)                                                                    \
                for (int r = 0; r < PF; r++) _mm_prefetch((const char *)(next + r * d + j), _MM_HINT_T0); \
            for (int i = 0; i < MQ; i++) {                                                              \
                __m256 a = _mm256_loadu_ps(q + i * d + j);                                              \
                for (int r = 0; r < NR; r++) acc[r * MQ + i] = _mm256_fmadd_ps(a, b[r], acc[r * MQ + i]); \
            }                                                                                           \
        }                                                                                               \
        float out[MQ * NR];                                                                             \
        int t = 0;                                                                                      \
        _Pragma("GCC unroll 8")                                                                         \
        for (; t + 4 <= MQ * NR; t += 4)                                                                \
            _mm_storeu_ps(out + t, hsum4(acc[t], acc[t + 1], acc[t + 2], acc[t + 3]));                 \
        for (; t < MQ * NR; t++) out[t] = hsum(acc[t]);                                                 \
        for (int r = 0; r < NR; r++)                                                                    \
            for (int i = 0; i < MQ; i++) {                                                              \
                float s = out[r * MQ + i];                                                              \
                for (int64_t j = d8; j < d; j++) s += q[i * d + j] * g[r * d + j];                      \
                scores[r * stride + i] = s;                                                             \
            }

#define TILE(MQ, NR)                                                                                    \
    __attribute__((target("avx2,fma"))) static void tile_##MQ##x##NR(                                  \
        const float *q, int64_t d, const float *g, float *scores, int64_t stride, const float *next) {  \
        (void)next;                                                                                     \
        TILE_BODY(MQ, NR, 0)                                                                            \
    }                                                                                                   \
    __attribute__((target("avx2,fma"))) static void tile_##MQ##x##NR##_pf1(                            \
        const float *q, int64_t d, const float *g, float *scores, int64_t stride, const float *next) {  \
        TILE_BODY(MQ, NR, 1)                                                                            \
    }                                                                                                   \
    __attribute__((target("avx2,fma"))) static void tile_##MQ##x##NR##_pf(                             \
        const float *q, int64_t d, const float *g, float *scores, int64_t stride, const float *next) {  \
        TILE_BODY(MQ, NR, NR)                                                                           \
    }

typedef void (*tile_fn)(const float *, int64_t, const float *, float *, int64_t, const float *);
TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(2, 1) TILE(2, 2) TILE(2, 3)
TILE(3, 1) TILE(3, 2) TILE(3, 3) TILE(4, 1) TILE(4, 2) TILE(4, 3)
/* [prefetch: none, one row, every row][queries][rows] */
static const tile_fn TILES[3][5][4] = {
    {{0, 0, 0, 0}, {0, tile_1x1, tile_1x2, tile_1x3}, {0, tile_2x1, tile_2x2, tile_2x3},
     {0, tile_3x1, tile_3x2, tile_3x3}, {0, tile_4x1, tile_4x2, tile_4x3}},
    {{0, 0, 0, 0}, {0, tile_1x1_pf1, tile_1x2_pf1, tile_1x3_pf1}, {0, tile_2x1_pf1, tile_2x2_pf1, tile_2x3_pf1},
     {0, tile_3x1_pf1, tile_3x2_pf1, tile_3x3_pf1}, {0, tile_4x1_pf1, tile_4x2_pf1, tile_4x3_pf1}},
    {{0, 0, 0, 0}, {0, tile_1x1_pf, tile_1x2_pf, tile_1x3_pf}, {0, tile_2x1_pf, tile_2x2_pf, tile_2x3_pf},
     {0, tile_3x1_pf, tile_3x2_pf, tile_3x3_pf}, {0, tile_4x1_pf, tile_4x2_pf, tile_4x3_pf}},
};
enum { PREFETCH_ROWS_AHEAD = 12 };

/* Several queries: 4 queries x 3 rows (7 loads per 12 FMAs, FMA-bound), query blocks kept in L2. */
__attribute__((target("avx2,fma"))) static void score_block_avx2(const float *q, int64_t nq, int64_t d,
                                                                 const float *g, int64_t rows, float *scores) {
    int64_t r = 0;
    for (int64_t q0 = 0; q0 < nq; q0 += QUERY_BLOCK) {
        int64_t q1 = q0 + QUERY_BLOCK < nq ? q0 + QUERY_BLOCK : nq;
        int spread = q0 == 0 && q1 - q0 > 8; /* three or more query tiles share the prefetching */
        for (int64_t r0 = r; r0 < rows; r0 += 3) {
            int64_t nr = rows - r0 < 3 ? rows - r0 : 3;
            const float *ahead = g + (r0 + PREFETCH_ROWS_AHEAD) * d;
            for (int64_t i = q0, t = 0; i < q1; i += 4, t++) {
                int64_t mq = q1 - i < 4 ? q1 - i : 4;
                /* The rows PREFETCH_ROWS_AHEAD ahead are requested while these are scored: one row
                 * per query tile for the first three tiles, or all by the first tile when fewer. */
                int kind = q0 != 0 ? 0 : spread ? (t < 3 ? 1 : 0) : (t == 0 ? 2 : 0);
                TILES[kind][mq][nr](q + i * d, d, g + r0 * d, scores + r0 * nq + i, nq, ahead + (kind == 1 ? t * d : 0));
            }
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void widen_avx2(const void *src, int storage, int64_t count,
                                                                float *dst) {
    int64_t i = 0;
    if (storage == STORAGE_INT8) {
        const int8_t *s = (const int8_t *)src;
        for (; i + 8 <= count; i += 8) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(s + i));
            _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
        }
        for (; i < count; i++) dst[i] = (float)s[i];
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + 8 <= count; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        if (i < count) widen_portable(s + i, storage, count - i, dst + i);
    }
}

/* logsumexp_columns with 8 queries per vector (scores are stored row by row, queries contiguous). */
__attribute__((target("avx2,fma"))) static void logsumexp_block_avx2(const float *scores, int64_t stride, int64_t nq,
                                                                     int64_t rows, float *run_max, double *run_sum) {
    if (nq == 1 && stride == 1) { /* one query (a label head at batch 1): its scores are contiguous */
        __m256 m8 = _mm256_set1_ps(run_max[0]);
        int64_t r = 0;
        for (; r + 8 <= rows; r += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(scores + r), m8); /* NaN: keeps m8 */
        float lanes[8], m = run_max[0];
        _mm256_storeu_ps(lanes, m8);
        for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
        for (int64_t t = r; t < rows; t++) m = scores[t] > m ? scores[t] : m;
        if (m > run_max[0]) {
            run_sum[0] *= exp((double)run_max[0] - (double)m);
            run_max[0] = m;
        }
        if (m == -INFINITY) return;
        __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
        for (r = 0; r + 8 <= rows; r += 8) sum = _mm256_add_ps(sum, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + r), mv)));
        double total = hsum(sum);
        for (; r < rows; r++)
            if (scores[r] == scores[r]) total += expf(scores[r] - m);
        run_sum[0] += total;
        return;
    }
    int64_t q0 = 0;
    for (; q0 + 8 <= nq; q0 += 8) {
        __m256 m = _mm256_loadu_ps(run_max + q0);
        /* max_ps returns its second operand when either is NaN: NaN scores never become the max, and
         * exp8 clamps them to ~0 below, so they count for nothing, as in the heaps. */
        for (int64_t r = 0; r < rows; r++) m = _mm256_max_ps(_mm256_loadu_ps(scores + r * stride + q0), m);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t r = 0; r < rows; r++)
            sum = _mm256_add_ps(sum, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + r * stride + q0), m)));
        float mx[8], sm[8];
        _mm256_storeu_ps(mx, m);
        _mm256_storeu_ps(sm, sum);
        for (int i = 0; i < 8; i++) {
            if (mx[i] > run_max[q0 + i]) {
                run_sum[q0 + i] *= exp((double)run_max[q0 + i] - (double)mx[i]);
                run_max[q0 + i] = mx[i];
            }
            run_sum[q0 + i] += sm[i];
        }
    }
    if (q0 < nq) logsumexp_columns(scores + q0, stride, nq - q0, rows, run_max + q0, run_sum + q0);
}

/* One query: memory-bound, so the gallery is read as one sequential stream, a row at a time
 * (8 rows side by side, 512 bytes apart for int8 at d=512, read measurably slower than one
 * stream), with four accumulators over 32 dimensions per step. fp16 and int8 rows are widened in
 * registers (F16C, or sign-extend + convert), so they are read at their stored size. */
#define ROW_DOT(NAME, T, LOAD8, SCALAR)                                                                 \
    __attribute__((target("avx2,fma,f16c"))) static float NAME(const float *q, int64_t d, const T *g, \
                                                               const T *next) {                         \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                     \
        int64_t d32 = d & ~(int64_t)31, j = 0;                                                          \
        for (; j < d32; j += 32) {                                                                      \
            _mm_prefetch((const char *)(next + j), _MM_HINT_T0);                                        \
            if (sizeof(T) == 4) _mm_prefetch((const char *)(next + j + 16), _MM_HINT_T0);               \
            a0 = _mm256_fmadd_ps(_mm256_load_ps(q + j), LOAD8(g + j), a0);                              \
            a1 = _mm256_fmadd_ps(_mm256_load_ps(q + j + 8), LOAD8(g + j + 8), a1);                      \
            a2 = _mm256_fmadd_ps(_mm256_load_ps(q + j + 16), LOAD8(g + j + 16), a2);                    \
            a3 = _mm256_fmadd_ps(_mm256_load_ps(q + j + 24), LOAD8(g + j + 24), a3);                    \
        }                                                                                               \
        float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                    \
        for (; j < d; j++) s += q[j] * SCALAR(g + j);                                                   \
        return s;                                                                                       \
    }
#define LOAD8_FP32(p) _mm256_loadu_ps(p)
#define LOAD8_FP16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD8_INT8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define SCALAR_FP32(p) (*(p))
#define SCALAR_FP16(p) _cvtsh_ss(*(p))
#define SCALAR_INT8(p) ((float)*(p))
ROW_DOT(row_fp32, float, LOAD8_FP32, SCALAR_FP32)
ROW_DOT(row_fp16, uint16_t, LOAD8_FP16, SCALAR_FP16)
ROW_DOT(row_int8, int8_t, LOAD8_INT8, SCALAR_INT8)

enum { PREFETCH_ROWS_ONE_QUERY = 8 };

/* One aligned query over `rows` rows as stored (`src`, any storage). */
__attribute__((target("avx2,fma,f16c"))) static void score_one_query(const float *q, int64_t d, const char *src,
                                                                   int storage, int64_t rows, float *scores) {
    const int64_t ahead = PREFETCH_ROWS_ONE_QUERY * d;
    for (int64_t r = 0; r < rows; r++) {
        if (storage == STORAGE_FP32)
            scores[r] = row_fp32(q, d, (const float *)src + r * d, (const float *)src + r * d + ahead);
        else if (storage == STORAGE_FP16)
            scores[r] = row_fp16(q, d, (const uint16_t *)src + r * d, (const uint16_t *)src + r * d + ahead);
        else
            scores[r] = row_int8(q, d, (const int8_t *)src + r * d, (const int8_t *)src + r * d + ahead);
    }
}

/* --- scoring: packed outer-product tiles for many queries --------------------------------------
 * Past PACKED_MIN_QUERIES the dot-product tiles' horizontal sums and 7 loads per 12 FMAs cost more
 * than packing: queries are laid out once as panels of 16 ([d][16], two vectors per dimension) and
 * each block's rows as panels of 6 ([d][6], broadcast one by one), so a 16 x 6 tile is 12
 * accumulators updated with 2 vector loads + 6 broadcasts per dimension and stored without any
 * reduction, straight into the block's [row][query] scores (the GEMM microkernel shape of BLIS). */
enum { PANEL_Q = 16, PANEL_R = 6, PACKED_MIN_QUERIES = 64, QUERY_PANELS_PER_BLOCK = 4 };

static void pack_queries(const float *q, int64_t nq, int64_t d, float *out) {
    int64_t panels = (nq + PANEL_Q - 1) / PANEL_Q;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t i = 0; i < PANEL_Q; i++) {
            int64_t row = p * PANEL_Q + i;
            for (int64_t j = 0; j < d; j++) out[(p * d + j) * PANEL_Q + i] = row < nq ? q[row * d + j] : 0.0f;
        }
}

static void pack_rows(const float *g, int64_t count, int64_t d, float *out) {
    int64_t panels = (count + PANEL_R - 1) / PANEL_R;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t r = 0; r < PANEL_R; r++) {
            int64_t row = p * PANEL_R + r;
            float *dst = out + p * d * PANEL_R + r;
            if (row < count)
                for (int64_t j = 0; j < d; j++) dst[j * PANEL_R] = g[row * d + j];
            else
                for (int64_t j = 0; j < d; j++) dst[j * PANEL_R] = 0.0f;
        }
}

__attribute__((target("avx2,fma"))) static void panel_16x6(const float *qp, const float *rp, int64_t d, float *scores,
                                                           int64_t stride) {
    __m256 c[PANEL_R][2];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < PANEL_R; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j++) {
        __m256 a0 = _mm256_load_ps(qp + j * PANEL_Q), a1 = _mm256_load_ps(qp + j * PANEL_Q + 8);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < PANEL_R; r++) {
            __m256 b = _mm256_broadcast_ss(rp + j * PANEL_R + r);
            c[r][0] = _mm256_fmadd_ps(a0, b, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(a1, b, c[r][1]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < PANEL_R; r++) {
        _mm256_storeu_ps(scores + r * stride, c[r][0]);
        _mm256_storeu_ps(scores + r * stride + 8, c[r][1]);
    }
}

/* One block: rows packed into `rp`, then every (query panel, row panel) tile; query panels in
 * groups that stay in L2 while each row panel (12 KB at d=512) stays in L1. */
__attribute__((target("avx2,fma"))) static void score_block_packed(const float *qp, int64_t panels, int64_t d,
                                                                   const float *g, int64_t rows, float *rp,
                                                                   float *scores, int64_t stride) {
    pack_rows(g, rows, d, rp);
    int64_t row_panels = (rows + PANEL_R - 1) / PANEL_R;
    for (int64_t p0 = 0; p0 < panels; p0 += QUERY_PANELS_PER_BLOCK) {
        int64_t p1 = p0 + QUERY_PANELS_PER_BLOCK < panels ? p0 + QUERY_PANELS_PER_BLOCK : panels;
        for (int64_t r = 0; r < row_panels; r++)
            for (int64_t p = p0; p < p1; p++)
                panel_16x6(qp + p * d * PANEL_Q, rp + r * d * PANEL_R, d, scores + r * PANEL_R * stride + p * PANEL_Q,
                           stride);
    }
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

#endif
