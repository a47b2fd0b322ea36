/* The onnxruntime operators of libcompress_ortops (domain "compress"), y = x @ W^T with W kept as stored:

   LutMatMul(x, indices, table[, scale, row_tables])
                                           W[n, c*dim + j] = scale[n] * table[t(n), code(n, c), j]
       x float32 [..., K]; indices uint8 [N, ceil(K / dim * bits / 8)], the row-packed codes of
       compress/packing.py (code i of a row at bits [i*bits, (i+1)*bits) of its little-endian bit stream);
       table float16 or int8 [T, 2^bits, dim]; scale float16 [N] (optional); t(n) = n / rows_per_table, or
       row_tables[n] (int32 [N], optional: siblings packed into one call whose tables end mid-layer).
       Attributes K, N, bits (1..8), dim (weights per code: 1 for a palette, the vector length of a code book),
       rows_per_table.
   HalfMatMul(x, weight)                   W = weight, float16 or bfloat16 [N, K] (attributes K, N)
       a 16-bit float layer (the tied output head) multiplied without a float32 copy of it.

   SparseMatMul(x, bitmap, values[, scales, zeros])
                                           W[n, column of the j-th set bit of row n] = value j of row n, zero elsewhere
       bitmap uint8 [N, ceil(K / 8)] (row-packed bits); values float16 or bfloat16 [N, kept]. Attributes K, N,
       kept (the same count every row). N:M patterns arrive as their bitmap. With attribute bits (1..8) the kept
       values are an integer grid: values uint8 [N, ceil(kept * bits / 8)] row-packed codes, scales float16
       [N, groups] per group_size (attribute) kept values, zeros packed at bits [N, ceil(groups * bits / 8)]
       (absent: 2^(bits-1)); value = (code - zero) * scale.

   y float32 [..., N]. Rows are decoded while they are used (rows.c), never ahead of time.

   GridMatMul(x, codes, scales[, offsets, table, zeros])
                                           W[n, k] = (v(code(n, k)) - zero - zeros[n, g]) * scales[n, g] + offsets[n, g],
                                           k in group g
       codes uint8 [N, ceil(K * bits / 8)] row-packed; scales, offsets float32 [N, ceil(K / group_size)]; v(q) = q,
       or table[q] with table float32 [2^bits]; zeros uint8 integer zero points packed at bits [N, ceil(groups * bits
       / 8)]. Attributes K, N, bits (1..8), group_size, zero (float, default 0): integer grids of any width (their
       zero points as stored), llama.cpp's k-quants (their scales and minima multiplied out), NormalFloat.
       accuracy_level (default 0): 4 multiplies a decode step's tokens as int8 (int8.c: 2- to 4-bit integer grids,
       K and group_size multiples of 32), as MatMulNBits' accuracy_level 4 does, from the codes as stored.

   SiluGate(x)                             y[..., j] = silu(x[..., j]) * x[..., n + j]
       x float32 [..., 2n]: a SiLU MLP's packed gate and up projections; y float32 [..., n] (gate.c).

   OutlierAdd(y0, x, counts, columns, corrections)
                                           y[..., n] = y0[..., n] + sum of corrections[j] * x[..., columns[j]]
       over row n's outliers (outliers.c): y0 float32 [..., N] the dense part's product, x float32 [..., K];
       counts [N] (outliers per row) and columns [nnz] uint8, uint16 or int32 as stored, corrections float32 [nnz]. */
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"
#include "ops.h"

static const OrtApi *ort;

typedef enum { LUT, HALF, SPARSE, GATE, GRID, OUTLIER } Op;

typedef struct {
  Op op;
  const Kernels *run;                      /* the build of the kernels this CPU runs */
  int64_t K, N, bits, dim, rows_per_table; /* bits, dim, rows_per_table: LutMatMul */
  int64_t kept, group_size;                /* SparseMatMul (bits > 0: kept values on an integer grid), GridMatMul */
  float zero;                              /* GridMatMul */
  int64_t accuracy_level;                  /* GridMatMul: 4 for int8 activations (int8.c), else 0 */
} Kernel;

