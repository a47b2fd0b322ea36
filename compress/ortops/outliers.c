/* OutlierAdd: a dense-and-sparse weight's sparse part (SqueezeLLM's outliers) added to the dense part's product,
   y[t, n] = y0[t, n] + sum of corrections[j] * x[t, columns[j]] over row n's outliers j (compressed sparse rows:
   row n's outliers are starts[n] .. starts[n + 1] - 1). The weight is never decoded. */
#include "ops.h"

static inline int64_t column_at(const void *columns, int column_bytes, int64_t j) {
  if (column_bytes == 1) return ((const uint8_t *)columns)[j];
  if (column_bytes == 2) return ((const uint16_t *)columns)[j];
  return ((const int32_t *)columns)[j];
}

void outlier_add_rows(const float *x, const float *y0, float *y, int64_t K, int64_t N, const int64_t *starts,
                      const void *columns, int column_bytes, const float *corrections, int64_t first, int64_t last) {
  for (int64_t t = first; t < last; t++) {
    const float *xt = x + t * K;
    const float *in = y0 + t * N;
    float *out = y + t * N;
    for (int64_t n = 0; n < N; n++) {
      float sum = in[n];
      for (int64_t j = starts[n]; j < starts[n + 1]; j++) sum += corrections[j] * xt[column_at(columns, column_bytes, j)];
      out[n] = sum;
    }
  }
}
