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

// Eight bf16 activations x[k0 .. k0+8) as floats, from one 16-byte load (fp16 takes the half2 path).
__device__ __forceinline__ void load_x8(const __nv_bfloat16* p, float* f) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x; f[2 * i + 1] = t.y;
    }
}

// Codes a and b of pair p (0..15) of a 32-code chunk. For 2/4/8 bits both sit in one word, 16 bits apart,
// so one shift and one mask put both into a half2; other widths pair neighbours.
template <int BITS>
struct Pair {
    static constexpr bool SAME_WORD = BITS == 2 || BITS == 4 || BITS == 8;
    static constexpr int PER_WORD = 32 / BITS;
    __device__ static constexpr int a(int p) { return SAME_WORD ? p / (PER_WORD / 2) * PER_WORD + p % (PER_WORD / 2) : 2 * p; }
    __device__ static constexpr int b(int p) { return SAME_WORD ? a(p) + PER_WORD / 2 : 2 * p + 1; }
};

// (1024 + code a, 1024 + code b) as fp16 bits: 0x6400 is 1024.0, whose last mantissa bit is 1.
template <int BITS>
__device__ __forceinline__ __half2 magic_pair(const uint32_t* w, int p) {
    uint32_t bits;
    if constexpr (Pair<BITS>::SAME_WORD) {
        constexpr uint32_t MASK = (1u << BITS) - 1u;
        int a = Pair<BITS>::a(p), word = a * BITS / 32, off = a * BITS % 32;
        bits = ((w[word] >> off) & (MASK | MASK << 16)) | 0x64006400u;
    } else {
        bits = code_at<BITS>(w, Pair<BITS>::a(p)) | code_at<BITS>(w, Pair<BITS>::b(p)) << 16 | 0x64006400u;
    }
    return *reinterpret_cast<__half2*>(&bits);
}

template <typename T> struct IsHalf { static constexpr bool value = false; };
template <> struct IsHalf<__half> { static constexpr bool value = true; };

template <typename T, int VALUE, int BITS, int R, int MT>
__global__ void __launch_bounds__(THREADS)
quant_gemv(const T* __restrict__ x, const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
           const uint8_t* __restrict__ zeros, const float* __restrict__ lut, T* __restrict__ y, int M, int N, int K,
           int group_size, int groups, int zero_row_bytes, int rows_per_table) {
    constexpr int SIZE = 1 << BITS;
    constexpr bool HALF = IsHalf<T>::value;
    constexpr float MAGIC = 8388608.f;  // 2^23
    __shared__ float tables[(VALUE >= 2 ? (VALUE == 3 ? R : 1) : 0) * SIZE + 1];
    __shared__ float partial[THREADS / 32][R * MT];
    const int row0 = blockIdx.x * R;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = min(row0 + r, N - 1);  // past the end: recompute the last row, not stored
    if (VALUE >= 2) {
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
        float scale[R], zero[R];
#pragma unroll
        for (int r = 0; r < R; ++r) load_words<BITS>(codes + (size_t)rows[r] * row_bytes + c * 4 * BITS, words[r]);
        const int g = c * 32 / group_size;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            scale[r] = VALUE == 3 ? 1.f : __half2float(scales[(size_t)rows[r] * groups + g]);
            zero[r] = VALUE == 0 ? (float)packed_field(zeros + (size_t)rows[r] * zero_row_bytes, g, BITS) : SIZE / 2;
        }
        if constexpr (HALF) {
            // fp16 activations: weights decoded two at a time into half2 (scaled, so partial sums stay small),
            // 32 products summed in half2, then added to the fp32 sums.
            __half2 w2[R][16];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const __half2 s2 = __float2half2_rn(scale[r]);
                const __half2 z2 = __float2half2_rn(1024.f + zero[r]);
#pragma unroll
                for (int p = 0; p < 16; ++p) {
                    if constexpr (VALUE <= 1) {
                        w2[r][p] = __hmul2(__hsub2(magic_pair<BITS>(words[r], p), z2), s2);
                    } else {
                        const float* t = tables + (VALUE == 3 ? r * SIZE : 0);
                        __half2 v = __floats2half2_rn(t[code_at<BITS>(words[r], Pair<BITS>::a(p))],
                                                      t[code_at<BITS>(words[r], Pair<BITS>::b(p))]);
                        w2[r][p] = VALUE == 2 ? __hmul2(v, s2) : v;
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m >= M) break;
                uint4 raw[4];
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * K + c * 32);
#pragma unroll
                for (int i = 0; i < 4; ++i) raw[i] = xp[i];
                const __half* xh = reinterpret_cast<const __half*>(raw);
                __half2 sum[R];
#pragma unroll
                for (int r = 0; r < R; ++r) sum[r] = __float2half2_rn(0.f);
#pragma unroll
                for (int p = 0; p < 16; ++p) {
                    const __half2 xv = __halves2half2(xh[Pair<BITS>::a(p)], xh[Pair<BITS>::b(p)]);
#pragma unroll
                    for (int r = 0; r < R; ++r) sum[r] = __hfma2(w2[r][p], xv, sum[r]);
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    float2 f = __half22float2(sum[r]);
                    acc[r][m] += f.x + f.y;
                }
            }
        } else {
            // bf16 activations: fp32 throughout; (code - zero) from the 2^23 mantissa trick, the scale once per chunk.
            float part[R][MT];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int m = 0; m < MT; ++m) part[r][m] = 0.f;
