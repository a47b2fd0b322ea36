/* Row decoders (ops.h): look-up codes (LutMatMul) and float16 rows (HalfMatMul), eight weights per vector step. */
#include <immintrin.h>
#include <string.h>

#include "ops.h"

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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

/* Code i of a row packed at ``bits`` (1..8, every op checks) per code: one byte, or two where it crosses one. */
static inline int code_at(const uint8_t *row, int64_t i, int bits) {
  int64_t bit = i * bits;
  unsigned word = row[bit >> 3];
  if ((bit & 7) + bits > 8) word |= (unsigned)row[(bit >> 3) + 1] << 8;
  return (int)((word >> (bit & 7)) & ((1u << bits) - 1));
}

/* The eight weights of eight codes of a palette (dim 1): from one (up to 3 bits) or two (4 bits) registers
   holding the table, else gathered. */
static inline __m256 look_up(__m256i idx, int bits, __m256 lo, __m256 hi, const float *tab) {
  if (bits <= 3) return _mm256_permutevar8x32_ps(lo, idx);
  if (bits == 4) {
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), upper);
  }
  return _mm256_i32gather_ps(tab, idx, 4);
}

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
#define WIDE_LOOKUPS
/* 32 weights at weight k, two registers of 16: stored into w (w != NULL), or multiplied into the two accumulator sets
   of the M <= 4 tokens of x. */
static inline __attribute__((always_inline)) void consume32(__m512 first, __m512 second, int64_t k, float *w,
                                                            const float *x, int64_t M, int64_t K, __m512 acc[2][4]) {
  if (w) {
    _mm512_storeu_ps(w + k, first);
    _mm512_storeu_ps(w + k + 16, second);
  } else {
    for (int64_t m = 0; m < M; m++) {
      acc[0][m] = _mm512_fmadd_ps(first, _mm512_loadu_ps(x + m * K + k), acc[0][m]);
      acc[1][m] = _mm512_fmadd_ps(second, _mm512_loadu_ps(x + m * K + k + 16), acc[1][m]);
    }
  }
}
/* The token sums of the two accumulator sets, added to sums[0 .. M). */
static inline __attribute__((always_inline)) void add_sums(__m512 acc[2][4], int64_t M, float *sums) {
  for (int64_t m = 0; m < M; m++) sums[m] += _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]));
}
/* 2-, 3- or 4-bit codes, 32 codes (8, 12 or 16 bytes) a step, two runs of 16: each run's 64-bit word (its 4, 6 or 8
   bytes and what follows) broadcast to every lane by the load, cut by one multishift into the low byte of each 32-bit
   lane at its code's offset, and looked up in `tab` by one permute, which reads an index's low 4 bits: below 4 bits,
   the bits above the code (the next code's) land in copies of the table, `tab`'s first 2^bits floats repeated over
   the register (`bits` a constant in each inlined copy). With `scales` (GridMatMul: groups of `size`, a multiple of
   16) each 16 weights also take their group's scale and offset in one multiply-add; a palette passes NULL. Stops
   where an 8-byte load would pass `end`. Returns the 8-code groups done. (Splitting 4-bit codes into even and odd
   nibbles, with the inputs permuted to match, was slower: one widening per 16 codes besides the permute.) */
static inline __attribute__((always_inline)) int64_t packed_runs(const uint8_t *row, const uint8_t *end, int bits,
                                                                 int64_t codes, const float *tab, int64_t size,
                                                                 const float *scales, const float *offsets, float *w,
                                                                 const float *x, int64_t M, int64_t K, float *sums) {
  int64_t steps = codes / 32;
  while (steps > 0 && row + 4 * bits * (steps - 1) + 2 * bits + 8 > end) steps--;
  int8_t field_bytes[64];
  for (int b = 0; b < 64; b++) field_bytes[b] = (int8_t)(bits * (2 * (b / 8) + (b % 8) / 4)); /* lane b/4's code */
  const __m512i fields = _mm512_loadu_si512(field_bytes);
  const __m512 table = bits == 2   ? _mm512_broadcast_f32x4(_mm_loadu_ps(tab))
                       : bits == 3 ? _mm512_broadcast_f32x8(_mm256_loadu_ps(tab))
                                   : _mm512_loadu_ps(tab);
  __m512 acc[2][4] = {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()},
                      {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
  int64_t g = 0, left = size; /* the group of the next 16 weights, its weights from them on */
  for (int64_t i = 0; i < steps; i++) {
    int64_t run[2];
    memcpy(run, row + 4 * bits * i, 8);
    memcpy(run + 1, row + 4 * bits * i + 2 * bits, 8);
    __m512 first = _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(fields, _mm512_set1_epi64(run[0])), table);
    __m512 second = _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(fields, _mm512_set1_epi64(run[1])), table);
    if (scales) {
      first = _mm512_fmadd_ps(first, _mm512_set1_ps(scales[g]), _mm512_set1_ps(offsets ? offsets[g] : 0.0f));
      if ((left -= 16) == 0) {
        g++;
        left = size;
      }
      second = _mm512_fmadd_ps(second, _mm512_set1_ps(scales[g]), _mm512_set1_ps(offsets ? offsets[g] : 0.0f));
      if ((left -= 16) == 0) {
        g++;
        left = size;
      }
    }
    consume32(first, second, 32 * i, w, x, M, K, acc);
  }
  if (!w) add_sums(acc, M, sums);
  return 4 * steps;
}

/* Palettes (dim 1) and code books of vectors of 2, 4 or 8, 16 weights (16 / dim codes) a step: one multishift puts
   each lane's code at bit log2(dim) of the lane's low byte (a lane reads its code's bits from one bit below it), one
   bitwise select keeps the code's bits and sets the lane's place in its vector below them, and each lane's float is
   found in the table (up to 32 floats) by one permute over one or two registers (permutexvar reads an index's low 4
   bits). Returns the 8-code groups done. */
