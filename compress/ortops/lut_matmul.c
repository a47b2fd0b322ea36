/* compress.LutMatMul: y = x @ W^T for a weight stored as look-up codes, run from the stored bytes.

   Inputs:  x        float32 [..., K]
            indices  uint8   [N, ceil(K / dim * bits / 8)]   row-packed codes (compress/packing.py: code i of a
                                                             row at bits [i*bits, (i+1)*bits) of the row's
                                                             little-endian bit stream)
            table    float16 or int8 [T, 2^bits, dim]        row n reads table n / rows_per_table
            scale    float16 [N], optional                   multiplies row n
   Output:  y        float32 [..., N]
   Attributes: K, N, bits (1..8), dim (weights per code: 1 for a palette, the vector length for a code book),
               rows_per_table.

   Weight [n, c*dim + j] = scale[n] * table[n / rows_per_table, code(n, c), j]. Nothing is decoded ahead of time:
   each call decodes the rows it needs into a small buffer (one row for a few tokens, a tile of 16 rows for a
   prompt) and multiplies from there, so the session holds only the codes and tables. Rows are split over
   onnxruntime's intra-op threads. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

static const OrtApi *ort;

typedef struct {
  int64_t K, N, bits, dim, rows_per_table;
} LutKernel;

typedef struct {
  const LutKernel *op;
  const float *x;
  float *y;
  int64_t M;
  const uint8_t *codes;
  int64_t row_bytes;
  const void *table;
  int table_is_int8;
  const uint16_t *scale;
  int64_t rows_per_task;
} Call;

#define TILE 16     /* rows decoded together for a prompt */
#define GEMV_MAX 4  /* at most this many tokens: row by row */

static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* Table t of the call as float32 into buf [2^bits * dim]. */
static void load_table(const Call *c, int64_t t, float *buf) {
  int64_t n = ((int64_t)1 << c->op->bits) * c->op->dim;
  if (c->table_is_int8) {
    const int8_t *src = (const int8_t *)c->table + t * n;
    for (int64_t i = 0; i < n; i++) buf[i] = (float)src[i];
  } else {
    const uint16_t *src = (const uint16_t *)c->table + t * n;
    for (int64_t i = 0; i < n; i++) buf[i] = half_to_float(src[i]);
  }
}

/* Codes 8g .. 8g+7 of a row: they fill exactly `bits` bytes from byte g*bits. Eight bytes are read from there
   (one load) unless that would pass `end`, the end of the indices. */
static inline __m256i eight_codes(const uint8_t *row, int64_t g, int bits, const uint8_t *end, __m256i shifts,
                                  __m256i mask) {
  const uint8_t *p = row + g * bits;
  uint64_t word = 0;
  if (p + 8 <= end)
    memcpy(&word, p, 8);
  else
    memcpy(&word, p, (size_t)bits);
  if (bits == 8) return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)word));
  if (bits <= 4) return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), mask);
  /* 5-7 bits: codes 0-3 and 4-7 shifted out of the 64-bit word, their low halves gathered into eight lanes */
  const __m256i wide = _mm256_set1_epi64x((long long)word);
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  __m256i first = _mm256_srlv_epi64(wide, _mm256_setr_epi64x(0, bits, 2 * bits, 3 * bits));
  __m256i second = _mm256_srlv_epi64(wide, _mm256_setr_epi64x(4 * bits, 5 * bits, 6 * bits, 7 * bits));
  first = _mm256_permutevar8x32_epi32(first, low_halves);
  second = _mm256_permutevar8x32_epi32(second, low_halves);
  return _mm256_and_si256(_mm256_blend_epi32(first, second, 0xF0), mask);
}

static inline int code_at(const uint8_t *row, int64_t i, int bits) {
  int64_t bit = i * bits;
  uint32_t word = 0;
  int64_t first = bit >> 3;
  int span = (int)(((bit & 7) + bits + 7) >> 3);
  memcpy(&word, row + first, (size_t)span);
  return (int)((word >> (bit & 7)) & ((1u << bits) - 1));
}