#pragma unroll
            for (int sub = 0; sub < 4; ++sub) {
                float v[R][8];
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        uint32_t q = code_at<BITS>(words[r], sub * 8 + j);
                        if (VALUE <= 1) v[r][j] = __uint_as_float(0x4B000000u | q) - (MAGIC + zero[r]);
                        else v[r][j] = tables[(VALUE == 3 ? r * SIZE : 0) + q];
                    }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (m >= M) break;
                    float xf[8];
                    load_x8(x + (size_t)m * K + c * 32 + sub * 8, xf);
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int j = 0; j < 8; ++j) part[r][m] = fmaf(v[r][j], xf[j], part[r][m]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(scale[r], part[r][m], acc[r][m]);
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

// W[n, k] in O (fp16, bf16 or fp32) for the same layouts: one thread per 32-code chunk of a row, its BITS
// words in one wide load, 32 values out in 16-byte stores. Batches too large for the GEMV (prefill) and
// float32 activations go through this and a dense matmul (cuBLAS), so the weights are never decoded on
// the CPU or kept dense between calls.
__device__ __forceinline__ __half2 pack2(const __half*, float a, float b) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ __nv_bfloat162 pack2(const __nv_bfloat16*, float a, float b) {
    return __floats2bfloat162_rn(a, b);
}

// v[0..32) stored at p (64-byte aligned) as O: four 16-byte stores for fp16 / bf16, eight for fp32.
template <typename O>
__device__ __forceinline__ void store_vec(O* p, const float* v) {
    if constexpr (sizeof(O) == 4) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            reinterpret_cast<float4*>(p)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    } else {
        uint4 out[4];
        auto* pairs = reinterpret_cast<decltype(pack2(p, 0.f, 0.f))*>(out);
#pragma unroll
        for (int i = 0; i < 16; ++i) pairs[i] = pack2(p, v[2 * i], v[2 * i + 1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) reinterpret_cast<uint4*>(p)[i] = out[i];
    }
}

template <typename O, int VALUE, int BITS>
__global__ void __launch_bounds__(256)
quant_dequant(const uint8_t* __restrict__ codes, const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
              const float* __restrict__ lut, O* __restrict__ w, int N, int K, int group_size, int groups,
              int zero_row_bytes, int rows_per_table) {
    constexpr int SIZE = 1 << BITS;
    const int chunks = K / 32;
    const size_t index = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (size_t)N * chunks) return;
    const int row = index / chunks, c = index % chunks, g = c * 32 / group_size;
    uint32_t words[BITS];
    load_words<BITS>(codes + (size_t)row * (K / 8 * BITS) + c * 4 * BITS, words);
    float scale = 1.f, zero = SIZE / 2;
    if (VALUE != 3) scale = __half2float(scales[(size_t)row * groups + g]);
    if (VALUE == 0) zero = (float)packed_field(zeros + (size_t)row * zero_row_bytes, g, BITS);
    const float* table = lut + (VALUE == 3 ? (size_t)(row / rows_per_table) * SIZE : 0);
    float v[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        uint32_t q = code_at<BITS>(words, j);
        v[j] = VALUE <= 1 ? ((float)q - zero) * scale : VALUE == 2 ? table[q] * scale : table[q];
    }
    store_vec(w + (size_t)row * K + c * 32, v);
}
