/* SiluGate: the gated activation of a SiLU MLP on its packed gate and up projections,
   y[r, j] = silu(x[r, j]) * x[r, n + j] with silu(g) = g / (1 + e^-g), for x [rows, 2n] (the gate's n columns,
   then the up projection's): one kernel where the graph would split the packed product, then run a sigmoid and
   two multiplications. e^x by Cody-Waite range reduction and a degree-5 minimax polynomial (Cephes' expf),
   within 2 float32 ulps. */
#include <immintrin.h>
#include <math.h>

#include "ops.h"

static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}

void silu_gate_rows(const float *x, float *y, int64_t n, int64_t first, int64_t last) {
  for (int64_t r = first; r < last; r++) {
    const float *gate = x + r * 2 * n, *up = gate + n;
    float *out = y + r * n;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 g = _mm256_loadu_ps(gate + j);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
    }
    for (; j < n; j++) out[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
  }
}
