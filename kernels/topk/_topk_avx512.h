/* The AVX-512 scoring paths of the top-k kernel (_topk.c includes this file once, on x86 only).
 *
 * Every function is compiled for AVX-512 on its own (target attribute), so one build runs on
 * AVX2-only CPUs too: _topk.c calls these only when cpuid says AVX-512 F/BW/DQ/VL is there and the
 * OS saves the zmm state (__builtin_cpu_supports checks both), or when a caller forces it.
 *
 * Two shapes, as on AVX2 (see _topk.c), re-tuned for 32 registers of 16 lanes:
 *  - Few queries (<= DOT_MAX_QUERIES): memory-bound. MQ queries x 4 rows of dot products, rows read
 *    as stored (fp16 / int8 widened in registers), 4 gallery streams side by side, d's tail by a
 *    masked load; 16 lane-sums per tile (reduce_add). One query reads 4 rows (8 KB) per 128 FMAs,
 *    so a core streams at its load bandwidth, far above what memory delivers.
 *  - More queries: FMA-bound. Queries packed once as panels of 16 ([d][16], one zmm per dimension);
 *    each gallery value is broadcast from the rows as stored in memory (row-major, no packing), so a
 *    tile of 2 panels x 12 rows is 24 accumulators fed by 2 vector loads + 12 broadcasts per
 *    dimension (24 FMAs: 12 cycles at 2 FMAs a cycle, loads to spare). A 12-row tile (24 KB at
 *    d=512) stays in L1 while every query panel (32 KB each, from L2) passes over it; one panel
 *    alone takes 24 rows per tile. The scores come out as [row][16 queries], so the selection
 *    compares 16 queries' scores against their 16 k-th bests in one instruction and touches a heap
 *    only when a lane wins (about k ln(N/k) times per query).
 */
#ifndef CLIPFOLD_TOPK_AVX512_H
#define CLIPFOLD_TOPK_AVX512_H

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

/* DOT_AHEAD_ROWS: how far ahead the dot tiles ask for rows (8 rows, 16 KB of fp32 at d=512: without
 * it 2-4 queries read 1M x 512 rows 1.4x slower on the Xeon; 4-32 rows measured within noise). */
enum { DOT_MAX_QUERIES = 4, DOT_ROWS = 4, DOT_AHEAD_ROWS = 8, BC_ROWS = 12, BC_PANEL = 16 };

static int have_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

/* --- few queries: dot-product tiles over the rows as stored ----------------------------------- */

#define LOAD16_FP32(p) _mm512_loadu_ps(p)
#define LOAD16_FP16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD16_INT8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define MLOAD16_FP32(m, p) _mm512_maskz_loadu_ps(m, p)
#define MLOAD16_FP16(m, p) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p))
#define MLOAD16_INT8(m, p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)))

/* MQ queries (q, rows d apart, fp32) x NR rows of type T (g, d apart) -> scores[r * stride + i];
 * the same rows `ahead` bytes further on are asked for while these are scored. */
#define DOT_TILE(NAME, T, LOAD, MLOAD, MQ, NR)                                                          \
    AVX512 static void NAME(const float *q, int64_t d, const T *g, float *scores, int64_t stride,       \
                            int64_t ahead) {                                                            \
        __m512 acc[MQ * NR];                                                                            \
        _Pragma("GCC unroll 16") for (int t = 0; t < MQ * NR; t++) acc[t] = _mm512_setzero_ps();        \
        int64_t j = 0;                                                                                  \
        for (; j + 16 <= d; j += 16) {                                                                  \
            __m512 b[NR];                                                                               \
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {                                      \
                b[r] = LOAD(g + r * d + j);                                                             \
                _mm_prefetch((const char *)(g + r * d + j) + ahead, _MM_HINT_T0);                       \
            }                                                                                           \
            _Pragma("GCC unroll 4") for (int i = 0; i < MQ; i++) {                                      \
                __m512 a = _mm512_loadu_ps(q + i * d + j);                                              \
                _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++)                                    \
                    acc[r * MQ + i] = _mm512_fmadd_ps(a, b[r], acc[r * MQ + i]);                        \
            }                                                                                           \
        }                                                                                               \
        if (j < d) {                                                                                    \
            __mmask16 m = (__mmask16)((1u << (d - j)) - 1);                                             \
            __m512 b[NR];                                                                               \
            for (int r = 0; r < NR; r++) b[r] = MLOAD(m, g + r * d + j);                                \
            for (int i = 0; i < MQ; i++) {                                                              \
                __m512 a = _mm512_maskz_loadu_ps(m, q + i * d + j);                                     \
                for (int r = 0; r < NR; r++) acc[r * MQ + i] = _mm512_fmadd_ps(a, b[r], acc[r * MQ + i]); \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; r++)                                           \
            for (int i = 0; i < MQ; i++) scores[r * stride + i] = _mm512_reduce_add_ps(acc[r * MQ + i]); \
    }