static inline __attribute__((always_inline)) int64_t vector_sixteen(const uint8_t *row, const uint8_t *end, int bits,
                                                                    int dim, int64_t groups, const float *tab,
                                                                    float *w, const float *x, int64_t M, int64_t K,
                                                                    float *sums) {
  const int per_step = 16 / dim, shift = dim == 1 ? 0 : dim == 2 ? 1 : dim == 4 ? 2 : 3;
  const int64_t steps = groups * 8 / per_step, floats = ((int64_t)1 << bits) * dim;
  int8_t field_bytes[64]; /* byte 4j: one bit below lane j's code, modulo 64 (the other bytes are not read) */
  for (int b = 0; b < 64; b++) field_bytes[b] = (int8_t)((bits * ((b / 4) >> shift) - shift) & 63);
  const __m512i fields = _mm512_loadu_si512(field_bytes);
  const __m512i keep = _mm512_set1_epi32(((1 << bits) - 1) << shift);
  const __m512i component = _mm512_and_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(dim - 1));
  const __m512 first = _mm512_loadu_ps(tab), second = floats > 16 ? _mm512_loadu_ps(tab + 16) : first;
  __m512 acc[2][4] = {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()},
                      {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
  for (int64_t i = 0; i < steps; i += 2) { /* two steps at a time: two sets of accumulators */
    for (int half = 0; half < 2 && i + half < steps; half++) {
      const int64_t step = i + half, bit = step * per_step * bits;
      const uint8_t *p = row + (bit >> 3);
      uint64_t word = 0;
      if (p + 8 <= end)
        memcpy(&word, p, 8);
      else
        memcpy(&word, p, (size_t)(end - p < 8 ? end - p : 8));
      word >>= bit & 7;
      const __m512i bytes = _mm512_multishift_epi64_epi8(fields, _mm512_set1_epi64((long long)word));
      const __m512i index = _mm512_ternarylogic_epi32(bytes, keep, component, 0xEA); /* bytes & keep | component */
      const __m512 v = floats <= 16 ? _mm512_permutexvar_ps(index, first)
                                    : _mm512_permutex2var_ps(first, index, second);
      if (w) {
        _mm512_storeu_ps(w + 16 * step, v);
      } else {
        for (int64_t m = 0; m < M; m++)
          acc[half][m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * K + 16 * step), acc[half][m]);
      }
    }
  }
  if (!w) add_sums(acc, M, sums);
  return steps * per_step / 8;
}

/* 2-vector code books of 64 float16 entries (GPTVQ's 3-bit: 6-bit codes), 64 codes (128 weights) a step: the
   table's 4 byte planes (pair_planes_apply, 64 bytes each) looked up by one byte permute each (vpermb reads an
   index's low 6 bits, so the codes need no mask), the bytes woven back into float16 pairs by unpacks within 128-bit
   lanes and widened; no gathers. The 48 bytes of codes are spread into 64-bit lanes by one byte permute, in the order
   that leaves each woven register's halves 16 consecutive weights, and cut by one multishift. A last partial step
   takes what remains in multiples of 16 codes. Returns the 8-code groups done. (256-entry tables the same way, with
   two 128-byte permutes a plane, measured slower than byte_vectors' loads.) */
static inline __attribute__((always_inline)) int64_t pair_planes64(const uint8_t *row, const uint8_t *end,
                                                                   int64_t codes, const uint8_t *planes, float *w,
                                                                   const float *x, int64_t M, int64_t K,
                                                                   float *sums) {
  /* After the weave, 128-bit lane L of pairs[q] holds the pairs of byte positions 16L + 4q .. + 3, so byte position
     p = 16L + 4q + j must hold code 16q + 4L + j. Four consecutive 6-bit codes fill 3 bytes: 64-bit lane l gathers
     the two runs of 4 codes its 8 byte positions need (codes 16q + 4L .. + 3 for q = 2 (l % 2) and q + 1, L = l / 2,
     from byte 12q + 3L on), code j of the lane at bit 6j. */
  int8_t spread_bytes[64], field_bytes[64];
  for (int p = 0; p < 64; p++) {
    const int l = p / 8, b = p % 8, q = 2 * (l % 2) + (b >= 3);
    spread_bytes[p] = (int8_t)(b < 6 ? 12 * q + 3 * (l / 2) + b % 3 : 0);
    field_bytes[p] = (int8_t)(6 * b);
  }
  const __m512i spread = _mm512_loadu_si512(spread_bytes), fields = _mm512_loadu_si512(field_bytes);
  const __m512i table[4] = {_mm512_loadu_si512(planes), _mm512_loadu_si512(planes + 64),
                            _mm512_loadu_si512(planes + 128), _mm512_loadu_si512(planes + 192)};
  __m512 acc[2][4] = {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()},
                      {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
  int64_t done = 0;
  while (codes - done >= 16) {
    const int64_t n = codes - done >= 64 ? 64 : (codes - done) / 16 * 16;
    const uint8_t *at = row + done * 6 / 8;
    const int64_t bytes = n * 6 / 8, left = end - at, load = left < bytes ? left : bytes; /* at most 48 */
    const __m512i code = _mm512_multishift_epi64_epi8(
        fields, _mm512_permutexvar_epi8(spread, _mm512_maskz_loadu_epi8((1ULL << load) - 1, at)));
    __m512i byte[4];
    for (int p = 0; p < 4; p++) byte[p] = _mm512_permutexvar_epi8(code, table[p]);
    const __m512i first0 = _mm512_unpacklo_epi8(byte[0], byte[1]), next0 = _mm512_unpackhi_epi8(byte[0], byte[1]);
    const __m512i first1 = _mm512_unpacklo_epi8(byte[2], byte[3]), next1 = _mm512_unpackhi_epi8(byte[2], byte[3]);
    const __m512i pairs[4] = {_mm512_unpacklo_epi16(first0, first1), _mm512_unpackhi_epi16(first0, first1),
                              _mm512_unpacklo_epi16(next0, next1), _mm512_unpackhi_epi16(next0, next1)};
    const int64_t k = 2 * done;
    for (int q = 0; q < n / 16; q++) { /* pairs[q]: weights 32q .. 32q + 31 of the step */
      const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(pairs[q]));
      const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(pairs[q], 1));
      consume32(lo, hi, k + 32 * q, w, x, M, K, acc);
    }
    done += n;
  }
  if (!w) add_sums(acc, M, sums);
  return done / 8;
}

/* 256-entry code books of 2-vectors (GPTVQ's 4-bit pairs: a byte a code), 16 codes a step: the bytes widened to
   32-bit indices and each 8 codes' vectors fetched by one 64-bit gather from the float32 table (faster than
   byte_vectors' loads here; the 256-entry table is too large for the permutes of the other loops). Returns the
   8-code groups done. */
static inline __attribute__((always_inline)) int64_t byte_pairs_gathered(const uint8_t *row, int64_t groups,
                                                                         const float *tab, float *w, const float *x,
                                                                         int64_t M, int64_t K, float *sums) {
  const int64_t steps = groups / 2;
  const long long *pairs = (const long long *)tab;
  __m512 acc[2][4] = {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()},
                      {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
  for (int64_t i = 0; i < steps; i++) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16 * i)));
    const __m512 lo = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_castsi512_si256(idx), pairs, 8));
    const __m512 hi = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_extracti64x4_epi64(idx, 1), pairs, 8));
    consume32(lo, hi, 32 * i, w, x, M, K, acc);
  }
  if (!w) add_sums(acc, M, sums);
  return 2 * steps;
}

/* The 4 byte planes of a 64-entry table of float16 2-vectors (`src`: 256 bytes, entry e's part t's byte b at 4e + 2t
   + b, which goes to plane 2t + b at e): each plane two 128-byte permutes, one per half of the entries. */
