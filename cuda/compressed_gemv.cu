// Matrix-vector (and small-batch) products with compressed weights, y[m, n] = sum_k x[m, k] * W[n, k].
//
// Weights stay in the layouts of the checkpoint (compress/packing.py, formats.py, palette.py):
// every output row n holds its codes row-packed, code k at bits [k*b, (k+1)*b) of the row's
// little-endian bit stream, row stride `row_bytes`. Eight consecutive codes therefore take exactly
// b bytes starting at byte (k/8)*b, so a lane decodes codes 8 at a time from one b-byte load.
//
// How a code becomes a value (VALUE template argument):
//   INT_ASYM  (code - zero[n, g]) * scale[n, g]   zeros row-packed at b bits per group
//   INT_SYM   (code - 2^(b-1))   * scale[n, g]
//   GRID      grid[code]         * scale[n, g]    NormalFloat / FP4 code books
//   LUT       table[(n / rows_per_table) * 2^b + code]   palettes (k-means), table in shared memory
//   VLUT      book[((n / rows_per_table) * 2^b + code) * dim + u] * scale[n]   vector code books (GPTVQ): code j
//             of a row gives the `dim` weights of columns j*dim .. j*dim+dim-1 (small books in shared memory)
//   DENSE     values[n, k]                        fp16 kept values of a sparse layer
// Which column a value multiplies (COLS template argument):
//   COL_DENSE  k
//   COL_NM     (k / n_keep) * m_group + idx[n, k]  (N:M sparsity, idx row-packed at log2(M) bits)
// Unstructured bitmap sparsity has its own kernel below (a per-warp prefix count of the bitmap).
//
// One warp per output row; each lane walks the row 8 codes at a time and keeps MAX_M partial sums
// (one per activation row), reduced with shuffles at the end. Batches larger than MAX_M are
// launched in slices of MAX_M rows of x. Scales are fp16; accumulation is fp32.

#include "common.cuh"

#define WARPS_PER_BLOCK 4
#define MAX_M 16

enum Value { INT_ASYM = 0, INT_SYM = 1, GRID = 2, LUT = 3, DENSE = 4, VLUT = 5 };
enum Cols { COL_DENSE = 0, COL_NM = 1 };

// Eight codes starting at code 8*chunk of a row: b bytes, fewer at the end of the row.
__device__ __forceinline__ uint64_t load_chunk(const uint8_t* row, int chunk, int bits, int row_bytes) {
    int start = chunk * bits;
    int n = min(bits, row_bytes - start);
    uint64_t word = 0;
    for (int i = 0; i < n; ++i) word |= (uint64_t)row[start + i] << (8 * i);
    return word;
}

// Every byte buffer carries at least 8 bytes of padding after its last row (compress/kernels.py adds
// them), so two-byte field reads and chunk loads never leave the allocation.
struct Weight {
    const uint8_t* codes;      // [N, row_bytes]
    const __half* scales;      // [N, groups]
    const uint8_t* zeros;      // [N, zero_row_bytes] (INT_ASYM)
    const float* lut;          // GRID: [2^b]; LUT: [tables, 2^b]; VLUT: [tables, 2^b, dim]
    const __half* values;      // DENSE: [N, value_cols]
    const uint8_t* nm_index;   // COL_NM: [N, index_row_bytes]
    int bits, group_size, groups, row_bytes, zero_row_bytes, rows_per_table, value_cols;
    int nm_keep, nm_group, index_bits, index_row_bytes, vector_dim;
};

template <int VALUE>
__device__ __forceinline__ float decode(const Weight& w, int n, int k, uint32_t code, const float* table) {
    if (VALUE == DENSE) return __half2float(w.values[(size_t)n * w.value_cols + k]);
    if (VALUE == LUT) return table[code];
    int g = k / w.group_size;
    float s = __half2float(w.scales[(size_t)n * w.groups + g]);
    if (VALUE == GRID) return table[code] * s;
    float z = VALUE == INT_SYM ? (float)(1 << (w.bits - 1))
                               : (float)packed_field(w.zeros + (size_t)n * w.zero_row_bytes, g, w.bits);
    return ((float)code - z) * s;
}

// The code book this warp's row reads (LUT: its palette's table; GRID: the shared grid; VLUT: its vector code
// book), copied to shared memory; a vector code book of more than 256 floats is read where it is (global).
template <int VALUE>
__device__ __forceinline__ const float* row_table(const Weight& w, int n, float* shared, int lane) {
    if (VALUE != LUT && VALUE != GRID && VALUE != VLUT) return nullptr;
    int size = (1 << w.bits) * (VALUE == VLUT ? w.vector_dim : 1);
    const float* src = VALUE == GRID ? w.lut : w.lut + (size_t)(n / w.rows_per_table) * size;
    if (size > 256) return src;
    for (int i = lane; i < size; i += 32) shared[i] = src[i];
    __syncwarp();
    return shared;
}

