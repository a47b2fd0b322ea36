/* GridMatMul with int8 activations (attribute accuracy_level 4, as onnxruntime's MatMulNBits names it): 2-, 3- and
   4-bit integer grids multiplied from their stored codes by integer dot products, for the few tokens of a decode
   step (a prompt takes the float path of rows.c). 3-bit codes, which cross byte boundaries, come out of each 12
   bytes in their own order (codes3, codes64: a byte permute and a multishift with AVX-512 VBMI).

   Each token's inputs are quantized once a call, symmetrically per group of the weight (scale = max |x| / 127), and
   each 32 of them put in the order the codes come out of their bytes (quantize_activations): a row's 32 codes are
   one 64-bit (2-bit) or 128-bit (4-bit) load, shifted per lane and masked into 32 unsigned bytes, and one
   maddubs per token multiplies them with the inputs (pairs of products: at most 2 x 15 x 127, no saturation). Per
   group g of row n:
     sum_k (code_k - z_g) * s_g * x_k  ~  s_g * xs_g * (sum_k code_k * xq_k - z_g * sum_k xq_k),
   the integer sums in 32-bit lanes, then one convert and multiply-add per group and token; the zero points' part
   from each group's sum(xq), eight groups a step, once per row (zero_parts). K and the group size are multiples of
   32, the last group may be shorter. The weight stays as the file stores it (onnxruntime's own int8 kernel holds a
   repacked copy with float32 block sums beside the codes). */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

static inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* The inputs of group g: group_size, or fewer for the last group (K and group_size are multiples of 32). */
static inline int64_t group_length(const Call *c, int64_t g) {
  const int64_t rest = c->K - g * c->group_size;
  return rest < c->group_size ? rest : c->group_size;
}

/* The largest |x| of a group (a multiple of 8 inputs); NaN inputs are passed over, as fmaxf does. */
static inline float largest(const float *x, int64_t length) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 most = _mm256_setzero_ps();
  for (int64_t k = 0; k < length; k += 8) most = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k), magnitude), most);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

/* 32 inputs times `inverse`, rounded to int8 (to nearest, ties to even), in the order their codes come out of the
   bytes (input t at byte (t % per) * (32 / per) + t / per); their sum added to `sum`. */
