/* y = x @ W^T from rows of W decoded on the fly (ops.h): a few tokens take each row once and a dot product per
   token; a prompt decodes 16 rows into a transposed tile and runs a register-blocked kernel over it (8 tokens x 16
   rows with AVX-512, else 4 x 16). */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

#define TILE 16        /* rows decoded together for a prompt */
#define GEMV_MAX 4     /* at most this many tokens: row by row */
#define GEMV_ROWS 32   /* rows per task of the row-by-row path */

float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* Each thread keeps its buffers from call to call (grown when a call needs more): no allocation per task. */
static _Thread_local float *kept_rows, *kept_table;
static _Thread_local int64_t kept_rows_floats, kept_table_floats;

static float *grown(float **buffer, int64_t *floats, int64_t needed) {
  if (needed > *floats) {
    free(*buffer);
    *buffer = (float *)aligned_alloc(64, (size_t)((needed * 4 + 63) / 64 * 64));
    *floats = *buffer ? needed : 0;
  }
  return *buffer;
}

static int scratch_init(Scratch *s, const Call *c, int64_t floats) {
  s->w = grown(&kept_rows, &kept_rows_floats, floats);
  s->tab = c->codes ? grown(&kept_table, &kept_table_floats, table_floats(c)) : NULL;
  s->table = -1;
  if (s->w == NULL || (c->codes && s->tab == NULL)) {
    ((Call *)c)->failed = 1;
    return 0;
  }
  if (s->tab) memset(s->tab, 0, sizeof(float) * (size_t)table_floats(c));
  return 1;
}

static void scratch_free(Scratch *s) { (void)s; }

static float row_scale(const Call *c, int64_t n) { return c->scale ? half_to_float(c->scale[n]) : 1.0f; }

#define PREFETCH_BYTES 2048 /* how far ahead of a row's bytes the row loop asks for its streams' cache lines */

/* Asks for the cache lines of row n's streams (Call.streams) PREFETCH_BYTES ahead of where row n reads them: with the
   hardware prefetchers alone, the one-token lookups waited on their codes (prompts, which spend their time in the
   tile's multiply-adds, do not gain from it). */
static inline void prefetch_row(const Call *c, int64_t n) {
  for (int i = 0; i < 4; i++) {
    if (!c->streams[i]) continue;
    const int64_t bytes = c->stream_row_bytes[i];
    const uintptr_t first = (uintptr_t)c->streams[i] + (uintptr_t)(n * bytes + PREFETCH_BYTES);
    for (uintptr_t at = first & ~(uintptr_t)63; at < first + (uintptr_t)bytes; at += 64)
      _mm_prefetch((const char *)at, _MM_HINT_T0);
  }
}

static void gemv_task(void *data, size_t task) {
  const Call *c = (const Call *)data;
  const int64_t K = c->K, N = c->N;
  const int64_t n0 = (int64_t)task * GEMV_ROWS, n1 = n0 + GEMV_ROWS < N ? n0 + GEMV_ROWS : N;
  Scratch s;
  if (!scratch_init(&s, c, K)) return;
  float out[GEMV_MAX];
  for (int64_t n = n0; n < n1; n++) {
    prefetch_row(c, n);
    c->dots(c, &s, n, out);
    const float sc = row_scale(c, n);
    for (int64_t m = 0; m < c->M; m++) c->y[m * N + n] = sc * out[m];
  }
  scratch_free(&s);
}