// Warp-reduce each activation row's partial sums and write y[m, n].
template <typename T>
__device__ __forceinline__ void store_sums(float* acc, T* y, int M, int N, int n, int lane) {
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m >= M) break;
        float s = warp_sum(acc[m]);
        if (lane == 0) store(&y[(size_t)m * N + n], s);
    }
}

// The warp's output row and lane, the row's value table (palette modes; in shared memory) and
// zeroed sums; false for warps past the last row.
template <int VALUE>
__device__ bool start_row(const Weight& w, int N, int& n, int& lane, const float*& table, float* acc) {
    __shared__ float tables[WARPS_PER_BLOCK][256];
    int warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    n = blockIdx.x * WARPS_PER_BLOCK + warp;
    if (n >= N) return false;
    table = row_table<VALUE>(w, n, tables[warp], lane);
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = 0.f;
    return true;
}

template <typename T, int VALUE, int COLS>
__device__ void gemv(const T* __restrict__ x, Weight w, T* __restrict__ y, int M, int N, int K, int kept) {
    int n, lane;
    const float* table;
    float acc[MAX_M];
    if (!start_row<VALUE>(w, N, n, lane, table, acc)) return;
    const uint8_t* row = w.codes + (size_t)n * w.row_bytes;
    const uint8_t* index_row = COLS == COL_NM ? w.nm_index + (size_t)n * w.index_row_bytes : nullptr;
    int chunks = (kept + 7) / 8;  // kept = K for dense layouts, the kept count per row for N:M
    for (int c = lane; c < chunks; c += 32) {
        uint64_t word = VALUE == DENSE ? 0 : load_chunk(row, c, w.bits, w.row_bytes);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int k = c * 8 + j;
            if (k >= kept) break;
            uint32_t code = VALUE == DENSE ? 0 : (uint32_t)((word >> (j * w.bits)) & ((1u << w.bits) - 1u));
            if (VALUE == VLUT) {  // one code, `dim` weights
                const float* vec = table + code * w.vector_dim;
                float s = __half2float(w.scales[n]);
                for (int u = 0; u < w.vector_dim; ++u) {
                    int col = k * w.vector_dim + u;
                    float v = vec[u] * s;
#pragma unroll
                    for (int m = 0; m < MAX_M; ++m)
                        if (m < M) acc[m] += v * to_float(x[(size_t)m * K + col]);
                }
                continue;
            }
            float v = decode<VALUE>(w, n, k, code, table);
            int col = COLS == COL_NM ? (k / w.nm_keep) * w.nm_group + (int)packed_field(index_row, k, w.index_bits)
                                     : k;
#pragma unroll
            for (int m = 0; m < MAX_M; ++m)
                if (m < M) acc[m] += v * to_float(x[(size_t)m * K + col]);
        }
    }
    store_sums(acc, y, M, N, n, lane);
}

// Unstructured sparsity: a 1-bit keep mask per weight ([N, ceil(K/8)] bytes) and the kept values of
// each row, in order, in any VALUE format over the compacted [N, kept] matrix. Each warp step covers
// 32 mask words (1024 columns); an exclusive warp scan of their popcounts gives every lane the index
// of its first kept value.
template <typename T, int VALUE>
__device__ void bitmap_gemv(const T* __restrict__ x, Weight w, const uint8_t* __restrict__ mask, int mask_row_bytes,
                            T* __restrict__ y, int M, int N, int K) {
    int n, lane;
    const float* table;
    float acc[MAX_M];
    if (!start_row<VALUE>(w, N, n, lane, table, acc)) return;
    const uint8_t* mrow = mask + (size_t)n * mask_row_bytes;
    const uint8_t* row = w.codes + (size_t)n * w.row_bytes;
    int words = (K + 31) / 32;
    int base = 0;  // kept values before this warp step
    for (int w0 = 0; w0 < words; w0 += 32) {
        int word_index = w0 + lane;
        uint32_t bits = 0;
        if (word_index < words)
            for (int b = 0; b < 4; ++b) {
                int byte = word_index * 4 + b;
                if (byte < mask_row_bytes) bits |= (uint32_t)mrow[byte] << (8 * b);
            }
        int count = __popc(bits), prefix = count;
        for (int off = 1; off < 32; off <<= 1) {  // inclusive scan
            int other = __shfl_up_sync(0xffffffffu, prefix, off);
            if (lane >= off) prefix += other;
        }
        int j = base + prefix - count;
        while (bits) {
            int bit = __ffs(bits) - 1;
            bits &= bits - 1;
            int col = word_index * 32 + bit;
            uint32_t code = VALUE == DENSE ? 0 : packed_field(row, j, w.bits);
            float v = decode<VALUE>(w, n, j, code, table);
#pragma unroll
            for (int m = 0; m < MAX_M; ++m)
                if (m < M) acc[m] += v * to_float(x[(size_t)m * K + col]);
            ++j;
        }
        base += __shfl_sync(0xffffffffu, prefix, 31);
    }
    store_sums(acc, y, M, N, n, lane);
}