static inline void quantize32(const float *x, __m256 inverse, int per, int8_t *q, __m256i *sum) {
  __m256i v[4];
  for (int r = 0; r < 4; r++) {
    v[r] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * r), inverse));
    *sum = _mm256_add_epi32(*sum, v[r]);
  }
  /* packs interleave the 128-bit lanes: dwords (4 inputs each) 0, 4, 1, 5, 2, 6, 3, 7 hold the inputs in order */
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  __m256i bytes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (per == 2) { /* each lane's even inputs, then odd; then the lanes' evens together, their odds together */
    bytes = _mm256_shuffle_epi8(bytes, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    bytes = _mm256_permute4x64_epi64(bytes, 0xD8); /* qwords 0, 2, 1, 3 */
  } else if (per == 4) { /* each lane's inputs 4j + p by p, then p's four from each lane together */
    bytes = _mm256_shuffle_epi8(bytes, _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  _mm256_storeu_si256((__m256i *)q, bytes);
}

void *quantize_activations(Call *c) {
  const int64_t K = c->K, M = c->M, size = c->group_size, groups = (K + size - 1) / size;
  /* codes a byte (2 or 4 bits); 3-bit codes come out in their own order (codes3) */
  const int per = c->bits == 3 ? 1 : 8 / (int)c->bits;
  float *block = (float *)malloc(sizeof(float) * (size_t)(2 * M * groups) + (size_t)(M * K));
  if (!block) return NULL;
  float *scales = block, *sums = block + M * groups;
  int8_t *xq = (int8_t *)(sums + M * groups);
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < groups; g++) {
      const int64_t length = group_length(c, g);
      const float *x = c->x + m * K + g * size;
      const float most = largest(x, length);
      const __m256 inverse = _mm256_set1_ps(most > 0.0f ? 127.0f / most : 0.0f);
      __m256i total = _mm256_setzero_si256();
      for (int64_t i = 0; i < length; i += 32) quantize32(x + i, inverse, per, xq + m * K + g * size + i, &total);
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      scales[m * groups + g] = most / 127.0f;
      sums[m * groups + g] = most / 127.0f * (float)_mm_cvtsi128_si32(t);
    }
  c->xq = xq;
  c->xq_scales = scales;
  c->xq_sums = sums;
  return block;
}

/* sum over the row's groups of s_g * z_g * xs_g * sum(xq) (the zero points' part), per token */
static inline __attribute__((always_inline)) void zero_parts(const Call *c, const float *scales, const uint8_t *zeros,
                                                             int64_t groups, const int M, const int bits,
                                                             float *correction) {
  for (int m = 0; m < M; m++) {
    const float *sums = c->xq_sums + m * groups;
    float part = 0.0f;
    if (zeros) { /* eight zero points a step from the 32 bits holding them (a serial sum per group was slower); the
                    last step's lanes past the row's groups read no scale or sum (masked), so add nothing */
      const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
      const __m256i mask = _mm256_set1_epi32((1 << bits) - 1), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 base = _mm256_set1_ps(c->grid_zero);
      const int64_t row_bytes = (groups * bits + 7) / 8;
      const uint8_t *end = c->grid_zeros + c->N * row_bytes; /* the tensor's: the last row's 4 bytes may pass it */
      __m256 v = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; g += 8) {
        uint32_t word = 0;
        const uint8_t *at = zeros + g * bits / 8;
        if (at + 4 <= end)
          memcpy(&word, at, 4);
        else
          memcpy(&word, at, (size_t)(end - at));
        const __m256 z = _mm256_add_ps(base, _mm256_cvtepi32_ps(_mm256_and_si256(
                                                 _mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), mask)));
        __m256 s, x;
        if (g + 8 <= groups) {
          s = _mm256_loadu_ps(scales + g);
          x = _mm256_loadu_ps(sums + g);
        } else {
          const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(groups - g)), lanes);
          s = _mm256_maskload_ps(scales + g, inside);
          x = _mm256_maskload_ps(sums + g, inside);
        }
        v = _mm256_fmadd_ps(_mm256_mul_ps(s, z), x, v);
      }
      part = sum8(v);
    } else {
      __m256 v = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= groups; g += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(scales + g), _mm256_loadu_ps(sums + g), v);
      part = sum8(v);
      for (; g < groups; g++) part += scales[g] * sums[g];
      part *= c->grid_zero;
    }
    correction[m] = part;
  }
}

#ifdef __AVX512F__
/* 3-bit codes come out of their bytes by one byte permute and one multishift: qword j gets the 3 bytes of codes
   8j..8j+7 (bytes 3j..3j+2: 24 bits, byte aligned), and byte i of it the 8 bits from bit 3i (then masked). */
#define CODE3_SHIFTS 0x15120F0C09060300LL
static inline __m256i codes3(const uint8_t *p) {
  const __m128i bytes = _mm_maskz_loadu_epi8(0x0FFF, p); /* 12 bytes (masked: none read past them) */
  const __m256i spread = _mm256_permutexvar_epi8(
      _mm256_setr_epi8(0, 1, 2, 0, 0, 0, 0, 0, 3, 4, 5, 0, 0, 0, 0, 0, 6, 7, 8, 0, 0, 0, 0, 0, 9, 10, 11, 0, 0, 0, 0, 0),
      _mm256_castsi128_si256(bytes));
  return _mm256_and_si256(_mm256_multishift_epi64_epi8(_mm256_set1_epi64x(CODE3_SHIFTS), spread),
                          _mm256_set1_epi8(7));
}
#else
/* The 32 3-bit codes of the 12 bytes at p, a byte each in their order. Code i sits in the 16 bits of its bytes 3i/8
   and 3i/8 + 1 at bit 3i % 8: a byte shuffle puts those two bytes in a 16-bit lane per code (codes 0-7 and 16-23 in
   one register, 8-15 and 24-31 in the other, as the pack below interleaves lanes), a multiply by 2^(8 - 3i % 8)
   and a shift by 8 bring the code to bits 0-2, and one pack makes the bytes. */