#define CHECK(expr)              \
  do {                           \
    OrtStatus *status_ = (expr); \
    if (status_) return status_; \
  } while (0)

static int parallel_for(void *context, void (*fn)(void *, size_t), size_t total, void *data) {
  OrtStatus *status = ort->KernelContext_ParallelFor((const OrtKernelContext *)context, fn, total, 0, data);
  if (!status) return 0;
  ort->ReleaseStatus(status);
  return -2;
}

/* An input's data (onnxruntime 1.21's C API reads inputs through the mutable accessor). */
static OrtStatus *input_data(OrtKernelContext *context, size_t i, const void **data) {
  const OrtValue *value;
  CHECK(ort->KernelContext_GetInput(context, i, &value));
  *data = NULL;
  if (!value) return NULL;
  return ort->GetTensorMutableData((OrtValue *)value, (void **)data);
}

/* The element count of input i (0 when absent). */
static OrtStatus *element_count(OrtKernelContext *context, size_t i, size_t *count) {
  const OrtValue *value;
  OrtTensorTypeAndShapeInfo *info;
  *count = 0;
  CHECK(ort->KernelContext_GetInput(context, i, &value));
  if (!value) return NULL;
  CHECK(ort->GetTensorTypeAndShape(value, &info));
  OrtStatus *status = ort->GetTensorShapeElementCount(info, count);
  ort->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

/* Input i holds at least `needed` elements (else the kernel would read past it). */
static OrtStatus *holds(OrtKernelContext *context, size_t i, int64_t needed, const char *what) {
  size_t count;
  CHECK(element_count(context, i, &count));
  if ((int64_t)count < needed) return ort->CreateStatus(ORT_INVALID_ARGUMENT, what);
  return NULL;
}

/* Optional input i's data (NULL when the node leaves it out), which must hold at least `needed` elements. */
static OrtStatus *optional_input(OrtKernelContext *context, size_t i, int64_t needed, const char *what,
                                 const void **data) {
  size_t inputs = 0;
  *data = NULL;
  CHECK(ort->KernelContext_GetInputCount(context, &inputs));
  if (i >= inputs) return NULL;
  CHECK(input_data(context, i, data));
  if (*data) CHECK(holds(context, i, needed, what));
  return NULL;
}

static OrtStatus *element_type(OrtKernelContext *context, size_t i, ONNXTensorElementDataType *type) {
  const OrtValue *value;
  OrtTensorTypeAndShapeInfo *info;
  CHECK(ort->KernelContext_GetInput(context, i, &value));
  CHECK(ort->GetTensorTypeAndShape(value, &info));
  OrtStatus *status = ort->GetTensorElementType(info, type);
  ort->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

typedef struct {
  const Kernels *run;
  const float *x;
  float *y;
  int64_t n, rows, per_task;
} Gate;

static void gate_task(void *data, size_t task) {
  const Gate *g = (const Gate *)data;
  const int64_t first = (int64_t)task * g->per_task;
  const int64_t last = first + g->per_task < g->rows ? first + g->per_task : g->rows;
  g->run->silu_gate(g->x, g->y, g->n, first, last);
}

static OrtStatus *gate_compute(const Kernel *op, OrtKernelContext *context, int64_t *dims, size_t rank) {
  if (dims[rank - 1] % 2) return ort->CreateStatus(ORT_INVALID_ARGUMENT, "SiluGate: x's last dimension is odd");
  Gate g = {.run = op->run, .n = dims[rank - 1] / 2, .rows = 1};
  for (size_t i = 0; i + 1 < rank; i++) g.rows *= dims[i];
  CHECK(input_data(context, 0, (const void **)&g.x));
  dims[rank - 1] = g.n;
  OrtValue *y_value;
  CHECK(ort->KernelContext_GetOutput(context, 0, dims, rank, &y_value));
  CHECK(ort->GetTensorMutableData(y_value, (void **)&g.y));
  /* a token's row is a few microseconds of work: threads only for a prompt */
  g.per_task = g.rows * g.n < 65536 ? (g.rows > 0 ? g.rows : 1) : (16384 + g.n - 1) / g.n;
  const size_t tasks = (size_t)((g.rows + g.per_task - 1) / g.per_task);
  if (tasks <= 1) {
    g.run->silu_gate(g.x, g.y, g.n, 0, g.rows);
    return NULL;
  }
  if (parallel_for(context, gate_task, tasks, &g))
    return ort->CreateStatus(ORT_FAIL, "onnxruntime's ParallelFor failed");
  return NULL;
}

/* The bytes of one element of an index input (uint8, uint16 or int32), or 0 for another type. */
static OrtStatus *index_bytes(OrtKernelContext *context, size_t i, int *bytes) {
  ONNXTensorElementDataType type;
  CHECK(element_type(context, i, &type));
  *bytes = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8    ? 1
           : type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 ? 2
           : type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32  ? 4
                                                          : 0;
  return NULL;
}

static int64_t index_at(const void *data, int bytes, size_t i) {
  return bytes == 1 ? ((const uint8_t *)data)[i] : bytes == 2 ? ((const uint16_t *)data)[i] : ((const int32_t *)data)[i];
}

typedef struct {
  const Kernels *run;
  const float *x, *y0, *corrections;
  float *y;
  const int64_t *starts;
  const void *columns;
  int column_bytes;
  int64_t K, N, tokens, per_task;
} Outliers;

static void outlier_task(void *data, size_t task) {
  const Outliers *o = (const Outliers *)data;
  const int64_t first = (int64_t)task * o->per_task;
  const int64_t last = first + o->per_task < o->tokens ? first + o->per_task : o->tokens;
  o->run->outlier_add(o->x, o->y0, o->y, o->K, o->N, o->starts, o->columns, o->column_bytes, o->corrections, first,
                      last);
}

/* Checks the stored rows (every column inside x, the counts adding up to the columns) while it turns the counts into
   each row's first outlier, then adds the outliers' products to y0. */
static OrtStatus *outlier_compute(const Kernel *op, OrtKernelContext *context, int64_t *dims, size_t rank) {
  Outliers o = {.run = op->run, .N = dims[rank - 1], .tokens = 1};
  for (size_t i = 0; i + 1 < rank; i++) o.tokens *= dims[i];
  size_t x_count, counts, nnz, corrections;
  int count_bytes;
  CHECK(element_count(context, 1, &x_count));
  CHECK(element_count(context, 2, &counts));
  CHECK(element_count(context, 3, &nnz));
  CHECK(element_count(context, 4, &corrections));
  CHECK(index_bytes(context, 2, &count_bytes));
  CHECK(index_bytes(context, 3, &o.column_bytes));
  if (!count_bytes || !o.column_bytes)
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "OutlierAdd: counts and columns must be uint8, uint16 or int32");
  if ((int64_t)counts != o.N || corrections != nnz)
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "OutlierAdd: counts must hold N values, corrections one a column");
  o.K = o.tokens ? (int64_t)x_count / o.tokens : 0;
  if (o.K * o.tokens != (int64_t)x_count)
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "OutlierAdd: x and y0 hold different numbers of tokens");
  const void *count_data;
  CHECK(input_data(context, 0, (const void **)&o.y0));
  CHECK(input_data(context, 1, (const void **)&o.x));
  CHECK(input_data(context, 2, &count_data));
  CHECK(input_data(context, 3, &o.columns));
  CHECK(input_data(context, 4, (const void **)&o.corrections));
  int64_t *starts = (int64_t *)malloc(sizeof(int64_t) * (size_t)(o.N + 1));
  if (!starts) return ort->CreateStatus(ORT_FAIL, "out of memory for the outliers' rows");
  starts[0] = 0;
  int bad = 0;
  for (int64_t n = 0; n < o.N; n++) {
    const int64_t count = index_at(count_data, count_bytes, (size_t)n);
    bad |= count < 0;
    starts[n + 1] = starts[n] + count;
  }
  bad |= starts[o.N] != (int64_t)nnz;
  for (size_t j = 0; !bad && j < nnz; j++) {
    const int64_t column = index_at(o.columns, o.column_bytes, j);
    bad = column < 0 || column >= o.K;
  }
  if (bad) {
    free(starts);
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "OutlierAdd: counts do not add up to the columns, or a column "
                                                   "lies outside x");
  }
  o.starts = starts;
  OrtValue *y_value;
  OrtStatus *status = ort->KernelContext_GetOutput(context, 0, dims, rank, &y_value);
  if (!status) status = ort->GetTensorMutableData(y_value, (void **)&o.y);
  /* a token's outliers are a few thousand multiply-adds: threads only for a prompt */
  o.per_task = o.tokens * (int64_t)nnz < 65536 ? (o.tokens > 0 ? o.tokens : 1) : (16384 + (int64_t)nnz - 1) / (int64_t)nnz;
  const size_t tasks = (size_t)((o.tokens + o.per_task - 1) / o.per_task);
  if (!status && tasks <= 1)
    outlier_task(&o, 0);
  else if (!status && parallel_for(context, outlier_task, tasks, &o))
    status = ort->CreateStatus(ORT_FAIL, "onnxruntime's ParallelFor failed");
  free(starts);
  return status;
}