// Outliers (dense-and-sparse): y[m, n] += sum over row n's outliers of delta * x[m, col], where delta is
// the outlier value minus the inner format's value at that position (precomputed once). CSR rows.
template <typename T>
__device__ void csr_add(const T* __restrict__ x, const int* __restrict__ row_start, const int* __restrict__ cols,
                        const float* __restrict__ delta, T* __restrict__ y, int M, int N, int K) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int n = blockIdx.x * WARPS_PER_BLOCK + warp;
    if (n >= N) return;
    for (int m = 0; m < M; ++m) {
        float s = 0.f;
        for (int i = row_start[n] + lane; i < row_start[n + 1]; i += 32) s += delta[i] * to_float(x[(size_t)m * K + cols[i]]);
        s = warp_sum(s);
        if (lane == 0) store(&y[(size_t)m * N + n], to_float(y[(size_t)m * N + n]) + s);
    }
}

// Entry points take the weight as separate buffers plus an int32 array of its dimensions (the order of
// DIMS in compress/kernels.py), so a launcher passes plain arrays and scalars.
#define WEIGHT_ARGS                                                                                        \
    const uint8_t *codes, const __half *scales, const uint8_t *zeros, const float *lut, const __half *values, \
        const uint8_t *nm_index, const int *dims
__device__ __forceinline__ Weight make_weight(WEIGHT_ARGS) {
    Weight w;
    w.codes = codes; w.scales = scales; w.zeros = zeros; w.lut = lut; w.values = values; w.nm_index = nm_index;
    w.bits = dims[0]; w.group_size = dims[1]; w.groups = dims[2]; w.row_bytes = dims[3]; w.zero_row_bytes = dims[4];
    w.rows_per_table = dims[5]; w.value_cols = dims[6]; w.nm_keep = dims[7]; w.nm_group = dims[8];
    w.index_bits = dims[9]; w.index_row_bytes = dims[10]; w.vector_dim = dims[11];
    return w;
}
#define WEIGHT_PASS make_weight(codes, scales, zeros, lut, values, nm_index, dims)

#define GEMV_ENTRY(T, TNAME, VALUE, COLS)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                   \
        gemv_##TNAME##_v##VALUE##_c##COLS(const T* x, WEIGHT_ARGS, T* y, int M, int N, int K, int kept) { \
        gemv<T, VALUE, COLS>(x, WEIGHT_PASS, y, M, N, K, kept);                                          \
    }
#define BITMAP_ENTRY(T, TNAME, VALUE)                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32) bitmap_gemv_##TNAME##_v##VALUE(  \
        const T* x, WEIGHT_ARGS, const uint8_t* mask, int mask_row_bytes, T* y, int M, int N, int K) {  \
        bitmap_gemv<T, VALUE>(x, WEIGHT_PASS, mask, mask_row_bytes, y, M, N, K);                         \
    }
#define ALL_VALUES(T, TNAME)                                                                               \
    GEMV_ENTRY(T, TNAME, 0, 0) GEMV_ENTRY(T, TNAME, 1, 0) GEMV_ENTRY(T, TNAME, 2, 0) GEMV_ENTRY(T, TNAME, 3, 0) \
    GEMV_ENTRY(T, TNAME, 0, 1) GEMV_ENTRY(T, TNAME, 1, 1) GEMV_ENTRY(T, TNAME, 2, 1) GEMV_ENTRY(T, TNAME, 3, 1) \
    GEMV_ENTRY(T, TNAME, 4, 1) GEMV_ENTRY(T, TNAME, 5, 0)                                                  \
    BITMAP_ENTRY(T, TNAME, 0) BITMAP_ENTRY(T, TNAME, 1) BITMAP_ENTRY(T, TNAME, 2) BITMAP_ENTRY(T, TNAME, 3) \
    BITMAP_ENTRY(T, TNAME, 4)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32) csr_add_##TNAME(                   \
        const T* x, const int* row_start, const int* cols, const float* delta, T* y, int M, int N, int K) { \
        csr_add<T>(x, row_start, cols, delta, y, M, N, K);                                               \
    }

ALL_VALUES(__half, f16)
ALL_VALUES(__nv_bfloat16, bf16)