static void planes64(const uint16_t *src, uint8_t *planes) {
  const __m512i a = _mm512_loadu_si512(src), b = _mm512_loadu_si512(src + 32), c = _mm512_loadu_si512(src + 64),
                d = _mm512_loadu_si512(src + 96);
  int8_t index[64];
  for (int p = 0; p < 4; p++) {
    for (int e = 0; e < 64; e++) index[e] = (int8_t)((4 * e + p) & 127);
    const __m512i at = _mm512_loadu_si512(index);
    const __m512i first = _mm512_permutex2var_epi8(a, at, b), second = _mm512_permutex2var_epi8(c, at, d);
    _mm512_storeu_si512(planes + 64 * p, _mm512_mask_blend_epi8(0xFFFFFFFF00000000ULL, first, second));
  }
}

#endif

/* 2-vector code books of 16 or 64 entries (GPTVQ's 2- and 3-bit): looked up in byte planes of float16 entries
   (AVX2: pair_shuffles; AVX-512 VBMI, 64 entries only: pair_planes64, as vector_sixteen's permutes take 16), from the
   table split into byte planes after its float32 copy in the scratch (int8 entries as float16 first: exact). */
static inline int pair_planes_apply(const Call *c) {
#ifdef WIDE_LOOKUPS
  return c->dim == 2 && c->bits == 6;
#else
  return c->dim == 2 && (c->bits == 4 || c->bits == 6);
#endif
}

/* Table t of the call in float32 (cached in the scratch while the rows share it). */
static const float *table_of(const Call *c, Scratch *s, int64_t n) {
  const int64_t t = table_index(c, n), count = ((int64_t)1 << c->bits) * c->dim;
  if (t != s->table) {
    int64_t i = 0;
    const uint16_t *src = (const uint16_t *)c->table + t * count;
    uint16_t widened[128]; /* an int8 table of pairs as float16, for the byte planes (at most 64 entries) */
    if (c->table_is_int8) {
      const int8_t *bytes = (const int8_t *)c->table + t * count;
      for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(s->tab + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + i)))));
      for (; i < count; i++) s->tab[i] = (float)bytes[i];
      if (pair_planes_apply(c)) {
        for (i = 0; i < count; i += 8)
          _mm_storeu_si128((__m128i *)(widened + i), _mm256_cvtps_ph(_mm256_loadu_ps(s->tab + i), 0));
        src = widened;
      }
    } else {
      for (; i + 8 <= count; i += 8) _mm256_storeu_ps(s->tab + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
      for (; i < count; i++) s->tab[i] = half_to_float(src[i]);
    }
    if (pair_planes_apply(c)) { /* plane 2 * part + byte holds that byte of every entry's part */
      uint8_t *planes = (uint8_t *)(s->tab + count + 16);
      const int64_t entries = (int64_t)1 << c->bits;
#ifdef WIDE_LOOKUPS
      if (entries == 64)
        planes64(src, planes);
      else
#endif
        for (int64_t e = 0; e < entries; e++)
          for (int part = 0; part < 2; part++) {
            planes[(2 * part) * entries + e] = (uint8_t)(src[2 * e + part] & 0xFF);
            planes[(2 * part + 1) * entries + e] = (uint8_t)(src[2 * e + part] >> 8);
          }
    }
    s->table = t;
  }
  return s->tab;
}

int64_t table_floats(const Call *c) {
  if (c->kept) return c->kept + 16; /* SparseMatMul: a row's kept values */
  if (c->grid_scales) { /* GridMatMul: a row's group offsets, then the inputs' group sums (group_sums) */
    const int64_t groups = (c->K + c->group_size - 1) / c->group_size;
    return groups + 16 + (c->M <= 4 ? c->M * groups : 0);
  }
  /* the lookups read whole 16-float registers; then the byte planes (4 bytes an entry) */
  return ((int64_t)1 << c->bits) * (c->dim + (pair_planes_apply(c) ? 1 : 0)) + 16;
}

/* Eight weights v starting at weight k: stored into w, or multiplied into the M token accumulators `into`
   (two sets, `acc` and `acc2`, alternate so that consecutive multiply-adds do not wait for each other). */
#define CONSUME_INTO(v, k, into)                                                                 \
  do {                                                                                           \
    if (w) {                                                                                     \
      _mm256_storeu_ps(w + (k), (v));                                                            \
    } else {                                                                                     \
      for (int64_t m_ = 0; m_ < M; m_++)                                                         \
        into[m_] = _mm256_fmadd_ps((v), _mm256_loadu_ps(x + m_ * K + (k)), into[m_]);            \
    }                                                                                            \
  } while (0)
#define CONSUME(v, k) CONSUME_INTO(v, k, acc)
#define CONSUME2(v, k) CONSUME_INTO(v, k, acc2)

/* 4-bit palettes on AVX2, 16 codes a step: 8 bytes, their nibbles interleaved back into 16 byte indices, each looked
   up by byte shuffles in row n's stored table (float16: its low and high bytes, two shuffles; int8: one), no float
   permutes or blends. Returns the 8-code groups done. */
static inline __attribute__((always_inline)) int64_t palette_nibbles(const Call *c, int64_t n, const uint8_t *row,
                                                                     int64_t codes, float *w, const float *x,
                                                                     int64_t M, int64_t K, __m256 *acc, __m256 *acc2) {
  const int64_t count = 16, steps = codes / 16;
  const __m128i low4 = _mm_set1_epi8(15);
  __m128i low_bytes, high_bytes = _mm_setzero_si128();
  if (c->table_is_int8) {
    low_bytes = _mm_loadu_si128((const __m128i *)((const int8_t *)c->table + table_index(c, n) * count));
  } else {
    const uint16_t *half = (const uint16_t *)c->table + table_index(c, n) * count;
    const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i first = _mm_loadu_si128((const __m128i *)half);
    const __m128i second = _mm_loadu_si128((const __m128i *)(half + 8));
    low_bytes = _mm_unpacklo_epi64(_mm_shuffle_epi8(first, even), _mm_shuffle_epi8(second, even));
    high_bytes = _mm_unpacklo_epi64(_mm_shuffle_epi8(first, odd), _mm_shuffle_epi8(second, odd));
  }
  for (int64_t i = 0; i < steps; i++) {
    const __m128i packed = _mm_loadl_epi64((const __m128i *)(row + 8 * i));
    const __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(packed, low4), _mm_and_si128(_mm_srli_epi16(packed, 4), low4));
    const __m128i lows = _mm_shuffle_epi8(low_bytes, idx);
    __m256 first, second;
    if (c->table_is_int8) {
      first = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lows));
      second = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lows, 8)));
    } else {
      const __m128i highs = _mm_shuffle_epi8(high_bytes, idx);
      first = _mm256_cvtph_ps(_mm_unpacklo_epi8(lows, highs));
      second = _mm256_cvtph_ps(_mm_unpackhi_epi8(lows, highs));
    }
    CONSUME(first, 16 * i);
    CONSUME2(second, 16 * i + 8);
  }
  return 2 * steps;
}