/* Array i of those a row of the call reads front to back, `row_bytes` a row (Call.streams: prefetched by the row
   loop; NULL: none). */
static void stream(Call *c, int i, const void *array, int64_t row_bytes) {
  c->streams[i] = (const uint8_t *)array;
  c->stream_row_bytes[i] = row_bytes;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *context) {
  const Kernel *op = (const Kernel *)kernel;
  const OrtValue *x_value;
  CHECK(ort->KernelContext_GetInput(context, 0, &x_value));
  OrtTensorTypeAndShapeInfo *info;
  CHECK(ort->GetTensorTypeAndShape(x_value, &info));
  size_t rank = 0;
  int64_t dims[8];
  OrtStatus *status = ort->GetDimensionsCount(info, &rank);
  if (!status && (rank < 1 || rank > 8)) status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "x must have rank 1..8");
  if (!status) status = ort->GetDimensions(info, dims, rank);
  ort->ReleaseTensorTypeAndShapeInfo(info);
  if (status) return status;
  if (op->op == GATE) return gate_compute(op, context, dims, rank);
  if (op->op == OUTLIER) return outlier_compute(op, context, dims, rank);
  if (dims[rank - 1] != op->K) return ort->CreateStatus(ORT_INVALID_ARGUMENT, "x's last dimension is not K");

  Call c;
  memset(&c, 0, sizeof c);
  c.K = op->K;
  c.N = op->N;
  c.M = 1;
  for (size_t i = 0; i + 1 < rank; i++) c.M *= dims[i];
  CHECK(input_data(context, 0, (const void **)&c.x));
  if (op->op == GRID) {
    const int64_t groups = (op->K + op->group_size - 1) / op->group_size;
    c.decode = op->run->grid_decode;
    c.dots = op->run->grid_dots;
    c.bits = op->bits;
    c.group_size = op->group_size;
    c.grid_zero = op->zero;
    c.row_bytes = (op->K * op->bits + 7) / 8;
    CHECK(holds(context, 1, op->N * c.row_bytes, "GridMatMul: codes smaller than N rows"));
    CHECK(holds(context, 2, op->N * groups, "GridMatMul: scales smaller than N x groups"));
    CHECK(input_data(context, 1, (const void **)&c.codes));
    CHECK(input_data(context, 2, (const void **)&c.grid_scales));
    CHECK(optional_input(context, 3, op->N * groups, "GridMatMul: offsets smaller than N x groups",
                         (const void **)&c.grid_offsets));
    CHECK(optional_input(context, 4, (int64_t)1 << op->bits, "GridMatMul: table smaller than 2^bits",
                         (const void **)&c.grid_table));
    CHECK(optional_input(context, 5, op->N * ((groups * op->bits + 7) / 8), "GridMatMul: zeros smaller than N rows",
                         (const void **)&c.grid_zeros));
    if (op->accuracy_level == 4) {
      if (c.grid_offsets || c.grid_table)
        return ort->CreateStatus(ORT_INVALID_ARGUMENT, "GridMatMul: int8 activations take an integer grid: no "
                                                       "offsets, no table");
      c.int8_activations = 1;
      c.dots = op->run->grid_int8_dots;
    }
    stream(&c, 0, c.codes, c.row_bytes);
    stream(&c, 1, c.grid_scales, 4 * groups);
    stream(&c, 2, c.grid_offsets, 4 * groups);
    stream(&c, 3, c.grid_zeros, (groups * op->bits + 7) / 8);
  } else if (op->op == LUT) {
    ONNXTensorElementDataType table_type;
    CHECK(element_type(context, 2, &table_type));
    if (table_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && table_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8)
      return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: the table must be float16 or int8");
    c.decode = op->run->lut_decode;
    c.dots = op->run->lut_dots;
    c.bits = op->bits;
    c.dim = op->dim;
    c.rows_per_table = op->rows_per_table;
    c.row_bytes = (op->K / op->dim * op->bits + 7) / 8;
    c.table_is_int8 = table_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    int64_t tables = (op->N + op->rows_per_table - 1) / op->rows_per_table;
    CHECK(optional_input(context, 4, op->N, "LutMatMul: row_tables holds fewer than N values",
                         (const void **)&c.row_tables));
    if (c.row_tables) { /* int32: onnxruntime checks the type against the operator's when the session loads */
      tables = 0;
      for (int64_t n = 0; n < op->N; n++) {
        if (c.row_tables[n] < 0) return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: a negative row table");
        if (c.row_tables[n] >= tables) tables = (int64_t)c.row_tables[n] + 1;
      }
    }
    CHECK(holds(context, 1, op->N * c.row_bytes, "LutMatMul: indices smaller than N rows of packed codes"));
    CHECK(holds(context, 2, tables * ((int64_t)1 << op->bits) * op->dim, "LutMatMul: table smaller than its shape"));
    CHECK(input_data(context, 1, (const void **)&c.codes));
    CHECK(input_data(context, 2, &c.table));
    CHECK(optional_input(context, 3, op->N, "LutMatMul: scale holds fewer than N values", (const void **)&c.scale));
    stream(&c, 0, c.codes, c.row_bytes);
    if (op->rows_per_table == 1 && !c.row_tables) /* a table per row (palettes per channel) is read with the row, as its scale */
      stream(&c, 1, c.table, ((int64_t)1 << op->bits) * op->dim * (c.table_is_int8 ? 1 : 2));
    stream(&c, 2, c.scale, 2);
  } else {
    ONNXTensorElementDataType weight_type;
    const size_t values = op->op == HALF ? 1 : 2;
    CHECK(element_type(context, values, &weight_type));
    if (op->op == SPARSE && op->bits) {
      if (weight_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        return ort->CreateStatus(ORT_INVALID_ARGUMENT, "SparseMatMul: kept values on a grid must be uint8 codes");
    } else if (weight_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
               weight_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
      return ort->CreateStatus(ORT_INVALID_ARGUMENT, "the weights must be float16 or bfloat16");
    }
    c.table_is_bf16 = weight_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    if (op->op == HALF) {
      c.decode = op->run->half_decode;
      c.dots = op->run->half_dots;
      CHECK(holds(context, 1, op->N * op->K, "HalfMatMul: weight smaller than N x K"));
    } else {
      c.decode = op->run->sparse_decode;
      c.dots = op->run->sparse_dots;
      c.kept = op->kept;
      c.row_bytes = (op->K + 7) / 8;
      CHECK(holds(context, 1, op->N * c.row_bytes, "SparseMatMul: bitmap smaller than N rows"));
      CHECK(input_data(context, 1, (const void **)&c.codes));
      if (op->bits) {
        const int64_t groups = (op->kept + op->group_size - 1) / op->group_size;
        c.bits = op->bits;
        c.group_size = op->group_size;
        CHECK(holds(context, 2, op->N * ((op->kept * op->bits + 7) / 8), "SparseMatMul: codes smaller than N rows"));
        CHECK(holds(context, 3, op->N * groups, "SparseMatMul: scales smaller than N x groups"));
        CHECK(input_data(context, 3, (const void **)&c.group_scales));
        CHECK(optional_input(context, 4, op->N * ((groups * op->bits + 7) / 8),
                             "SparseMatMul: zeros smaller than N rows", (const void **)&c.group_zeros));
      } else {
        CHECK(holds(context, 2, op->N * op->kept, "SparseMatMul: values smaller than N x kept"));
      }
    }
    CHECK(input_data(context, values, &c.table));
    if (op->op == HALF) {
      stream(&c, 0, c.table, 2 * op->K);
    } else {
      stream(&c, 0, c.codes, c.row_bytes);
      stream(&c, 1, c.table, op->bits ? (op->kept * op->bits + 7) / 8 : 2 * op->kept);
    }
  }
  dims[rank - 1] = op->N;
  OrtValue *y_value;
  CHECK(ort->KernelContext_GetOutput(context, 0, dims, rank, &y_value));
  CHECK(ort->GetTensorMutableData(y_value, (void **)&c.y));
  int failed = op->run->matmul(&c, context, parallel_for);
  if (failed == -1) return ort->CreateStatus(ORT_FAIL, "out of memory for a decoded tile");
  if (failed) return ort->CreateStatus(ORT_FAIL, "onnxruntime's ParallelFor failed");
  return NULL;
}

