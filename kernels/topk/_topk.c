/* Streamed inner-product top-k over a range of gallery rows: the score matrix is never stored.
 *
 * One call scores rows [0, n) of one contiguous block of storage for every query and returns each
 * query's best k (scores descending, indices offset by `index_base`). Python runs one call per
 * thread on disjoint row ranges (ctypes releases the GIL) and merges the k-lists.
 *
 * The AVX2 paths live in _topk_avx2.h, the AVX-512 ones in _topk_avx512.h (chosen at run time;
 * same blocks, heaps and log-sum-exp). Cost model of the AVX2 paths (AVX2 + FMA): a tile of MQ queries x NR rows keeps
 * MQ*NR accumulators of 8 lanes in registers (3 x 4 = 12 of the 16 ymm registers) and, per 8
 * dimensions, loads NR row vectors and MQ query vectors for MQ*NR FMAs: 7 loads for 12 FMAs, so
 * the FMA ports (2 per cycle), not the load ports, set the pace. A block of ROW_BLOCK rows stays in
 * L2 while every query block passes over it, and a query block of QUERY_BLOCK queries stays in L2
 * while the row tiles pass, so the gallery is read from memory once whatever the number of
 * queries, and queries are read from cache. Selection costs one compare per score against the
 * query's current k-th best (a min-heap root); a heap update happens about k*ln(N/k) times per
 * query on unordered data. fp16 and int8 rows are widened to fp32 one block at a time (F16C,
 * sign-extend + convert), int8 rows then scaled per row, so every storage shares the same tile.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* -DCLIPFOLD_NO_SIMD builds what a non-x86 CPU gets: the portable loops alone. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(CLIPFOLD_NO_SIMD)
#include <immintrin.h>
#define CLIPFOLD_X86 1
#include "../_exp8.h"
#endif

enum { STORAGE_FP32 = 0, STORAGE_FP16 = 1, STORAGE_INT8 = 2 };
enum { ROW_BLOCK = 96, QUERY_BLOCK = 48 };

/* malloc / aligned_alloc that never ask for 0 bytes (which may return NULL), sizes rounded up to
 * the alignment as C11 requires. */
static void *alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }
static void *alloc64(size_t bytes) { return aligned_alloc(64, bytes ? (bytes + 63) & ~(size_t)63 : 64); }

/* --- running top-k: a min-heap of size k per query ------------------------------------------ */

static void sift_down(float *s, int64_t *ix, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && s[l] < s[m]) m = l;
        if (r < k && s[r] < s[m]) m = r;
        if (m == i) return;
        float ts = s[i]; s[i] = s[m]; s[m] = ts;
        int64_t ti = ix[i]; ix[i] = ix[m]; ix[m] = ti;
        i = m;
    }
}

/* Push one block's scores (rows x nq, rows `stride` apart) into the heaps. */
static void select_block(const float *scores, int64_t stride, int64_t nq, int64_t rows, int64_t base,
                         float *heap_s, int64_t *heap_i, int64_t k) {
    for (int64_t q = 0; q < nq; q++) {
        float *hs = heap_s + q * k;
        int64_t *hi = heap_i + q * k;
        float threshold = hs[0];
        for (int64_t r = 0; r < rows; r++) {
            float s = scores[r * stride + q];
            if (s > threshold) {  /* NaN never passes; ties with the k-th best keep the old one */
                hs[0] = s;
                hi[0] = base + r;
                sift_down(hs, hi, k, 0);
                threshold = hs[0];
            }
        }
    }
}

/* Running log-sum-exp of every score per query (the softmax normalizer of a label head): per
 * block, rescale the running sum to the block's max, then add exp(score - max). Columns
 * [0, ncols) of a row-major block whose rows are `stride` apart. */
static void logsumexp_columns(const float *scores, int64_t stride, int64_t ncols, int64_t rows, float *run_max,
                              double *run_sum) {
    for (int64_t q = 0; q < ncols; q++) {
        float m = run_max[q];
        for (int64_t r = 0; r < rows; r++) m = scores[r * stride + q] > m ? scores[r * stride + q] : m;
        if (m > run_max[q]) {
            run_sum[q] *= exp((double)run_max[q] - (double)m);  /* exp(-inf) = 0 on the first block */
            run_max[q] = m;
        }
        if (m == -INFINITY) continue; /* nothing finite yet: every term is 0 */
        double sum = 0.0;
        for (int64_t r = 0; r < rows; r++) {
            float v = scores[r * stride + q];
            if (v == v) sum += expf(v - m); /* NaN scores count for nothing, as in the heaps */
        }
        run_sum[q] += sum;
    }
}