/* 2-vector code books (pair_planes_apply), 32 codes (64 weights) a step: the codes as 32 bytes, 16 in each 128-bit
   lane (4-bit: the nibbles interleaved; 6-bit: each 3 bytes spread over a 32-bit lane, its 4 codes masked into its 4
   bytes), each of the table's 4 byte planes (2 parts x 2 bytes of a float16) looked up by byte shuffles, one per 16
   entries (64 entries: the 4 sub-tables' bytes chosen by the code's bits 4 and 5 with two byte blends), the bytes
   woven back into float16 pairs and widened. No gathers. Returns the 8-code groups done. */
static inline __attribute__((always_inline)) int64_t pair_shuffles(const uint8_t *row, const uint8_t *end, int bits,
                                                                   int64_t codes, const uint8_t *planes, float *w,
                                                                   const float *x, int64_t M, int64_t K, __m256 *acc,
                                                                   __m256 *acc2) {
  const int64_t entries = (int64_t)1 << bits, subtables = entries / 16, steps = codes / 32;
  __m256i table[4][4]; /* [plane][sub-table], the 16 bytes in both lanes */
  for (int p = 0; p < 4; p++)
    for (int64_t j = 0; j < subtables; j++)
      table[p][j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(planes + p * entries + 16 * j)));
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, 0, 1, 2, -1, 3, 4, 5,
                                          -1, 6, 7, 8, -1, 9, 10, 11, -1);
  for (int64_t i = 0; i < steps; i++) {
    __m256i code;
    if (bits == 4) { /* 16 bytes: codes 0-15 into the low lane, 16-31 into the high one */
      const __m128i packed = _mm_loadu_si128((const __m128i *)(row + 16 * i));
      const __m128i lo = _mm_and_si128(packed, _mm256_castsi256_si128(low4));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm256_castsi256_si128(low4));
      code = _mm256_setr_m128i(_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi));
    } else { /* 6 bits: 24 bytes, 12 a lane */
      const uint8_t *at = row + 24 * i;
      uint8_t last[32]; /* the row's last step, where 28 bytes would pass `end`; zeroed only then */
      if (at + 28 > end) {
        memset(last, 0, sizeof last);
        at = memcpy(last, at, 24);
      }
      const __m256i lanes = _mm256_shuffle_epi8(
          _mm256_setr_m128i(_mm_loadu_si128((const __m128i *)at), _mm_loadu_si128((const __m128i *)(at + 12))),
          spread); /* codes 4l .. 4l+3 at bits 0, 6, 12, 18 of 32-bit lane l */
      code = _mm256_or_si256(
          _mm256_or_si256(_mm256_and_si256(lanes, _mm256_set1_epi32(0x3F)),
                          _mm256_and_si256(_mm256_slli_epi32(lanes, 2), _mm256_set1_epi32(0x3F00))),
          _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(lanes, 4), _mm256_set1_epi32(0x3F0000)),
                          _mm256_and_si256(_mm256_slli_epi32(lanes, 6), _mm256_set1_epi32(0x3F000000))));
    }
    __m256i byte[4];
    if (subtables == 1) {
      for (int p = 0; p < 4; p++) byte[p] = _mm256_shuffle_epi8(table[p][0], code);
    } else { /* 64 entries: bits 4 and 5 of each code moved to its byte's top bit, which the blends read */
      const __m256i bit4 = _mm256_slli_epi16(code, 3), bit5 = _mm256_slli_epi16(code, 2);
      for (int p = 0; p < 4; p++) {
        const __m256i low = _mm256_blendv_epi8(_mm256_shuffle_epi8(table[p][0], code),
                                               _mm256_shuffle_epi8(table[p][1], code), bit4);
        const __m256i high = _mm256_blendv_epi8(_mm256_shuffle_epi8(table[p][2], code),
                                                _mm256_shuffle_epi8(table[p][3], code), bit4);
        byte[p] = _mm256_blendv_epi8(low, high, bit5);
      }
    }
    /* lane l of each: codes 16l .. 16l+15; part 0's halves, part 1's, then the pairs in order */
    const __m256i first0 = _mm256_unpacklo_epi8(byte[0], byte[1]), next0 = _mm256_unpackhi_epi8(byte[0], byte[1]);
    const __m256i first1 = _mm256_unpacklo_epi8(byte[2], byte[3]), next1 = _mm256_unpackhi_epi8(byte[2], byte[3]);
    const __m256i pairs[4] = {_mm256_unpacklo_epi16(first0, first1), _mm256_unpackhi_epi16(first0, first1),
                              _mm256_unpacklo_epi16(next0, next1), _mm256_unpackhi_epi16(next0, next1)};
    const int64_t k = 64 * i;
    for (int q = 0; q < 4; q++) { /* pairs[q]: weights 8q .. 8q+7 in the low lane, 32 + 8q .. in the high one */
      CONSUME(_mm256_cvtph_ps(_mm256_castsi256_si128(pairs[q])), k + 8 * q);
      CONSUME2(_mm256_cvtph_ps(_mm256_extracti128_si256(pairs[q], 1)), k + 32 + 8 * q);
    }
  }
  return 4 * steps;
}

/* 256-entry code books of 2- or 4-vectors (GPTVQ's 4-bit pairs, 2-bit quads: one byte a code), eight codes a step:
   each code's vector loaded straight from the float32 table at the byte's offset, two codes' vectors to a register
   half (no gathers, no trip of the codes through memory). Returns the 8-code groups done. */
static inline __attribute__((always_inline)) int64_t byte_vectors(const uint8_t *row, int dim, int64_t groups,
                                                                  const float *tab, float *w, const float *x,
                                                                  int64_t M, int64_t K, __m256 *acc, __m256 *acc2) {
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t *b = row + 8 * g;
    const int64_t k = 8 * g * dim;
    if (dim == 4) {
      for (int i = 0; i < 4; i++) {
        const __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(tab + 4 * b[2 * i])),
                                              _mm_loadu_ps(tab + 4 * b[2 * i + 1]), 1);
        if (i & 1) CONSUME2(v, k + 8 * i); else CONSUME(v, k + 8 * i);
      }
    } else {
      const double *pairs = (const double *)tab;
      for (int i = 0; i < 2; i++) {
        const __m128d lo = _mm_loadh_pd(_mm_load_sd(pairs + b[4 * i]), pairs + b[4 * i + 1]);
        const __m128d hi = _mm_loadh_pd(_mm_load_sd(pairs + b[4 * i + 2]), pairs + b[4 * i + 3]);
        const __m256 v = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(lo), hi, 1));
        if (i) CONSUME2(v, k + 8 * i); else CONSUME(v, k + 8 * i);
      }
    }
  }
  return groups;
}

