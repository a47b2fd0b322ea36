/* Shared by the operators of libcompress_ortops: y = x @ W^T where each row of W is decoded from its stored
   form into float32 just before it is used (rows.c), by a decoder of the stored form (decode.c); the
   onnxruntime glue is ops.c.

   The kernels (rows.c, decode.c, gate.c, variant.c) are built twice, for AVX2 and for AVX-512, with
   KERNEL_VARIANT naming the build: every symbol they share gets it as a suffix, so both builds live in one
   library and ops.c, built for the baseline CPU, picks the one this CPU runs (Kernels). */
#ifndef COMPRESS_ORTOPS_H
#define COMPRESS_ORTOPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef KERNEL_VARIANT
#define VARIANT_JOIN2(a, b) a##_##b
#define VARIANT_JOIN(a, b) VARIANT_JOIN2(a, b)
#define VARIANT(name) VARIANT_JOIN(name, KERNEL_VARIANT)
#define decode_lut_row VARIANT(decode_lut_row)
#define decode_half_row VARIANT(decode_half_row)
#define decode_sparse_row VARIANT(decode_sparse_row)
#define decode_grid_row VARIANT(decode_grid_row)
#define grid_row_dots VARIANT(grid_row_dots)
#define lut_row_dots VARIANT(lut_row_dots)
#define half_row_dots VARIANT(half_row_dots)
#define sparse_row_dots VARIANT(sparse_row_dots)
#define table_floats VARIANT(table_floats)
#define matmul_rows VARIANT(matmul_rows)
#define half_to_float VARIANT(half_to_float)
#define silu_gate_rows VARIANT(silu_gate_rows)
#define outlier_add_rows VARIANT(outlier_add_rows)
#define grid_int8_dots VARIANT(grid_int8_dots)
#define quantize_activations VARIANT(quantize_activations)
#endif

typedef struct Call Call;
typedef struct Scratch Scratch;

/* Writes row n of W (K floats, before its scale) into w. */
typedef void (*RowDecoder)(const Call *c, Scratch *s, int64_t n, float *w);
/* out[m] = row n of W (before its scale) . x[m] for the call's M <= 4 tokens, without storing the row. */
typedef void (*RowDots)(const Call *c, Scratch *s, int64_t n, float *out);

struct Call {
  int64_t K, N, M;          /* W is [N, K]; x is [M, K] */
  const float *x;
  float *y;
  RowDecoder decode;
  RowDots dots;
  const uint16_t *scale;    /* float16 [N] multiplying each row, or NULL */
  /* the stored weight */
  const uint8_t *codes;     /* LutMatMul: row-packed codes; SparseMatMul: the bitmap */
  int64_t row_bytes;
  const void *table;        /* LutMatMul: float16 or int8 [T, 2^bits, dim]; HalfMatMul: 16-bit floats [N, K];
                               SparseMatMul: the kept values, 16-bit floats [N, kept] */
  int table_is_int8;
  int table_is_bf16;        /* HalfMatMul: bfloat16 weights (else float16) */
  int64_t bits, dim, rows_per_table;
  const int32_t *row_tables; /* LutMatMul: each row's table (packed siblings whose tables end mid-layer), or NULL:
                               row n reads table n / rows_per_table */
  int64_t kept;             /* SparseMatMul: kept weights per row */
  /* SparseMatMul with its kept values on an integer grid (bits > 0): `table` holds their row-packed codes,
     value = (code - zero) * scale per group of `group_size` kept values */
  int64_t group_size;
  const uint16_t *group_scales; /* float16 [N, groups] */
  const uint8_t *group_zeros;   /* zero points packed at `bits` [N, ceil(groups * bits / 8)], or NULL: 2^(bits-1) */
  /* GridMatMul: W[n, k] = (v(code) - grid_zero - zero[n, g]) * scale[n, g] + offset[n, g] for k in group g,
     v(code) = code or grid_table[code]; codes row-packed at `bits` in `codes` */
  const float *grid_scales, *grid_offsets, *grid_table; /* float32 [N, groups], [N, groups] or NULL, [2^bits] or NULL */
  const uint8_t *grid_zeros; /* integer zero points packed at `bits` [N, ceil(groups * bits / 8)], or NULL */
  float grid_zero;
  /* GridMatMul with int8 activations (int8.c): the call's tokens quantized per group, each 32 inputs in the order
     their codes come out of the bytes */
  int int8_activations;
  const int8_t *xq;          /* [M, K] */
  const float *xq_scales;    /* [M, groups]: x ~ xq * scale */
  const float *xq_sums;      /* [M, groups]: scale * sum(xq) over the group */
  /* the arrays a row reads front to back, row n at streams[i] + n * stream_row_bytes[i] (NULL: none): the row
     loops prefetch them ahead of the rows they decode */
  const uint8_t *streams[4];
  int64_t stream_row_bytes[4];
  volatile int failed;      /* set by a task that could not allocate its scratch */
};