/* Heap -> descending order in place (heapsort on a min-heap yields descending). */
static void sort_heap_desc(float *s, int64_t *ix, int64_t k) {
    for (int64_t end = k - 1; end > 0; end--) {
        float ts = s[0]; s[0] = s[end]; s[end] = ts;
        int64_t ti = ix[0]; ix[0] = ix[end]; ix[end] = ti;
        sift_down(s, ix, end, 0);
    }
}

/* --- scoring: portable ---------------------------------------------------------------------- */

static void score_block_portable(const float *q, int64_t nq, int64_t d, const float *g, int64_t rows,
                                 float *scores) {
    for (int64_t i = 0; i < nq; i++)
        for (int64_t r = 0; r < rows; r++) {
            const float *a = q + i * d, *b = g + r * d;
            float acc = 0.0f;
            for (int64_t j = 0; j < d; j++) acc += a[j] * b[j];
            scores[r * nq + i] = acc;
        }
}

static void widen_portable(const void *src, int storage, int64_t count, float *dst) {
    if (storage == STORAGE_INT8) {
        const int8_t *s = (const int8_t *)src;
        for (int64_t i = 0; i < count; i++) dst[i] = (float)s[i];
    } else { /* fp16: IEEE half -> float, bit by bit */
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < count; i++) {
            uint32_t h = s[i], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
            if (exp == 0) {
                float v = ldexpf((float)man, -24);
                dst[i] = (h & 0x8000u) ? -v : v;
                continue;
            }
            if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
            else bits = sign | ((exp + 112) << 23) | (man << 13);
            memcpy(dst + i, &bits, 4);
        }
    }
}

/* --- scoring: SIMD paths (x86), each compiled for its ISA alone, chosen at run time ------------ */
#ifdef CLIPFOLD_X86
#include "_topk_avx2.h"
#include "_topk_avx512.h"
#else /* no SIMD path: the packing helpers are never called (packed is 0), only named */
static int have_avx2(void) { return 0; }
static int have_avx512(void) { return 0; }
enum { DOT_MAX_QUERIES = 0, PANEL_Q = 16, PACKED_MIN_QUERIES = 64 };
static void pack_queries(const float *q, int64_t nq, int64_t d, float *out) { (void)q, (void)nq, (void)d, (void)out; }
static void pack_queries_bc(const float *q, int64_t nq, int64_t d, float *out) { (void)q, (void)nq, (void)d, (void)out; }
#endif

/* --- entry points (ctypes) ------------------------------------------------------------------ */

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* The best scoring path this CPU runs: 2 AVX-512 (F/BW/DQ/VL), 1 AVX2 + FMA + F16C, 0 portable. */
int clipfold_topk_isa(void) { return have_avx512() ? ISA_AVX512 : have_avx2() ? ISA_AVX2 : ISA_PORTABLE; }

/* Top-k of rows [0, n) for nq queries. Outputs (nq x k) must be preallocated; rows beyond n are
 * -inf / -1 when n < k. With `out_lse` (nq), also the log-sum-exp of all n scores per query.
 * `isa`: the path to run (ISA_*), or -1 for the best this CPU has.
 * Returns 0, -1 when scratch memory could not be allocated, -2 when `isa` is beyond this CPU. */
