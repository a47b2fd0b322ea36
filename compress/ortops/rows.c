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

#ifdef __AVX512F__
/* r[j] = row j's 16 floats -> r[i] = float i of every row (16 x 16 transpose in registers). */
static inline void transpose16(__m512 r[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) { /* within each 128-bit lane: rows i and i + 1 interleaved */
    a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 4; g++) { /* b[4g + q], lane L: float 4L + q of rows 4g .. 4g + 3 */
    const __m512d lo01 = _mm512_castps_pd(a[4 * g]), hi01 = _mm512_castps_pd(a[4 * g + 1]);
    const __m512d lo23 = _mm512_castps_pd(a[4 * g + 2]), hi23 = _mm512_castps_pd(a[4 * g + 3]);
    b[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo01, lo23));
    b[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo01, lo23));
    b[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi01, hi23));
    b[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi01, hi23));
  }
  for (int q = 0; q < 4; q++) { /* float 4L + q of all 16 rows: lane L of b[q], b[4 + q], b[8 + q], b[12 + q] */
    const __m512 even01 = _mm512_shuffle_f32x4(b[q], b[4 + q], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 odd01 = _mm512_shuffle_f32x4(b[q], b[4 + q], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512 even23 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 odd23 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], _MM_SHUFFLE(3, 1, 3, 1));
    r[q] = _mm512_shuffle_f32x4(even01, even23, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + q] = _mm512_shuffle_f32x4(odd01, odd23, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + q] = _mm512_shuffle_f32x4(even01, even23, _MM_SHUFFLE(3, 1, 3, 1));
    r[12 + q] = _mm512_shuffle_f32x4(odd01, odd23, _MM_SHUFFLE(3, 1, 3, 1));
  }
}
#else
/* r[j] = row j's 8 floats -> r[i] = float i of every row (8 x 8 transpose in registers). */
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}
#endif

/* wt[k * TILE + j] = rows[j * K + k]: the tile's TILE decoded rows turned into the kernel's layout, a register block
   at a time (element by element, the stores were as slow as the multiply-adds). */
static void transpose_tile(const float *rows, int64_t K, float *wt) {
  _Static_assert(TILE == 16, "the transposes take 16 rows (AVX-512) or two blocks of 8 (AVX2)");
  int64_t k = 0;
#ifdef __AVX512F__
  for (; k + 16 <= K; k += 16) {
    __m512 r[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_ps(rows + j * K + k);
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_store_ps(wt + (k + i) * TILE, r[i]);
  }
#else
  for (; k + 8 <= K; k += 8)
    for (int h = 0; h < TILE; h += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(rows + (h + j) * K + k);
      transpose8(r);
      for (int i = 0; i < 8; i++) _mm256_store_ps(wt + (k + i) * TILE + h, r[i]);
    }
#endif
  for (; k < K; k++)
    for (int j = 0; j < TILE; j++) wt[k * TILE + j] = rows[j * K + k];
}

static void gemm_task(void *data, size_t task) {
  const Call *c = (const Call *)data;
  const int64_t K = c->K, N = c->N, M = c->M;
  const int64_t n0 = (int64_t)task * TILE, rows = N - n0 < TILE ? N - n0 : TILE;
  Scratch s;
  if (!scratch_init(&s, c, 2 * K * TILE + TOKENS * K)) return;
  float *wt = s.w, *decoded = s.w + K * TILE, *tail = decoded + K * TILE;
  float sc[TILE];
  for (int64_t j = 0; j < TILE; j++) {
    if (j < rows) {
      c->decode(c, &s, n0 + j, decoded + j * K);
      sc[j] = row_scale(c, n0 + j);
    } else {
      memset(decoded + j * K, 0, sizeof(float) * (size_t)K);
      sc[j] = 0.0f;
    }
  }
  transpose_tile(decoded, K, wt);
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
  int status;
  if (c->M <= GEMV_MAX) {
    void *quantized = NULL; /* int8 activations: the tokens quantized once for every row */
    if (c->int8_activations && !(quantized = quantize_activations(c))) return -1;
    status = parallel_for(context, gemv_task, (size_t)((c->N + GEMV_ROWS - 1) / GEMV_ROWS), c);
    free(quantized);
  } else { /* a prompt: float activations (int8 ones would save little where each row serves many tokens) */
    status = parallel_for(context, gemm_task, (size_t)((c->N + TILE - 1) / TILE), c);
  }
  return status ? status : (c->failed ? -1 : 0);
}