/* Walks row n of a LutMatMul weight eight weights at a time: into w (w != NULL), or its dot products with the
   M <= 4 rows of x into out. Inlined into each caller, so each gets the loop it needs. */
static inline __attribute__((always_inline)) void lut_row(const Call *c, Scratch *s, int64_t n, float *w,
                                                          const float *x, int64_t M, float *out) {
  const float *tab = table_of(c, s, n);
  const int bits = (int)c->bits, dim = (int)c->dim;
  const int64_t K = c->K, codes = K / dim, groups = codes / 8;
  const uint8_t *row = c->codes + n * c->row_bytes, *end = c->codes + c->N * c->row_bytes;
  const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 acc2[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  float wide[4] = {0, 0, 0, 0}; /* the 16-wide loop's sums */
  if (dim == 1) {
    const __m256 lo = _mm256_loadu_ps(tab), hi = bits >= 4 ? _mm256_loadu_ps(tab + 8) : lo;
#define PALETTE_LOOP(B)                                                                                   \
  do {                                                                                                    \
    int64_t g = wide_groups;                                                                              \
    for (; g + 2 <= groups; g += 2) {                                                                     \
      CONSUME(look_up(eight_codes(row, g, B, end, shifts, mask), B, lo, hi, tab), 8 * g);                 \
      CONSUME2(look_up(eight_codes(row, g + 1, B, end, shifts, mask), B, lo, hi, tab), 8 * g + 8);        \
    }                                                                                                     \
    if (g < groups) CONSUME(look_up(eight_codes(row, g, B, end, shifts, mask), B, lo, hi, tab), 8 * g);   \
  } while (0)
    int64_t wide_groups = 0; /* groups of eight done 16 codes at a time (AVX-512) */
#ifdef WIDE_LOOKUPS
    if (bits == 4) /* one copy per width */
      wide_groups = packed_runs(row, end, 4, codes, tab, 0, NULL, NULL, w, x, M, K, wide);
    else if (bits == 3)
      wide_groups = packed_runs(row, end, 3, codes, tab, 0, NULL, NULL, w, x, M, K, wide);
    else if (bits == 2)
      wide_groups = packed_runs(row, end, 2, codes, tab, 0, NULL, NULL, w, x, M, K, wide);
    else if (bits == 1)
      wide_groups = vector_sixteen(row, end, 1, 1, groups, tab, w, x, M, K, wide);
#else
    if (bits == 4) wide_groups = palette_nibbles(c, n, row, codes, w, x, M, K, acc, acc2);
#endif
    /* one loop per width the lookups differ by, the width a constant in each */
    switch (bits) {
      case 1: PALETTE_LOOP(1); break;
      case 2: PALETTE_LOOP(2); break;
      case 3: PALETTE_LOOP(3); break;
      case 4: PALETTE_LOOP(4); break;
      case 8: PALETTE_LOOP(8); break;
      default: PALETTE_LOOP(bits); break;
    }
#undef PALETTE_LOOP
  } else {
    int32_t idx[8];
    int64_t g = 0;
#ifdef WIDE_LOOKUPS
    if (dim == 2 && bits == 4) /* GPTVQ's 2-bit pairs: their own copy, the width a constant */
      g = vector_sixteen(row, end, 4, 2, groups, tab, w, x, M, K, wide);
    else if ((dim == 2 || dim == 4 || dim == 8) && ((int64_t)1 << bits) * dim <= 32)
      g = vector_sixteen(row, end, bits, dim, groups, tab, w, x, M, K, wide);
    else if (bits == 8 && dim == 2) /* GPTVQ's 4-bit pairs */
      g = byte_pairs_gathered(row, groups, tab, w, x, M, K, wide);
    else if (bits == 6 && pair_planes_apply(c))
      g = pair_planes64(row, end, codes, (const uint8_t *)(tab + ((int64_t)1 << bits) * dim + 16), w, x, M, K, wide);
#endif
    if (g == 0 && bits == 8 && (dim == 2 || dim == 4))
      g = byte_vectors(row, dim, groups, tab, w, x, M, K, acc, acc2);
    if (g == 0 && pair_planes_apply(c)) {
      const uint8_t *planes = (const uint8_t *)(tab + ((int64_t)1 << bits) * dim + 16);
      g = bits == 4 ? pair_shuffles(row, end, 4, codes, planes, w, x, M, K, acc, acc2)
                    : pair_shuffles(row, end, 6, codes, planes, w, x, M, K, acc, acc2);
    }
    for (; g < groups; g++) {
      const __m256i eight = eight_codes(row, g, bits, end, shifts, mask);
      const int64_t k = 8 * g * dim;
      if (dim == 2) { /* each half of the codes' register indexes four 2-vectors (no trip through memory) */
        const long long *pairs = (const long long *)tab;
        CONSUME(_mm256_castsi256_ps(_mm256_i32gather_epi64(pairs, _mm256_castsi256_si128(eight), 8)), k);
        CONSUME2(_mm256_castsi256_ps(_mm256_i32gather_epi64(pairs, _mm256_extracti128_si256(eight, 1), 8)), k + 8);
        continue;
      }
      _mm256_storeu_si256((__m256i *)idx, eight);
      if (dim == 4) {
        for (int i = 0; i < 4; i++) {
          const __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(tab + 4 * idx[2 * i])),
                                                _mm_loadu_ps(tab + 4 * idx[2 * i + 1]), 1);
          if (i & 1) CONSUME2(v, k + 8 * i); else CONSUME(v, k + 8 * i);
        }
      } else if (dim == 8) {
        for (int i = 0; i < 8; i += 2) {
          CONSUME(_mm256_loadu_ps(tab + 8 * idx[i]), k + 8 * i);
          CONSUME2(_mm256_loadu_ps(tab + 8 * idx[i + 1]), k + 8 * i + 8);
        }
      } else {
        float vectors[8 * 8];
        for (int i = 0; i < 8; i++) memcpy(vectors + i * dim, tab + (int64_t)idx[i] * dim, sizeof(float) * (size_t)dim);
        for (int i = 0; i < dim; i++) CONSUME(_mm256_loadu_ps(vectors + 8 * i), k + 8 * i);
      }
    }
  }
  float total[4] = {0, 0, 0, 0};
  for (int64_t i = groups * 8; i < codes; i++) { /* the last codes, one at a time */
    const float *vector = tab + (int64_t)code_at(row, i, bits) * dim;
    for (int j = 0; j < dim; j++) {
      if (w)
        w[i * dim + j] = vector[j];
      else
        for (int64_t m = 0; m < M; m++) total[m] += vector[j] * x[m * K + i * dim + j];
    }
  }
  if (!w)
    for (int64_t m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(acc[m], acc2[m])) + total[m] + wide[m];
}