int clipfold_topk(const float *queries, int64_t nq, int64_t d, const void *rows, int storage,
                  const float *scales, int64_t n, int64_t index_base, int64_t k, float *out_scores,
                  int64_t *out_indices, float *out_lse, int isa) {
    if (isa < 0) isa = clipfold_topk_isa();
    if (isa > clipfold_topk_isa()) return -2;
    if (nq == 0) return 0;
    int avx2 = isa == ISA_AVX2, simd = isa >= ISA_AVX2; /* simd: the AVX2 widening / log-sum-exp helpers */
    (void)simd;
    int dot512 = isa == ISA_AVX512 && nq <= DOT_MAX_QUERIES; /* rows read as stored, dot tiles */
    int bc512 = isa == ISA_AVX512 && !dot512;                    /* query panels x broadcast rows */
    int packed = (avx2 && nq >= PACKED_MIN_QUERIES) || bc512;
    int direct = (avx2 && nq == 1) || dot512; /* rows read as stored, never widened into `wide` */
    int64_t panels = (nq + PANEL_Q - 1) / PANEL_Q;
    int64_t stride = packed ? panels * PANEL_Q : nq; /* scores are [row][query], rows `stride` apart */
    size_t qbytes = (size_t)((packed ? panels * PANEL_Q : nq) * d) * sizeof(float);
    int status = -1;
    float *scores = (float *)alloc64(sizeof(float) * (size_t)(stride * ROW_BLOCK));
    float *wide = NULL, *run_max = NULL, *qcopy = NULL, *rp = NULL, *thr = NULL;
    double *run_sum = NULL;
    if (!scores) goto done;
    if (storage != STORAGE_FP32 && !direct && !(wide = (float *)alloc64(sizeof(float) * (size_t)(ROW_BLOCK * d))))
        goto done;
    if (out_lse && (!(run_max = (float *)alloc(sizeof(float) * (size_t)nq)) ||
                    !(run_sum = (double *)alloc(sizeof(double) * (size_t)nq))))
        goto done;
    if (packed) {
        /* AVX2: rows packed per block into `rp`; AVX-512: `rp` holds a zero-padded ragged row tile */
        if (!(qcopy = (float *)alloc64(qbytes)) ||
            !(rp = (float *)alloc64(sizeof(float) * (size_t)(ROW_BLOCK * d))))
            goto done;
        if (bc512) pack_queries_bc(queries, nq, d, qcopy);
        else pack_queries(queries, nq, d, qcopy);
    } else if (((uintptr_t)queries & 63) != 0) {
        /* Queries are re-read for every row tile: a 64-byte aligned copy keeps their loads from
         * straddling cache lines (numpy's large arrays start 16 bytes into a line). */
        if (!(qcopy = (float *)alloc64(qbytes)))
            goto done;
        memcpy(qcopy, queries, qbytes);
        queries = qcopy;
    }
    if (bc512) {
        if (!(thr = (float *)alloc64(sizeof(float) * (size_t)stride)))
            goto done;
        for (int64_t i = 0; i < stride; i++) thr[i] = -INFINITY;
    }
    for (int64_t i = 0; out_lse && i < nq; i++) {
        run_max[i] = -INFINITY;
        run_sum[i] = 0.0;
    }
    for (int64_t i = 0; i < nq * k; i++) {
        out_scores[i] = -INFINITY;
        out_indices[i] = -1;
    }
    size_t item = storage == STORAGE_FP32 ? 4 : storage == STORAGE_FP16 ? 2 : 1;
    for (int64_t r0 = 0; r0 < n; r0 += ROW_BLOCK) {
        int64_t count = n - r0 < ROW_BLOCK ? n - r0 : ROW_BLOCK;
        const char *src = (const char *)rows + (size_t)(r0 * d) * item;
        const float *g = (const float *)src;
        if (storage != STORAGE_FP32 && !direct) {
#ifdef CLIPFOLD_X86
            if (simd) widen_avx2(src, storage, count * d, wide);
            else
#endif
                widen_portable(src, storage, count * d, wide);
            g = wide;
        }
#ifdef CLIPFOLD_X86
        if (dot512) score_block_dot512(queries, nq, d, src, storage, count, scores);
        else if (bc512) score_block_bc512(qcopy, nq, d, g, count, rp, scores, stride, storage == STORAGE_FP32);
        else if (direct) score_one_query(queries, d, src, storage, count, scores);
        else if (packed) score_block_packed(qcopy, panels, d, g, count, rp, scores, stride);
        else if (avx2) score_block_avx2(queries, nq, d, g, count, scores);
        else
#endif
            score_block_portable(queries, nq, d, g, count, scores);
        if (storage == STORAGE_INT8)
            for (int64_t r = 0; r < count; r++)
                for (int64_t i = 0; i < nq; i++) scores[r * stride + i] *= scales[r0 + r];
#ifdef CLIPFOLD_X86
        if (bc512) select_block512(scores, stride, nq, count, index_base + r0, out_scores, out_indices, k, thr);
        else
#endif
            select_block(scores, stride, nq, count, index_base + r0, out_scores, out_indices, k);
        if (out_lse) {
#ifdef CLIPFOLD_X86
            if (simd) logsumexp_block_avx2(scores, stride, nq, count, run_max, run_sum);
            else
#endif
                logsumexp_columns(scores, stride, nq, count, run_max, run_sum);
        }
    }
    for (int64_t i = 0; i < nq; i++) sort_heap_desc(out_scores + i * k, out_indices + i * k, k);
    for (int64_t i = 0; out_lse && i < nq; i++) out_lse[i] = n ? run_max[i] + (float)log(run_sum[i]) : -INFINITY;
    status = 0;
done:
    free(scores);
    free(wide);
    free(run_max);
    free(run_sum);
    free(qcopy);
    free(rp);
    free(thr);
    return status;
}
