// Helpers shared by the compressed-weight kernels (included by compressed_gemv.cu and quant_gemv.cu).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifdef __CUDACC_RTC__  // NVRTC (CuPy) has no C library headers
typedef unsigned char uint8_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// `bits`-bit field number `index` of a row-packed byte stream (fields may straddle bytes; bits <= 8).
// The stream must have one readable byte after the field (buffers carry 8 bytes of padding).
__device__ __forceinline__ uint32_t packed_field(const uint8_t* row, int index, int bits) {
    int bit = index * bits;
    const uint8_t* p = row + (bit >> 3);
    uint32_t window = p[0] | ((uint32_t)p[1] << 8);
    return (window >> (bit & 7)) & ((1u << bits) - 1u);
}

__device__ __forceinline__ float warp_sum(float s) {
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}