/* Row n of a LutMatMul weight: each code looked up in the row's table (dim floats per code). */
void decode_lut_row(const Call *c, Scratch *s, int64_t n, float *w) { lut_row(c, s, n, w, NULL, 0, NULL); }

/* One copy of the loop per token count, so the accumulators stay in registers. */
void lut_row_dots(const Call *c, Scratch *s, int64_t n, float *out) {
  switch (c->M) {
    case 1: lut_row(c, s, n, NULL, c->x, 1, out); break;
    case 2: lut_row(c, s, n, NULL, c->x, 2, out); break;
    case 3: lut_row(c, s, n, NULL, c->x, 3, out); break;
    default: lut_row(c, s, n, NULL, c->x, 4, out); break;
  }
}

/* 16-bit floats to float32: IEEE half (F16C), or bfloat16 (`brain`: the upper half of a float32). */
static inline float widen1(uint16_t h, int brain) {
  if (!brain) return half_to_float(h);
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline __m256 widen8(__m128i h, int brain) {
  return brain ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

#ifdef WIDE_LOOKUPS
static inline __m512 widen16(__m256i h, int brain) {
  return brain ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
#endif

/* Row n of a HalfMatMul weight: float16 or bfloat16 [N, K] widened to float32, into w or dotted with x. */
static inline __attribute__((always_inline)) void half_row(const Call *c, int64_t n, float *w, const float *x,
                                                           int64_t M, float *out) {
  const int brain = c->table_is_bf16;
  const uint16_t *row = (const uint16_t *)c->table + n * c->K;
  const int64_t K = c->K;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 acc2[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  float wide[4] = {0, 0, 0, 0};
#ifdef WIDE_LOOKUPS
  {
    __m512 acc16[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 16 <= K; k += 16) {
      const __m512 v = widen16(_mm256_loadu_si256((const __m256i *)(row + k)), brain);
      if (w)
        _mm512_storeu_ps(w + k, v);
      else
        for (int64_t m = 0; m < M; m++) acc16[m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * K + k), acc16[m]);
    }
    if (!w)
      for (int64_t m = 0; m < M; m++) wide[m] = _mm512_reduce_add_ps(acc16[m]);
  }
#endif
  for (; k + 16 <= K; k += 16) {
    CONSUME(widen8(_mm_loadu_si128((const __m128i *)(row + k)), brain), k);
    CONSUME2(widen8(_mm_loadu_si128((const __m128i *)(row + k + 8)), brain), k + 8);
  }
  for (; k + 8 <= K; k += 8) CONSUME(widen8(_mm_loadu_si128((const __m128i *)(row + k)), brain), k);
  float total[4] = {0, 0, 0, 0};
  for (; k < K; k++) {
    if (w)
      w[k] = widen1(row[k], brain);
    else
      for (int64_t m = 0; m < M; m++) total[m] += widen1(row[k], brain) * x[m * K + k];
  }
  if (!w)
    for (int64_t m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(acc[m], acc2[m])) + total[m] + wide[m];
}

void decode_half_row(const Call *c, Scratch *s, int64_t n, float *w) {
  (void)s;
  half_row(c, n, w, NULL, 0, NULL);
}

void half_row_dots(const Call *c, Scratch *s, int64_t n, float *out) {
  (void)s;
  switch (c->M) {
    case 1: half_row(c, n, NULL, c->x, 1, out); break;
    case 2: half_row(c, n, NULL, c->x, 2, out); break;
    case 3: half_row(c, n, NULL, c->x, 3, out); break;
    default: half_row(c, n, NULL, c->x, 4, out); break;
  }
}

/* The kept values of row n of a SparseMatMul weight on an integer grid, (code - zero) * scale, into v. */
static void kept_grid_values(const Call *c, int64_t n, float *v) {
  const int bits = (int)c->bits;
  const int64_t kept = c->kept, size = c->group_size, groups = (kept + size - 1) / size;
  const uint8_t *codes = (const uint8_t *)c->table + n * ((kept * bits + 7) / 8);
  const uint8_t *end = (const uint8_t *)c->table + c->N * ((kept * bits + 7) / 8);
  const uint16_t *scales = c->group_scales + n * groups;
  const uint8_t *zeros = c->group_zeros ? c->group_zeros + n * ((groups * bits + 7) / 8) : NULL;
  const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  int64_t j = 0;
  for (int64_t g = 0; g < groups; g++) {
    const float scale = half_to_float(scales[g]);
    const float zero = (float)(zeros ? code_at(zeros, g, bits) : 1 << (bits - 1));
    const int64_t stop = (g + 1) * size < kept ? (g + 1) * size : kept;
    if (j % 8 == 0) /* eight codes fill `bits` whole bytes from byte j / 8 * bits */
      for (; j + 8 <= stop; j += 8) {
        const __m256 q = _mm256_cvtepi32_ps(eight_codes(codes, j / 8, bits, end, shifts, mask));
        _mm256_storeu_ps(v + j, _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(zero)), _mm256_set1_ps(scale)));
      }
    for (; j < stop; j++) v[j] = ((float)code_at(codes, j, bits) - zero) * scale;
  }
}

/* EXPAND_INDEX[b]: for each of the 8 lanes i of a bitmap byte b, the number of set bits below bit i, a nibble per
   lane (lane i at bits 4i..4i+3). */
#define BELOW(b, i) __builtin_popcount((unsigned)(b) & ((1u << (i)) - 1u))
#define EXPAND_NIBBLES(b)                                                                                   \
  ((uint32_t)BELOW(b, 1) << 4 | (uint32_t)BELOW(b, 2) << 8 | (uint32_t)BELOW(b, 3) << 12 |                  \
   (uint32_t)BELOW(b, 4) << 16 | (uint32_t)BELOW(b, 5) << 20 | (uint32_t)BELOW(b, 6) << 24 |                \
   (uint32_t)BELOW(b, 7) << 28)
#define E4(b) EXPAND_NIBBLES(b), EXPAND_NIBBLES(b + 1), EXPAND_NIBBLES(b + 2), EXPAND_NIBBLES(b + 3)
#define E16(b) E4(b), E4(b + 4), E4(b + 8), E4(b + 12)
#define E64(b) E16(b), E16(b + 16), E16(b + 32), E16(b + 48)
static const uint32_t EXPAND_INDEX[256] = {E64(0), E64(64), E64(128), E64(192)};

/* Row n of a SparseMatMul weight: its kept values (16-bit floats widened, or decoded from their integer grid),
   then placed at the columns its bitmap marks (AVX-512: expand-loads, 16 columns a step; AVX2: a permutation per 8
   columns). */
void decode_sparse_row(const Call *c, Scratch *s, int64_t n, float *w) {
  const int64_t K = c->K, kept = c->kept;
  float *v = s->tab;
  if (c->bits) {
    kept_grid_values(c, n, v);
  } else {
    const uint16_t *values = (const uint16_t *)c->table + n * kept;
    const int brain = c->table_is_bf16;
    int64_t j = 0;
    for (; j + 8 <= kept; j += 8)
      _mm256_storeu_ps(v + j, widen8(_mm_loadu_si128((const __m128i *)(values + j)), brain));
    for (; j < kept; j++) v[j] = widen1(values[j], brain);
  }
  const uint8_t *row = c->codes + n * c->row_bytes;
  int64_t k = 0;
  const float *next = v;
#ifdef WIDE_LOOKUPS
  for (; k + 16 <= K; k += 16) {
    const __mmask16 keep = (__mmask16)(row[k / 8] | (row[k / 8 + 1] << 8));
    _mm512_storeu_ps(w + k, _mm512_maskz_expandloadu_ps(keep, next));
    next += __builtin_popcount(keep);
  }
#else
  /* AVX2 has no expand: each bitmap byte's 8 columns take the next kept values through a permutation (lane i reads
     the count of set bits below it, from EXPAND_INDEX) and keep them where the bit is set. */
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i nibble_shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  for (; k + 8 <= K; k += 8) {
    const unsigned byte = row[k >> 3];
    const uint32_t index = EXPAND_INDEX[byte];
    const __m256i lanes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)index), nibble_shifts),
                                           _mm256_set1_epi32(15));
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)byte), lane_bits), lane_bits);
    _mm256_storeu_ps(w + k, _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(next), lanes),
                                          _mm256_castsi256_ps(set)));
    next += (index >> 28) + (byte >> 7); /* the set bits below lane 7, and lane 7's */
  }