static OrtStatus *attribute(const OrtKernelInfo *info, const char *name, int64_t *value) {
  return ort->KernelInfoGetAttribute_int64(info, name, value);
}

static OrtStatus *create_kernel(const OrtCustomOp *self, const OrtApi *api, const OrtKernelInfo *info, void **out);

/* Each operator's description: the OrtCustomOp onnxruntime reads comes first, so the callbacks, handed that
   pointer, find the rest. */
typedef struct {
  OrtCustomOp op;
  Op kind;
  const char *name;
  size_t inputs;
  ONNXTensorElementDataType types[6]; /* UNDEFINED: several types, checked at run time */
  size_t optional_from;               /* inputs from this one on may be left out */
} Spec;

static Spec specs[] = {
    {.kind = LUT, .name = "LutMatMul", .inputs = 5, .optional_from = 3,
     .types = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32}},
    {.kind = HALF, .name = "HalfMatMul", .inputs = 2, .optional_from = 2,
     .types = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED}},
    {.kind = SPARSE, .name = "SparseMatMul", .inputs = 5, .optional_from = 3,
     .types = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8}},
    {.kind = GATE, .name = "SiluGate", .inputs = 1, .optional_from = 1, .types = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}},
    {.kind = OUTLIER, .name = "OutlierAdd", .inputs = 5, .optional_from = 5,
     .types = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}},
    {.kind = GRID, .name = "GridMatMul", .inputs = 6, .optional_from = 3,
     .types = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8}},
};