static inline __m256i codes3(const uint8_t *p) {
  const __m256i bytes =
      _mm256_broadcastsi128_si256(_mm_maskload_epi32((const int *)p, _mm_setr_epi32(-1, -1, -1, 0))); /* masked */
  const __m256i first = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3,
                                         6, 7, 6, 7, 6, 7, 7, 8, 7, 8, 7, 8, 8, 9, 8, 9);
  const __m256i second = _mm256_setr_epi8(3, 4, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6,
                                          9, 10, 9, 10, 9, 10, 10, 11, 10, 11, 10, 11, 11, 12, 11, 12);
  const __m256i up = _mm256_setr_epi16(256, 32, 4, 128, 16, 2, 64, 8, 256, 32, 4, 128, 16, 2, 64, 8);
  const __m256i a = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, first), up), 8);
  const __m256i b = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, second), up), 8);
  return _mm256_and_si256(_mm256_packus_epi16(a, b), _mm256_set1_epi8(7));
}
#endif

#ifdef __AVX512F__
/* The 64 codes of two consecutive 32-code chunks at p, each chunk's bit planes in order (as the inputs are). */
static inline __m512i codes64(const uint8_t *p, const int bits) {
  if (bits == 3) { /* 24 bytes (a masked load: none read past them): qword j the bytes of codes 8j..8j+7 (codes3) */
    const __m256i bytes = _mm256_maskz_loadu_epi8(0x00FFFFFF, p);
    const __m512i spread = _mm512_permutexvar_epi8(
        _mm512_setr_epi64(0x020100, 0x050403, 0x080706, 0x0B0A09, 0x0E0D0C, 0x11100F, 0x141312, 0x171615),
        _mm512_castsi256_si512(bytes));
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(CODE3_SHIFTS), spread),
                            _mm512_set1_epi8(7));
  }
  if (bits == 4) { /* chunk 0's bytes in qwords 0-1, chunk 1's in 2-3: low nibbles, then high, per chunk */
    const __m512i v = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
                                               _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)));
    return _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(15));
  }
  const __m512i v = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1),
                                             _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p)));
  return _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6)), _mm512_set1_epi8(3));
}

/* A row's sums over its groups of s_g * xs_g * sum(code * xq), from its codes and scales, 64 weights a step: groups
   of 32 two a step (each half of the register its own group), groups of a multiple of 64 (the last group's too) in
   steps of 64, their integer sums converted and scaled once a group. 0 when the row's shape takes the 256-bit
   loop. */
static inline __attribute__((always_inline)) int code_dots_wide(const Call *c, const uint8_t *codes,
                                                                const float *scales, float *out, const int M,
                                                                const int bits) {
  const int64_t K = c->K, size = c->group_size, groups = (K + size - 1) / size, chunk_bytes = 4 * bits;
  if (size == 32 ? groups % 2 : size % 64 || group_length(c, groups - 1) % 64) return 0;
  const __m512i ones = _mm512_set1_epi16(1);
  __m512 acc[4];
  for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  if (size == 32) {
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t g = 0; g < groups; g += 2) {
      const __m512i q = codes64(codes + g * chunk_bytes, bits);
      double two; /* the two groups' scales, each over its half */
      memcpy(&two, scales + g, 8);
      const __m512 s = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(two))));
      for (int m = 0; m < M; m++) {
        const __m512i xq = _mm512_loadu_si512((const void *)(c->xq + m * K + g * 32));
        const __m512 dots = _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(q, xq), ones));
        double xs;
        memcpy(&xs, c->xq_scales + m * groups + g, 8);
        const __m512 sx = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(xs))));
        acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(dots, sx), s, acc[m]);
      }
    }
  } else if (size == 64) { /* one step a group */
    for (int64_t g = 0; g < groups; g++) {
      const __m512i q = codes64(codes + g * 2 * chunk_bytes, bits);
      for (int m = 0; m < M; m++) {
        const __m512i x = _mm512_loadu_si512((const void *)(c->xq + m * K + g * 64));
        const __m512 dots = _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(q, x), ones));
        acc[m] = _mm512_fmadd_ps(dots, _mm512_set1_ps(scales[g] * c->xq_scales[m * groups + g]), acc[m]);
      }
    }
  } else { /* two or more steps of 64 a group: the group's integer sums, then one convert and multiply-add */
    const int64_t per_group = size / 64;
    for (int64_t g = 0; g < groups; g++) {
      const uint8_t *p = codes + g * per_group * 2 * chunk_bytes;
      const int8_t *xq = c->xq + g * size;
      __m512i sums[4];
      for (int m = 0; m < M; m++) sums[m] = _mm512_setzero_si512();
      for (int64_t t = 0, steps = g + 1 < groups ? per_group : group_length(c, g) / 64; t < steps;
           t++, p += 2 * chunk_bytes, xq += 64) {
        const __m512i q = codes64(p, bits);
        for (int m = 0; m < M; m++) {
          const __m512i x = _mm512_loadu_si512((const void *)(xq + m * K));
          sums[m] = _mm512_add_epi32(sums[m], _mm512_madd_epi16(_mm512_maddubs_epi16(q, x), ones));
        }
      }
      for (int m = 0; m < M; m++)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[m]), _mm512_set1_ps(scales[g] * c->xq_scales[m * groups + g]),
                                 acc[m]);
    }
  }
  for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
  return 1;
}
#endif