#endif
  for (; k < K; k++) w[k] = (row[k >> 3] >> (k & 7)) & 1 ? *next++ : 0.0f;
}

/* out[m] = the decoded row s->w . x[m] for the call's tokens. */
static void decoded_row_dots(const Call *c, Scratch *s, float *out) {
  for (int64_t m = 0; m < c->M; m++) {
    const float *x = c->x + m * c->K;
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= c->K; k += 16) {
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(s->w + k), _mm256_loadu_ps(x + k), acc);
      acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(s->w + k + 8), _mm256_loadu_ps(x + k + 8), acc2);
    }
    float total = hsum(_mm256_add_ps(acc, acc2));
    for (; k < c->K; k++) total += s->w[k] * x[k];
    out[m] = total;
  }
}

void sparse_row_dots(const Call *c, Scratch *s, int64_t n, float *out) {
  decode_sparse_row(c, s, n, s->w);
  decoded_row_dots(c, s, out);
}

/* The eight grid values v(code) of eight codes: the code, or its table entry (up to 16 entries from two registers
   by permutes, else gathered). */
static inline __m256 grid_values(__m256i q, int bits, const float *table, __m256 lo, __m256 hi, const float *padded) {
  if (!table) return _mm256_cvtepi32_ps(q);
  return bits <= 4 ? look_up(q, bits, lo, hi, padded) : _mm256_i32gather_ps(table, q, 4);
}

/* The inputs' sums over each group, [M][groups] after the row's offsets in the scratch: once per task (the
   scratch's `table`, -1 at its start, becomes 0). */
static const float *group_sums(const Call *c, Scratch *s, const float *x, int64_t M) {
  const int64_t K = c->K, size = c->group_size, groups = (K + size - 1) / size;
  float *sums = s->tab + groups + 16;
  if (s->table != 0) {
    for (int64_t m = 0; m < M; m++)
      for (int64_t g = 0; g < groups; g++) {
        const int64_t stop = (g + 1) * size < K ? (g + 1) * size : K;
        __m256 v = _mm256_setzero_ps();
        int64_t k = g * size;
        for (; k + 8 <= stop; k += 8) v = _mm256_add_ps(v, _mm256_loadu_ps(x + m * K + k));
        float sum = hsum(v);
        for (; k < stop; k++) sum += x[m * K + k];
        sums[m * groups + g] = sum;
      }
    s->table = 0;
  }
  return sums;
}

/* Walks row n of a GridMatMul weight eight weights at a time. Decoded (w != NULL): (v(code) - zero) * scale +
   offset per weight. Dot products with the M <= 4 rows of x (into out): per group, scale * sum(v(code) * x) +
   (offset - zero * scale) * sum(x), the inputs' group sums computed once per task (group_sums), so each eight
   weights cost one multiply-add per token. Inlined into each caller, so each gets the loop it needs. */