/* 4 tokens (x rows, stride K) x 16 rows of the tile wt [K][16] (AVX2). */
static __attribute__((unused)) void micro_4x16(const float *x, int64_t K, const float *wt, float out[4][TILE]) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  for (int64_t k = 0; k < K; k++) {
    const __m256 b0 = _mm256_load_ps(wt + k * TILE), b1 = _mm256_load_ps(wt + k * TILE + 8);
    __m256 v = _mm256_broadcast_ss(x0 + k);
    a00 = _mm256_fmadd_ps(v, b0, a00);
    a01 = _mm256_fmadd_ps(v, b1, a01);
    v = _mm256_broadcast_ss(x1 + k);
    a10 = _mm256_fmadd_ps(v, b0, a10);
    a11 = _mm256_fmadd_ps(v, b1, a11);
    v = _mm256_broadcast_ss(x2 + k);
    a20 = _mm256_fmadd_ps(v, b0, a20);
    a21 = _mm256_fmadd_ps(v, b1, a21);
    v = _mm256_broadcast_ss(x3 + k);
    a30 = _mm256_fmadd_ps(v, b0, a30);
    a31 = _mm256_fmadd_ps(v, b1, a31);
  }
  _mm256_storeu_ps(out[0], a00);
  _mm256_storeu_ps(out[0] + 8, a01);
  _mm256_storeu_ps(out[1], a10);
  _mm256_storeu_ps(out[1] + 8, a11);
  _mm256_storeu_ps(out[2], a20);
  _mm256_storeu_ps(out[2] + 8, a21);
  _mm256_storeu_ps(out[3], a30);
  _mm256_storeu_ps(out[3] + 8, a31);
}

#ifdef __AVX512F__
#define TOKENS 8 /* tokens a prompt kernel call takes */
/* 8 tokens (x rows, stride K) x the 16 rows of the tile wt [K][16]: one register of 16 rows per k, each token's
   input broadcast into its own accumulator. */
static void micro_tokens(const float *x, int64_t K, const float *wt, float out[TOKENS][TILE]) {
  __m512 acc[TOKENS];
  for (int i = 0; i < TOKENS; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const __m512 b = _mm512_load_ps(wt + k * TILE);
    for (int i = 0; i < TOKENS; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k]), b, acc[i]);
  }
  for (int i = 0; i < TOKENS; i++) _mm512_storeu_ps(out[i], acc[i]);
}
#else
#define TOKENS 4
static void micro_tokens(const float *x, int64_t K, const float *wt, float out[TOKENS][TILE]) {
  micro_4x16(x, K, wt, out);
}
#endif

static void gemm_task(void *data, size_t task) {
  const Call *c = (const Call *)data;
  const int64_t K = c->K, N = c->N, M = c->M;
  const int64_t n0 = (int64_t)task * TILE, rows = N - n0 < TILE ? N - n0 : TILE;
  Scratch s;
  if (!scratch_init(&s, c, K * (TILE + 1) + TOKENS * K)) return;
  float *wt = s.w, *row = s.w + K * TILE, *tail = row + K;
  float sc[TILE];
  for (int64_t j = 0; j < TILE; j++) {
    if (j < rows) {
      c->decode(c, &s, n0 + j, row);
      for (int64_t k = 0; k < K; k++) wt[k * TILE + j] = row[k];
      sc[j] = row_scale(c, n0 + j);
    } else {
      for (int64_t k = 0; k < K; k++) wt[k * TILE + j] = 0.0f;
      sc[j] = 0.0f;
    }
  }
  float out[TOKENS][TILE];
  for (int64_t m = 0; m < M; m += TOKENS) {
    const float *x = c->x + m * K;
    const int64_t mr = M - m < TOKENS ? M - m : TOKENS;
    if (mr < TOKENS) { /* the last tokens, zero-padded */
      memset(tail, 0, sizeof(float) * (size_t)(TOKENS * K));
      memcpy(tail, x, sizeof(float) * (size_t)(mr * K));
      x = tail;
    }
    micro_tokens(x, K, wt, out);
    for (int64_t i = 0; i < mr; i++)
      for (int64_t j = 0; j < rows; j++) c->y[(m + i) * N + n0 + j] = sc[j] * out[i][j];
  }
  scratch_free(&s);
}

int matmul_rows(Call *c, void *context, ParallelFor parallel_for) {
  c->failed = 0;
  if (c->M == 0) return 0;
  int status = c->M <= GEMV_MAX
                   ? parallel_for(context, gemv_task, (size_t)((c->N + GEMV_ROWS - 1) / GEMV_ROWS), c)
                   : parallel_for(context, gemm_task, (size_t)((c->N + TILE - 1) / TILE), c);
  return status ? status : (c->failed ? -1 : 0);
}