typedef void (*dot_fn)(const float *, int64_t, const void *, float *, int64_t, int64_t);


#define DOT_TILES(S, T)                                                                                 \
    DOT_TILE(dot_##S##_1x4, T, LOAD16_##S, MLOAD16_##S, 1, 4)                                           \
    DOT_TILE(dot_##S##_2x4, T, LOAD16_##S, MLOAD16_##S, 2, 4)                                           \
    DOT_TILE(dot_##S##_3x4, T, LOAD16_##S, MLOAD16_##S, 3, 4)                                           \
    DOT_TILE(dot_##S##_4x4, T, LOAD16_##S, MLOAD16_##S, 4, 4)                                           \
    DOT_TILE(dot_##S##_1x1, T, LOAD16_##S, MLOAD16_##S, 1, 1)                                           \
    DOT_TILE(dot_##S##_2x1, T, LOAD16_##S, MLOAD16_##S, 2, 1)                                           \
    DOT_TILE(dot_##S##_3x1, T, LOAD16_##S, MLOAD16_##S, 3, 1)                                           \
    DOT_TILE(dot_##S##_4x1, T, LOAD16_##S, MLOAD16_##S, 4, 1)
DOT_TILES(FP32, float)
DOT_TILES(FP16, uint16_t)
DOT_TILES(INT8, int8_t)

#define DOT_ROW(S) {(dot_fn)dot_##S##_1x4, (dot_fn)dot_##S##_2x4, (dot_fn)dot_##S##_3x4, (dot_fn)dot_##S##_4x4}, \
                   {(dot_fn)dot_##S##_1x1, (dot_fn)dot_##S##_2x1, (dot_fn)dot_##S##_3x1, (dot_fn)dot_##S##_4x1}
/* [storage][4 rows, 1 row][queries - 1] */
static const dot_fn DOT_TILES512[3][2][DOT_MAX_QUERIES] = {{DOT_ROW(FP32)}, {DOT_ROW(FP16)}, {DOT_ROW(INT8)}};

/* nq <= DOT_MAX_QUERIES queries over `rows` rows as stored (`src`) -> scores[row * nq + query]. */
AVX512 static void score_block_dot512(const float *q, int64_t nq, int64_t d, const char *src, int storage,
                                      int64_t rows, float *scores) {
    size_t item = storage == STORAGE_FP32 ? 4 : storage == STORAGE_FP16 ? 2 : 1;
    const dot_fn *four = DOT_TILES512[storage][0], *one = DOT_TILES512[storage][1];
    int64_t r = 0;
    const int64_t ahead = DOT_AHEAD_ROWS * d * (int64_t)item;
    for (; r + DOT_ROWS <= rows; r += DOT_ROWS)
        four[nq - 1](q, d, src + (size_t)(r * d) * item, scores + r * nq, nq, ahead);
    for (; r < rows; r++) one[nq - 1](q, d, src + (size_t)(r * d) * item, scores + r * nq, nq, ahead);
}

/* --- many queries: query panels x rows broadcast from memory --------------------------------- */

/* Queries in groups of 32 ([d][32]: two zmm per dimension), the last group 16 wide ([d][16]) when
 * 16 or fewer queries remain; zeros beyond nq. Group g starts at g * 32 * d floats. */
static void pack_queries_bc(const float *q, int64_t nq, int64_t d, float *out) {
    for (int64_t g0 = 0; g0 < nq; g0 += 2 * BC_PANEL) {
        int64_t width = nq - g0 > BC_PANEL ? 2 * BC_PANEL : BC_PANEL;
        float *o = out + g0 * d;
        for (int64_t j = 0; j < d; j++)
            for (int64_t i = 0; i < width; i++) o[j * width + i] = g0 + i < nq ? q[(g0 + i) * d + j] : 0.0f;
    }
}

/* NP panels of 16 queries (qp: [d][16 * NP]) x NR rows (g, d apart) -> scores[r * stride + lane].
 * One moving pointer for the queries and one for the rows (the rows' offsets r * d are loop
 * invariants), so the compiler keeps every address in a register. With `next`, the next tile
 * (NR * d contiguous floats) is asked for linearly, NR floats per dimension, while this one is
 * scored: the first panel over a tile is the one that would otherwise wait on memory. */
#define BC_TILE(NP, NR)                                                                                 \
    AVX512 static void bc_##NP##x##NR(const float *qp, const float *g, int64_t d, float *scores, int64_t stride, \
                                      const float *next) {                                              \
        __m512 c[NR][NP];                                                                               \
        _Pragma("GCC unroll 32") for (int r = 0; r < NR; r++)                                           \
            _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++) c[r][p] = _mm512_setzero_ps();         \
        for (int64_t j = 0; j < d; j++) {                                                               \
            __m512 a[NP];                                                                               \
            _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++) a[p] = _mm512_load_ps(qp + (j * NP + p) * BC_PANEL); \
            if (next) _mm_prefetch((const char *)(next + j * NR), _MM_HINT_T0);                         \
            _Pragma("GCC unroll 32") for (int r = 0; r < NR; r++) {                                     \
                __m512 b = _mm512_set1_ps(g[r * d + j]);                                                \
                _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++) c[r][p] = _mm512_fmadd_ps(a[p], b, c[r][p]); \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 32") for (int r = 0; r < NR; r++)                                           \
            _Pragma("GCC unroll 2") for (int p = 0; p < NP; p++)                                        \
                _mm512_storeu_ps(scores + r * stride + p * BC_PANEL, c[r][p]);                          \
    }
BC_TILE(2, 12)
BC_TILE(1, 12)

/* One block of fp32 rows (g: as stored, or widened) for the query groups packed by
 * pack_queries_bc. A ragged last row tile is copied into `pad` (BC_ROWS x d, zeros beyond the
 * rows), scored into `spill`, and its real rows copied out. */
AVX512 static void score_block_bc512(const float *qp, int64_t nq, int64_t d, const float *g, int64_t rows,
                                     float *pad, float *scores, int64_t stride, int ahead_ok) {
    float spill[BC_ROWS * 2 * BC_PANEL];
    for (int64_t r0 = 0; r0 < rows; r0 += BC_ROWS) {
        int64_t nr = rows - r0 < BC_ROWS ? rows - r0 : BC_ROWS;
        const float *t = g + r0 * d, *next = ahead_ok ? t + BC_ROWS * d : NULL;
        if (nr < BC_ROWS) {
            memcpy(pad, t, sizeof(float) * (size_t)(nr * d));
            memset(pad + nr * d, 0, sizeof(float) * (size_t)((BC_ROWS - nr) * d));
            t = pad;
        }
        for (int64_t g0 = 0; g0 < nq; g0 += 2 * BC_PANEL) {
            int two = nq - g0 > BC_PANEL;
            float *out = scores + r0 * stride + g0;
            float *o = nr < BC_ROWS ? spill : out;
            int64_t os = nr < BC_ROWS ? 2 * BC_PANEL : stride;
            if (two) bc_2x12(qp + g0 * d, t, d, o, os, g0 == 0 ? next : NULL);
            else bc_1x12(qp + g0 * d, t, d, o, os, g0 == 0 ? next : NULL);
            if (nr < BC_ROWS)
                for (int64_t r = 0; r < nr; r++)
                    memcpy(out + r * stride, spill + r * os, sizeof(float) * (size_t)(two ? 2 : 1) * BC_PANEL);
        }
    }
}

/* Push a block's scores ([row][stride], queries in panels of 16) into the heaps: 16 queries'
 * scores against their k-th bests (`thr`, kept equal to each heap's root) per compare. */
AVX512 static void select_block512(const float *scores, int64_t stride, int64_t nq, int64_t rows, int64_t base,
                                   float *heap_s, int64_t *heap_i, int64_t k, float *thr) {
    for (int64_t p = 0; p * BC_PANEL < nq; p++) {
        int64_t left = nq - p * BC_PANEL;
        __mmask16 valid = left >= BC_PANEL ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 t = _mm512_loadu_ps(thr + p * BC_PANEL);
        for (int64_t r = 0; r < rows; r++) {
            const float *s = scores + r * stride + p * BC_PANEL;
            /* ordered compare: NaN never passes; ties with the k-th best keep the old one */
            unsigned m = _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(s), t, _CMP_GT_OQ);
            if (!m) continue;
            while (m) {
                int lane = __builtin_ctz(m);
                m &= m - 1;
                int64_t qi = p * BC_PANEL + lane;
                float *hs = heap_s + qi * k;
                int64_t *hi = heap_i + qi * k;
                hs[0] = s[lane];
                hi[0] = base + r;
                sift_down(hs, hi, k, 0);
                thr[qi] = hs[0];
            }
            t = _mm512_loadu_ps(thr + p * BC_PANEL);
        }
    }
}

#endif