static inline __attribute__((always_inline)) void grid_row(const Call *c, Scratch *s, int64_t n, float *w,
                                                           const float *x, int64_t M, float *out, const int bits) {
  const int64_t K = c->K, size = c->group_size, groups = (K + size - 1) / size;
  const uint8_t *codes = c->codes + n * c->row_bytes, *end = c->codes + c->N * c->row_bytes;
  const float *scales = c->grid_scales + n * groups;
  const float *offsets = c->grid_offsets ? c->grid_offsets + n * groups : NULL;
  if (c->grid_zeros) { /* integer zero points: (v - z) * s = v * s - z * s, an offset per group */
    const uint8_t *zeros = c->grid_zeros + n * ((groups * bits + 7) / 8);
    for (int64_t g = 0; g < groups; g++)
      s->tab[g] = (offsets ? offsets[g] : 0.0f) - (float)code_at(zeros, g, bits) * scales[g];
    offsets = s->tab;
  }
  const float *table = c->grid_table;
  float padded[16] = {0};
  if (table && bits <= 4) memcpy(padded, table, sizeof(float) << bits);
  const __m256 lo = _mm256_loadu_ps(padded), hi = _mm256_loadu_ps(padded + 8);
  const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  const __m256 zero = _mm256_set1_ps(c->grid_zero);
  __m256 acc[4];
  for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
  float tail[4] = {0, 0, 0, 0};
  int64_t k = 0;
#ifdef WIDE_LOOKUPS
  float shifted[16]; /* v(code) - zero for every code */
  for (int i = 0; i < 16; i++) shifted[i] = (table ? padded[i] : (float)i) - c->grid_zero;
  if (bits == 4 && size % 16 == 0)
    k = 8 * packed_runs(codes, end, 4, K, shifted, size, scales, offsets, w, x, M, K, tail);
  else if (bits == 3 && size % 16 == 0)
    k = 8 * packed_runs(codes, end, 3, K, shifted, size, scales, offsets, w, x, M, K, tail);
  else if (bits == 2 && size % 16 == 0)
    k = 8 * packed_runs(codes, end, 2, K, shifted, size, scales, offsets, w, x, M, K, tail);
#endif
  if (!w && k == 0 && bits <= 4 && size % 8 == 0 && size <= K) {
    /* Whole groups, their weights looked up scaled: a group's values (v(code) - zero) * scale fill one register (up
       to 3 bits) or two (4 bits) for one multiply each, so each eight weights cost one lookup and one multiply-add
       per token, as a palette's; the offsets (and zero points) add offset * sum(x) per group after the loop. */
    const __m256 values = _mm256_sub_ps(table ? lo : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), zero);
    const __m256 values_hi = _mm256_sub_ps(table ? hi : _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), zero);
    __m256 acc2[4];
    for (int64_t m = 0; m < M; m++) acc2[m] = _mm256_setzero_ps();
    const int64_t whole = K / size;
    for (int64_t g = 0; g < whole; g++) {
      const __m256 scale8 = _mm256_set1_ps(scales[g]);
      const __m256 scaled = _mm256_mul_ps(values, scale8);
      const __m256 scaled_hi = bits == 4 ? _mm256_mul_ps(values_hi, scale8) : scaled;
      const int64_t stop = k + size;
      for (; k + 16 <= stop; k += 16) {
        const __m256 v = look_up(eight_codes(codes, k / 8, bits, end, shifts, mask), bits, scaled, scaled_hi, NULL);
        const __m256 v2 =
            look_up(eight_codes(codes, k / 8 + 1, bits, end, shifts, mask), bits, scaled, scaled_hi, NULL);
        for (int64_t m = 0; m < M; m++) {
          acc[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k), acc[m]);
          acc2[m] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(x + m * K + k + 8), acc2[m]);
        }
      }
      if (k < stop) { /* a group of a multiple of 8, not of 16 */
        const __m256 v = look_up(eight_codes(codes, k / 8, bits, end, shifts, mask), bits, scaled, scaled_hi, NULL);
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k), acc[m]);
        k += 8;
      }
    }
    for (int64_t m = 0; m < M; m++) acc[m] = _mm256_add_ps(acc[m], acc2[m]);
    if (offsets) {
      const float *sums = group_sums(c, s, x, M);
      for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < whole; g++) tail[m] += offsets[g] * sums[m * groups + g];
    }
  }
  const float *sums = !w && k < K ? group_sums(c, s, x, M) : NULL;
  for (int64_t g = k / size; g < groups && k < K; g++) { /* (k == K: the wide loop ended the last, partial group) */
    const float offset = offsets ? offsets[g] : 0.0f;
    const int64_t stop = (g + 1) * size < K ? (g + 1) * size : K;
    if (w) {
      const __m256 scale8 = _mm256_set1_ps(scales[g]), offset8 = _mm256_set1_ps(offset);
      if (k % 8 == 0) /* eight codes fill `bits` whole bytes from byte k / 8 * bits */
        for (; k + 8 <= stop; k += 8) {
          const __m256 v = grid_values(eight_codes(codes, k / 8, bits, end, shifts, mask), bits, table, lo, hi, padded);
          _mm256_storeu_ps(w + k, _mm256_fmadd_ps(_mm256_sub_ps(v, zero), scale8, offset8));
        }
      for (; k < stop; k++) {
        const int q = code_at(codes, k, bits);
        w[k] = ((table ? table[q] : (float)q) - c->grid_zero) * scales[g] + offset;
      }
      continue;
    }
    const int64_t from = k; /* the group's first weight left, past its start where the wide loop ended inside it */
    __m256 part[4], part2[4]; /* sum(v(code) * x) over the group, two chains */
    float rest[4] = {0, 0, 0, 0};
    for (int64_t m = 0; m < M; m++) part[m] = part2[m] = _mm256_setzero_ps();
    if (k % 8 == 0) {
      for (; k + 16 <= stop; k += 16) {
        const __m256 v = grid_values(eight_codes(codes, k / 8, bits, end, shifts, mask), bits, table, lo, hi, padded);
        const __m256 v2 =
            grid_values(eight_codes(codes, k / 8 + 1, bits, end, shifts, mask), bits, table, lo, hi, padded);
        for (int64_t m = 0; m < M; m++) {
          part[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k), part[m]);
          part2[m] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(x + m * K + k + 8), part2[m]);
        }
      }
      if (k + 8 <= stop) {
        const __m256 v = grid_values(eight_codes(codes, k / 8, bits, end, shifts, mask), bits, table, lo, hi, padded);
        for (int64_t m = 0; m < M; m++) part[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k), part[m]);
        k += 8;
      }
    }
    for (; k < stop; k++) {
      const int q = code_at(codes, k, bits);
      const float v = table ? table[q] : (float)q;
      for (int64_t m = 0; m < M; m++) rest[m] += v * x[m * K + k];
    }
    const __m256 scale8 = _mm256_set1_ps(scales[g]);
    const float constant = offset - c->grid_zero * scales[g]; /* what each weight adds besides v(code) * scale */
    for (int64_t m = 0; m < M; m++) {
      float xs = sums[m * groups + g];
      if (from != g * size) { /* only part of the group's inputs left: their sum here */
        xs = 0;
        for (int64_t j = from; j < stop; j++) xs += x[m * K + j];
      }
      acc[m] = _mm256_fmadd_ps(_mm256_add_ps(part[m], part2[m]), scale8, acc[m]);
      tail[m] += rest[m] * scales[g] + constant * xs;
    }
  }
  if (!w)
    for (int64_t m = 0; m < M; m++) out[m] = hsum(acc[m]) + tail[m];
}

/* One copy per code width (2, 3, 4 bits, else any), the width a constant in each. */
#define GRID_ROW_BY_BITS(c, s, n, w, x, M, out)           \
  do {                                                     \
    switch ((c)->bits) {                                   \
      case 2: grid_row(c, s, n, w, x, M, out, 2); break;   \
      case 3: grid_row(c, s, n, w, x, M, out, 3); break;   \
      case 4: grid_row(c, s, n, w, x, M, out, 4); break;   \
      default: grid_row(c, s, n, w, x, M, out, (int)(c)->bits); break; \
    }                                                      \
  } while (0)

void decode_grid_row(const Call *c, Scratch *s, int64_t n, float *w) { GRID_ROW_BY_BITS(c, s, n, w, NULL, 0, NULL); }

void grid_row_dots(const Call *c, Scratch *s, int64_t n, float *out) {
  switch (c->M) { /* a constant token count per copy: the accumulators stay in registers */
    case 1: GRID_ROW_BY_BITS(c, s, n, NULL, c->x, 1, out); break;
    case 2: GRID_ROW_BY_BITS(c, s, n, NULL, c->x, 2, out); break;
    case 3: GRID_ROW_BY_BITS(c, s, n, NULL, c->x, 3, out); break;
    default: GRID_ROW_BY_BITS(c, s, n, NULL, c->x, 4, out); break;
  }
}