/* Row `n`'s K weights (before its scale) into w, from the float32 table tab. */
static void decode_row(const Call *c, int64_t n, const float *tab, float *w) {
  const int bits = (int)c->op->bits, dim = (int)c->op->dim;
  const int64_t codes = c->op->K / dim, groups = codes / 8;
  const uint8_t *row = c->codes + n * c->row_bytes, *end = c->codes + c->op->N * c->row_bytes;
  const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  if (dim == 1) {
    const __m256 lo = _mm256_loadu_ps(tab), hi = bits >= 4 ? _mm256_loadu_ps(tab + 8) : lo;
    for (int64_t g = 0; g < groups; g++) {
      __m256i idx = eight_codes(row, g, bits, end, shifts, mask);
      __m256 v;
      if (bits <= 3) {
        v = _mm256_permutevar8x32_ps(lo, idx);
      } else if (bits == 4) {
        __m256 high_half = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), high_half);
      } else {
        v = _mm256_i32gather_ps(tab, idx, 4);
      }
      _mm256_storeu_ps(w + 8 * g, v);
    }
  } else {
    int32_t idx[8];
    for (int64_t g = 0; g < groups; g++) {
      _mm256_storeu_si256((__m256i *)idx, eight_codes(row, g, bits, end, shifts, mask));
      float *out = w + 8 * g * dim;
      for (int i = 0; i < 8; i++) memcpy(out + i * dim, tab + (int64_t)idx[i] * dim, sizeof(float) * (size_t)dim);
    }
  }
  for (int64_t i = groups * 8; i < codes; i++)
    memcpy(w + i * dim, tab + (int64_t)code_at(row, i, bits) * dim, sizeof(float) * (size_t)dim);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static float dot(const float *a, const float *b, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; k < K; k++) s += a[k] * b[k];
  return s;
}

static float row_scale(const Call *c, int64_t n) { return c->scale ? half_to_float(c->scale[n]) : 1.0f; }

typedef struct {
  float *w, *tab;
  int64_t table;
} Scratch;

static int scratch_init(Scratch *s, const Call *c, int64_t floats) {
  int64_t tab = ((int64_t)1 << c->op->bits) * c->op->dim + 8; /* + 8: the 4-bit lookup reads 16 floats */
  s->w = (float *)aligned_alloc(64, (size_t)((floats * 4 + 63) / 64 * 64));
  s->tab = (float *)calloc((size_t)tab, sizeof(float));
  s->table = -1;
  return s->w != NULL && s->tab != NULL;
}

static void scratch_free(Scratch *s) {
  free(s->w);
  free(s->tab);
}

static const float *table_of(const Call *c, Scratch *s, int64_t n) {
  int64_t t = n / c->op->rows_per_table;
  if (t != s->table) {
    load_table(c, t, s->tab);
    s->table = t;
  }
  return s->tab;
}

/* A few tokens: each row decoded once, then one dot product per token. */
static void gemv_task(void *data, size_t task) {
  const Call *c = (const Call *)data;
  const int64_t K = c->op->K, N = c->op->N;
  int64_t n0 = (int64_t)task * c->rows_per_task, n1 = n0 + c->rows_per_task < N ? n0 + c->rows_per_task : N;
  Scratch s;
  if (!scratch_init(&s, c, K)) return;
  for (int64_t n = n0; n < n1; n++) {
    decode_row(c, n, table_of(c, &s, n), s.w);
    float sc = row_scale(c, n);
    for (int64_t m = 0; m < c->M; m++) c->y[m * N + n] = sc * dot(c->x + m * K, s.w, K);
  }
  scratch_free(&s);
}