static const Spec *spec_of(const OrtCustomOp *self) { return (const Spec *)self; }
static const char *op_name(const OrtCustomOp *self) { return spec_of(self)->name; }
static ONNXTensorElementDataType input_type(const OrtCustomOp *self, size_t i) { return spec_of(self)->types[i]; }
static size_t input_count(const OrtCustomOp *self) { return spec_of(self)->inputs; }
static OrtCustomOpInputOutputCharacteristic input_kind(const OrtCustomOp *self, size_t i) {
  return i >= spec_of(self)->optional_from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static const char *provider(const OrtCustomOp *self) {
  (void)self;
  return "CPUExecutionProvider";
}
static ONNXTensorElementDataType output_type(const OrtCustomOp *self, size_t i) {
  (void)self;
  (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t one(const OrtCustomOp *self) {
  (void)self;
  return 1;
}
static OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp *self, size_t i) {
  (void)self;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static void destroy_kernel(void *kernel) { free(kernel); }
static OrtMemType default_memory(const OrtCustomOp *self, size_t i) {
  (void)self;
  (void)i;
  return OrtMemTypeDefault;
}
static int variadic_arity(const OrtCustomOp *self) {
  (void)self;
  return 1;
}
static int variadic_homogeneity(const OrtCustomOp *self) {
  (void)self;
  return 0;
}
static int since_version(const OrtCustomOp *self) {
  (void)self;
  return 1;
}
static int until_version(const OrtCustomOp *self) {
  (void)self;
  return 1 << 30;
}
static size_t no_pairs(int **inputs, int **outputs) {
  *inputs = NULL;
  *outputs = NULL;
  return 0;
}
static void release_pairs(int *inputs, int *outputs) {
  (void)inputs;
  (void)outputs;
}


/* The AVX-512 build where the CPU has what it was built for, unless COMPRESS_ORTOPS_ARCH=avx2 asks for the other
   (read when a session loads its kernels: a test or a bench can compare both in one process). */
static const Kernels *this_cpus_kernels(void) {
  const char *arch = getenv("COMPRESS_ORTOPS_ARCH");
  const int wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vbmi");
  return wide && !(arch && strcmp(arch, "avx2") == 0) ? &kernels_avx512 : &kernels_avx2;
}

static OrtStatus *create_kernel(const OrtCustomOp *self, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)api;
  Kernel *k = (Kernel *)calloc(1, sizeof(Kernel));
  if (!k) return ort->CreateStatus(ORT_FAIL, "out of memory");
  k->op = spec_of(self)->kind;
  k->run = this_cpus_kernels();
  k->dim = 1;
  k->rows_per_table = 1;
  if (k->op == GATE || k->op == OUTLIER) { /* no attributes: the shapes say everything */
    *out = k;
    return NULL;
  }
  OrtStatus *status = attribute(info, "K", &k->K);
  if (!status) status = attribute(info, "N", &k->N);
  if (!status && k->op == LUT) status = attribute(info, "bits", &k->bits);
  if (!status && k->op == LUT) status = attribute(info, "dim", &k->dim);
  if (!status && k->op == LUT) status = attribute(info, "rows_per_table", &k->rows_per_table);
  if (!status && k->op == SPARSE) status = attribute(info, "kept", &k->kept);
  if (!status && k->op == GRID) status = attribute(info, "bits", &k->bits);
  if (!status && k->op == GRID) status = attribute(info, "group_size", &k->group_size);
  if (!status && k->op == GRID) {
    OrtStatus *no_zero = ort->KernelInfoGetAttribute_float(info, "zero", &k->zero);
    if (no_zero) { /* absent: 0 */
      ort->ReleaseStatus(no_zero);
      k->zero = 0.0f;
    }
    OrtStatus *float_activations = ort->KernelInfoGetAttribute_int64(info, "accuracy_level", &k->accuracy_level);
    if (float_activations) { /* absent: 0 */
      ort->ReleaseStatus(float_activations);
      k->accuracy_level = 0;
    }
    if (k->bits < 1 || k->bits > 8 || k->group_size < 1)
      status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "GridMatMul: bits 1..8 and group_size >= 1");
    else if (k->accuracy_level != 0 && k->accuracy_level != 4)
      status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "GridMatMul: accuracy_level 0 (float activations) or 4 "
                                                       "(int8)");
    else if (k->accuracy_level == 4 && (k->bits < 2 || k->bits > 4 || k->group_size % 32 || k->K % 32))
      status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "GridMatMul: int8 activations need 2-, 3- or 4-bit codes, K "
                                                       "and group_size multiples of 32");
  }
  OrtStatus *no_bits = !status && k->op == SPARSE ? attribute(info, "bits", &k->bits) : NULL;
  if (no_bits) { /* 16-bit float values */
    ort->ReleaseStatus(no_bits);
    k->bits = 0;
  } else if (!status && k->op == SPARSE) { /* a grid: its group size too */
    status = attribute(info, "group_size", &k->group_size);
    if (!status && (k->bits < 1 || k->bits > 8 || k->group_size < 1))
      status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "SparseMatMul: bits 1..8 and group_size >= 1");
  }
  if (!status && (k->K < 1 || k->N < 1))
    status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "K and N must be positive");
  if (!status && k->op == LUT && (k->bits < 1 || k->bits > 8 || k->dim < 1 || k->K % k->dim || k->rows_per_table < 1))
    status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: bits 1..8, dim dividing K, rows_per_table >= 1");
  if (!status && k->op == SPARSE && (k->kept < 0 || k->kept > k->K))
    status = ort->CreateStatus(ORT_INVALID_ARGUMENT, "SparseMatMul: kept must be in 0..K");
  if (status) {
    free(k);
    return status;
  }
  *out = k;
  return NULL;
}