struct Scratch {
  float *w;      /* decoded rows */
  float *tab;    /* LutMatMul: the current table in float32 (then, for 2-vector float16 code books, its byte planes);
                    SparseMatMul: a row's kept values in float32 */
  int64_t table; /* its index, -1 before the first; GridMatMul: 0 once the task's input group sums are in `tab` */
};

/* LutMatMul: the table row n reads */
static inline int64_t table_index(const Call *c, int64_t n) {
  return c->row_tables ? c->row_tables[n] : n / c->rows_per_table;
}

void decode_lut_row(const Call *c, Scratch *s, int64_t n, float *w);
void decode_half_row(const Call *c, Scratch *s, int64_t n, float *w);
void lut_row_dots(const Call *c, Scratch *s, int64_t n, float *out);
void half_row_dots(const Call *c, Scratch *s, int64_t n, float *out);
void decode_sparse_row(const Call *c, Scratch *s, int64_t n, float *w);
void sparse_row_dots(const Call *c, Scratch *s, int64_t n, float *out);
void decode_grid_row(const Call *c, Scratch *s, int64_t n, float *w);
void grid_row_dots(const Call *c, Scratch *s, int64_t n, float *out);
int64_t table_floats(const Call *c);
/* int8.c: quantizes the call's M tokens into Call.xq, xq_scales, xq_sums; the block to free, or NULL (out of memory) */
void *quantize_activations(Call *c);
void grid_int8_dots(const Call *c, Scratch *s, int64_t n, float *out);

/* y = x @ W^T, the tasks spread by parallel_for (onnxruntime's intra-op threads); 0, or -1 when out of memory. */
typedef int (*ParallelFor)(void *context, void (*fn)(void *, size_t), size_t total, void *data);
int matmul_rows(Call *c, void *context, ParallelFor parallel_for);

/* SiluGate (gate.c): y[r, j] = silu(x[r, j]) * x[r, n + j] for rows [first, last) of x [rows, 2n], y [rows, n]. */
void silu_gate_rows(const float *x, float *y, int64_t n, int64_t first, int64_t last);

/* OutlierAdd (outliers.c): for tokens [first, last) of x [tokens, K], y [tokens, N] = y0 + the outliers' products;
   row n's outliers are starts[n] .. starts[n + 1] - 1 ([N + 1]), their columns 1, 2 or 4 bytes each
   (uint8, uint16, int32), their corrections float32. */
void outlier_add_rows(const float *x, const float *y0, float *y, int64_t K, int64_t N, const int64_t *starts,
                      const void *columns, int column_bytes, const float *corrections, int64_t first, int64_t last);

float half_to_float(uint16_t h);

/* One build's kernels (variant.c), for ops.c to choose from. */
typedef struct {
  RowDecoder lut_decode, half_decode, sparse_decode, grid_decode;
  RowDots lut_dots, half_dots, sparse_dots, grid_dots, grid_int8_dots;
  int (*matmul)(Call *c, void *context, ParallelFor parallel_for);
  void (*silu_gate)(const float *x, float *y, int64_t n, int64_t first, int64_t last);
  void (*outlier_add)(const float *x, const float *y0, float *y, int64_t K, int64_t N, const int64_t *starts,
                      const void *columns, int column_bytes, const float *corrections, int64_t first, int64_t last);
} Kernels;

extern const Kernels kernels_avx2, kernels_avx512;

#endif
