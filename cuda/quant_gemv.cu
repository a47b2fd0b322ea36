// Fast path of y[m, n] = sum_k x[m, k] * W[n, k] for densely packed 2/3/4/8-bit weights (integer grids
// with or without zeros, NF/FP code books, palettes) when K is a multiple of 32 and a group holds a
// whole number of 32-code chunks. Other layouts (sparse, odd K, other widths) take compressed_gemv.cu.
//
// Layout (compress/packing.py): row n's codes are one little-endian bit stream, row stride K*BITS/8
// bytes, so 32 consecutive codes are exactly BITS 32-bit words, aligned to 4*BITS bytes: a lane reads
// them with one 16-byte load (4-bit), two (8-bit), one 8-byte load (2-bit) or three 4-byte loads (3-bit),
// and the 32 lanes of a warp read one contiguous span.
//
// A block of 4 warps computes R output rows for MT activation rows; its 128 lanes split the row into
// 32-code chunks (chunk c goes to lane c % 128), so one pass over the weights keeps 128 * R * 4*BITS
// bytes in flight per block. A code becomes a float without an int-to-float conversion: the 23-bit
// mantissa trick (bits 0x4B000000 | q read as a float are 2^23 + q), then one subtraction gives q - zero
// exactly and one product the weight. Partial sums (fp32) are reduced across the warp with shuffles and
// across the 4 warps in shared memory.
//
// Template arguments: T activation type, VALUE (0 int with zeros, 1 symmetric int, 2 code book x scale,
// 3 palette), BITS, R rows per block, MT activation rows (the launcher picks the smallest of 1/2/4/8/16
// that holds the batch; larger batches are sliced).

#include "common.cuh"

#define THREADS 128

template <int BITS>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t* w) {
    if constexpr (BITS == 4) {
        uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (BITS == 8) {
        uint4 a = __ldcs(reinterpret_cast<const uint4*>(p)), b = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if constexpr (BITS == 2) {
        uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
        w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[i] = __ldcs(reinterpret_cast<const unsigned int*>(p) + i);
    }
}

// Code j (0..31) of a 32-code chunk held in BITS words; j is a constant after unrolling, so the shifts are too.
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t* w, int j) {
    int bit = j * BITS, word = bit >> 5, off = bit & 31;
    uint32_t v = w[word] >> off;
    if (off + BITS > 32) v |= w[word + 1] << (32 - off);
    return v & ((1u << BITS) - 1u);
}

// Eight activations x[k0 .. k0+8) as floats, from one 16-byte load.
__device__ __forceinline__ void load_x8(const __half* p, float* f) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __half22float2(h[i]);
        f[2 * i] = t.x; f[2 * i + 1] = t.y;
    }
}
__device__ __forceinline__ void load_x8(const __nv_bfloat16* p, float* f) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x; f[2 * i + 1] = t.y;
    }
}

template <typename T, int VALUE, int BITS, int R, int MT>
__global__ void __launch_bounds__(THREADS)
quant_gemv(const T* __restrict__ x, const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
           const uint8_t* __restrict__ zeros, const float* __restrict__ lut, T* __restrict__ y, int M, int N, int K,
           int group_size, int groups, int zero_row_bytes, int rows_per_table) {
    constexpr int SIZE = 1 << BITS;
    constexpr float MAGIC = 8388608.f;  // 2^23
    __shared__ float tables[(VALUE == 3 ? R : 1) * SIZE];
    __shared__ float partial[THREADS / 32][R * MT];
    const int row0 = blockIdx.x * R;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = min(row0 + r, N - 1);  // past the end: recompute the last row, not stored
    if (VALUE == 2 || VALUE == 3) {
        for (int i = threadIdx.x; i < (VALUE == 3 ? R : 1) * SIZE; i += THREADS) {
            int row = min(row0 + i / SIZE, N - 1);
            tables[i] = VALUE == 3 ? lut[(size_t)(row / rows_per_table) * SIZE + i % SIZE] : lut[i];
        }
        __syncthreads();
    }
    const int row_bytes = K / 8 * BITS, chunks = K / 32;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

    for (int c = threadIdx.x; c < chunks; c += THREADS) {
        uint32_t words[R][BITS];
        float scale[R], offset[R];
#pragma unroll
        for (int r = 0; r < R; ++r) load_words<BITS>(codes + (size_t)rows[r] * row_bytes + c * 4 * BITS, words[r]);
        const int g = c * 32 / group_size;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            scale[r] = VALUE == 3 ? 1.f : __half2float(scales[(size_t)rows[r] * groups + g]);
            float zero = VALUE == 0 ? (float)packed_field(zeros + (size_t)rows[r] * zero_row_bytes, g, BITS)
                                    : (float)(SIZE / 2);
            offset[r] = MAGIC + (VALUE <= 1 ? zero : 0.f);
        }
#pragma unroll
        for (int sub = 0; sub < 4; ++sub) {
            float v[R][8];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    uint32_t q = code_at<BITS>(words[r], sub * 8 + j);
                    if (VALUE <= 1) v[r][j] = (__uint_as_float(0x4B000000u | q) - offset[r]) * scale[r];
                    else if (VALUE == 2) v[r][j] = tables[q] * scale[r];
                    else v[r][j] = tables[r * SIZE + q];
                }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m >= M) break;
                float xf[8];
                load_x8(x + (size_t)m * K + c * 32 + sub * 8, xf);
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[r][m] = fmaf(v[r][j], xf[j], acc[r][m]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float s = warp_sum(acc[r][m]);
            if (lane == 0) partial[warp][r * MT + m] = s;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < R * MT; i += THREADS) {
        int r = i / MT, m = i % MT;
        if (m < M && row0 + r < N) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < THREADS / 32; ++w) s += partial[w][i];
            store(&y[(size_t)m * N + row0 + r], s);
        }
    }
}