static void describe(OrtCustomOp *op) {
  memset(op, 0, sizeof *op);
  op->version = ORT_API_VERSION;
  op->GetName = op_name;
  op->GetExecutionProviderType = provider;
  op->GetInputType = input_type;
  op->GetInputTypeCount = input_count;
  op->GetOutputType = output_type;
  op->GetOutputTypeCount = one;
  op->GetInputCharacteristic = input_kind;
  op->GetOutputCharacteristic = required;
  op->KernelDestroy = destroy_kernel;
  op->CreateKernelV2 = create_kernel;
  op->KernelComputeV2 = compute;
  op->GetInputMemoryType = default_memory;
  op->GetVariadicInputMinArity = variadic_arity;
  op->GetVariadicInputHomogeneity = variadic_homogeneity;
  op->GetVariadicOutputMinArity = variadic_arity;
  op->GetVariadicOutputHomogeneity = variadic_homogeneity;
  op->GetStartVersion = since_version;
  op->GetEndVersion = until_version;
  op->GetMayInplace = no_pairs;
  op->ReleaseMayInplace = release_pairs;
  op->GetAliasMap = no_pairs;
  op->ReleaseAliasMap = release_pairs;
}

/* the library's one exported symbol (everything else is built hidden) */
__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                                  const OrtApiBase *base) {
  ort = base->GetApi(ORT_API_VERSION);
  if (!ort) return NULL;
  /* this file is built for the baseline CPU; the kernels need at least AVX2 (their AVX-512 build is chosen per
     kernel where the CPU has it: this_cpus_kernels) */
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return ort->CreateStatus(ORT_FAIL, "libcompress_ortops needs a CPU with AVX2, FMA and F16C");
  OrtCustomOpDomain *domain;
  CHECK(ort->CreateCustomOpDomain("compress", &domain));
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
    describe(&specs[i].op);
    CHECK(ort->CustomOpDomain_Add(domain, &specs[i].op));
  }
  return ort->AddCustomOpDomain(options, domain);
}