/* 4 tokens x 16 rows of y from x rows (stride K) and a tile wt [K][16]. */
static void micro_4x16(const float *x, int64_t K, const float *wt, float out[4][TILE]) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  for (int64_t k = 0; k < K; k++) {
    __m256 b0 = _mm256_load_ps(wt + k * TILE), b1 = _mm256_load_ps(wt + k * TILE + 8);
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

/* A prompt: 16 rows decoded into a transposed tile, then 4 tokens at a time against it. */
static void gemm_task(void *data, size_t task) {
  const Call *c = (const Call *)data;
  const int64_t K = c->op->K, N = c->op->N, M = c->M;
  const int64_t n0 = (int64_t)task * TILE, rows = N - n0 < TILE ? N - n0 : TILE;
  Scratch s;
  if (!scratch_init(&s, c, K * (TILE + 1))) return;
  float *wt = s.w, *row = s.w + K * TILE;
  float sc[TILE];
  for (int64_t j = 0; j < TILE; j++) {
    if (j < rows) {
      decode_row(c, n0 + j, table_of(c, &s, n0 + j), row);
      for (int64_t k = 0; k < K; k++) wt[k * TILE + j] = row[k];
      sc[j] = row_scale(c, n0 + j);
    } else {
      for (int64_t k = 0; k < K; k++) wt[k * TILE + j] = 0.0f;
      sc[j] = 0.0f;
    }
  }
  float out[4][TILE];
  float *tail = NULL;
  for (int64_t m = 0; m < M; m += 4) {
    const float *x = c->x + m * K;
    int64_t mr = M - m < 4 ? M - m : 4;
    if (mr < 4) { /* the last tokens: zero-padded to 4 */
      tail = (float *)calloc((size_t)(4 * K), sizeof(float));
      if (!tail) break;
      memcpy(tail, x, sizeof(float) * (size_t)(mr * K));
      x = tail;
    }
    micro_4x16(x, K, wt, out);
    for (int64_t i = 0; i < mr; i++)
      for (int64_t j = 0; j < rows; j++) c->y[(m + i) * N + n0 + j] = sc[j] * out[i][j];
  }
  free(tail);
  scratch_free(&s);
}

#define CHECK(expr)                  \
  do {                               \
    OrtStatus *status_ = (expr);     \
    if (status_) return status_;     \
  } while (0)

/* An input's data (the C API of onnxruntime 1.21 reads inputs through the mutable accessor). */
static OrtStatus *read_only(const OrtValue *value, const void **data) {
  return ort->GetTensorMutableData((OrtValue *)value, (void **)data);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *context) {
  const LutKernel *op = (const LutKernel *)kernel;
  size_t inputs = 0;
  CHECK(ort->KernelContext_GetInputCount(context, &inputs));
  const OrtValue *x_value, *codes_value, *table_value, *scale_value = NULL;
  CHECK(ort->KernelContext_GetInput(context, 0, &x_value));
  CHECK(ort->KernelContext_GetInput(context, 1, &codes_value));
  CHECK(ort->KernelContext_GetInput(context, 2, &table_value));
  if (inputs > 3) CHECK(ort->KernelContext_GetInput(context, 3, &scale_value));

  OrtTensorTypeAndShapeInfo *info;
  CHECK(ort->GetTensorTypeAndShape(x_value, &info));
  size_t rank = 0;
  CHECK(ort->GetDimensionsCount(info, &rank));
  int64_t dims[8];
  if (rank < 1 || rank > 8) {
    ort->ReleaseTensorTypeAndShapeInfo(info);
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: x must have rank 1..8");
  }
  CHECK(ort->GetDimensions(info, dims, rank));
  ort->ReleaseTensorTypeAndShapeInfo(info);
  if (dims[rank - 1] != op->K) return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: x's last dim is not K");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < rank; i++) M *= dims[i];

  CHECK(ort->GetTensorTypeAndShape(table_value, &info));
  ONNXTensorElementDataType table_type;
  CHECK(ort->GetTensorElementType(info, &table_type));
  ort->ReleaseTensorTypeAndShapeInfo(info);
  if (table_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && table_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8)
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: the table must be float16 or int8");

  dims[rank - 1] = op->N;
  OrtValue *y_value;
  CHECK(ort->KernelContext_GetOutput(context, 0, dims, rank, &y_value));
  Call c = {op, NULL, NULL, M, NULL, (op->K / op->dim * op->bits + 7) / 8, NULL,
            table_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, NULL, 0};
  CHECK(read_only(x_value, (const void **)&c.x));
  CHECK(ort->GetTensorMutableData(y_value, (void **)&c.y));
  CHECK(read_only(codes_value, (const void **)&c.codes));
  CHECK(read_only(table_value, &c.table));
  if (scale_value) CHECK(read_only(scale_value, (const void **)&c.scale));
  if (M == 0) return NULL;
  if (M <= GEMV_MAX) {
    c.rows_per_task = 32;
    return ort->KernelContext_ParallelFor(context, gemv_task, (size_t)((op->N + 31) / 32), 0, &c);
  }
  return ort->KernelContext_ParallelFor(context, gemm_task, (size_t)((op->N + TILE - 1) / TILE), 0, &c);
}

static OrtStatus *create_kernel(const OrtCustomOp *self, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)self;
  (void)api;
  LutKernel *k = (LutKernel *)calloc(1, sizeof(LutKernel));
  if (!k) return ort->CreateStatus(ORT_FAIL, "LutMatMul: out of memory");
  const char *names[] = {"K", "N", "bits", "dim", "rows_per_table"};
  int64_t *fields[] = {&k->K, &k->N, &k->bits, &k->dim, &k->rows_per_table};
  for (int i = 0; i < 5; i++) {
    OrtStatus *status = ort->KernelInfoGetAttribute_int64(info, names[i], fields[i]);
    if (status) {
      free(k);
      return status;
    }
  }
  if (k->bits < 1 || k->bits > 8 || k->dim < 1 || k->K % k->dim || k->rows_per_table < 1) {
    free(k);
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LutMatMul: bits 1..8, dim dividing K, rows_per_table >= 1");
  }
  *out = k;
  return NULL;
}