/* The same, 32 weights a step, any shape. */
static inline __attribute__((always_inline)) void code_dots(const Call *c, const uint8_t *codes, const float *scales,
                                                            float *out, const int M, const int bits) {
  const int64_t K = c->K, size = c->group_size, groups = (K + size - 1) / size, chunk_bytes = 4 * bits;
  const __m256i shifts = bits == 4 ? _mm256_setr_epi64x(0, 0, 4, 4) : _mm256_setr_epi64x(0, 2, 4, 6);
  const __m256i mask = _mm256_set1_epi8((char)((1 << bits) - 1)), ones = _mm256_set1_epi16(1);
  __m256 acc[4];
  for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256i sums[4];
    for (int m = 0; m < M; m++) sums[m] = _mm256_setzero_si256();
    const int64_t first = g * size / 32, last = first + group_length(c, g) / 32;
    for (int64_t j = first; j < last; j++) {
      const uint8_t *p = codes + j * chunk_bytes;
      __m256i q;
      if (bits == 3) {
        q = codes3(p);
      } else {
        __m256i raw;
        if (bits == 4) {
          raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        } else {
          int64_t eight;
          memcpy(&eight, p, 8);
          raw = _mm256_set1_epi64x(eight);
        }
        q = _mm256_and_si256(_mm256_srlv_epi64(raw, shifts), mask);
      }
      for (int m = 0; m < M; m++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(c->xq + m * K + j * 32));
        sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones));
      }
    }
    for (int m = 0; m < M; m++)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), _mm256_set1_ps(scales[g] * c->xq_scales[m * groups + g]),
                               acc[m]);
  }
  for (int m = 0; m < M; m++) out[m] = sum8(acc[m]);
}

static inline __attribute__((always_inline)) void int8_row(const Call *c, int64_t n, float *out, const int M,
                                                           const int bits) {
  const int64_t groups = (c->K + c->group_size - 1) / c->group_size;
  const uint8_t *codes = c->codes + n * c->row_bytes;
  const float *scales = c->grid_scales + n * groups;
#ifdef __AVX512F__
  if (!code_dots_wide(c, codes, scales, out, M, bits))
#endif
    code_dots(c, codes, scales, out, M, bits);
  float correction[4];
  zero_parts(c, scales, c->grid_zeros ? c->grid_zeros + n * ((groups * bits + 7) / 8) : NULL, groups, M, bits,
             correction);
  for (int m = 0; m < M; m++) out[m] -= correction[m];
}

#define INT8_ROW_BY_BITS(M) \
  ((c)->bits == 2 ? int8_row(c, n, out, M, 2) : (c)->bits == 3 ? int8_row(c, n, out, M, 3) : int8_row(c, n, out, M, 4))

void grid_int8_dots(const Call *c, Scratch *s, int64_t n, float *out) {
  (void)s;
  switch (c->M) { /* a constant token count and width per copy: the accumulators stay in registers */
    case 1: INT8_ROW_BY_BITS(1); break;
    case 2: INT8_ROW_BY_BITS(2); break;
    case 3: INT8_ROW_BY_BITS(3); break;
    default: INT8_ROW_BY_BITS(4); break;
  }
}