static const char *op_name(const OrtCustomOp *self) {
  (void)self;
  return "LutMatMul";
}
static const char *op_provider(const OrtCustomOp *self) {
  (void)self;
  return "CPUExecutionProvider";
}
static ONNXTensorElementDataType input_type(const OrtCustomOp *self, size_t i) {
  (void)self;
  static const ONNXTensorElementDataType types[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16};
  return types[i];
}
static size_t input_count(const OrtCustomOp *self) {
  (void)self;
  return 4;
}
static ONNXTensorElementDataType output_type(const OrtCustomOp *self, size_t i) {
  (void)self;
  (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t output_count(const OrtCustomOp *self) {
  (void)self;
  return 1;
}
static OrtCustomOpInputOutputCharacteristic input_characteristic(const OrtCustomOp *self, size_t i) {
  (void)self;
  return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic output_characteristic(const OrtCustomOp *self, size_t i) {
  (void)self;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static void destroy_kernel(void *kernel) { free(kernel); }
static OrtMemType input_memory(const OrtCustomOp *self, size_t i) {
  (void)self;
  (void)i;
  return OrtMemTypeDefault;
}
static int no_variadic_arity(const OrtCustomOp *self) {
  (void)self;
  return 1;
}
static int no_variadic_homogeneity(const OrtCustomOp *self) {
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

static OrtCustomOp lut_matmul;

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  ort = base->GetApi(ORT_API_VERSION);
  if (!ort) return NULL;
  memset(&lut_matmul, 0, sizeof lut_matmul);
  lut_matmul.version = ORT_API_VERSION;
  lut_matmul.GetName = op_name;
  lut_matmul.GetExecutionProviderType = op_provider;
  lut_matmul.GetInputType = input_type;
  lut_matmul.GetInputTypeCount = input_count;
  lut_matmul.GetOutputType = output_type;
  lut_matmul.GetOutputTypeCount = output_count;
  lut_matmul.GetInputCharacteristic = input_characteristic;
  lut_matmul.GetOutputCharacteristic = output_characteristic;
  lut_matmul.KernelDestroy = destroy_kernel;
  lut_matmul.GetInputMemoryType = input_memory;
  lut_matmul.GetVariadicInputMinArity = no_variadic_arity;
  lut_matmul.GetVariadicInputHomogeneity = no_variadic_homogeneity;
  lut_matmul.GetVariadicOutputMinArity = no_variadic_arity;
  lut_matmul.GetVariadicOutputHomogeneity = no_variadic_homogeneity;
  lut_matmul.GetStartVersion = since_version;
  lut_matmul.GetEndVersion = until_version;
  lut_matmul.GetMayInplace = no_pairs;
  lut_matmul.ReleaseMayInplace = release_pairs;
  lut_matmul.GetAliasMap = no_pairs;
  lut_matmul.ReleaseAliasMap = release_pairs;
  lut_matmul.CreateKernelV2 = create_kernel;
  lut_matmul.KernelComputeV2 = compute;
  OrtCustomOpDomain *domain;
  CHECK(ort->CreateCustomOpDomain("compress", &domain));
  CHECK(ort->CustomOpDomain_Add(domain, &lut_matmul));
  return ort->AddCustomOpDomain(options, domain);
}
