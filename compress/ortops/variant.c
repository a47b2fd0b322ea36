/* This build's kernels (KERNEL_VARIANT: avx2 or avx512), for ops.c to choose from (ops.h). */
#include "ops.h"

const Kernels VARIANT(kernels) = {
    .lut_decode = decode_lut_row,
    .half_decode = decode_half_row,
    .sparse_decode = decode_sparse_row,
    .lut_dots = lut_row_dots,
    .half_dots = half_row_dots,
    .sparse_dots = sparse_row_dots,
    .grid_decode = decode_grid_row,
    .grid_dots = grid_row_dots,
    .grid_int8_dots = grid_int8_dots,
    .matmul = matmul_rows,
    .silu_gate = silu_gate_rows,
    .outlier_add = outlier_add_rows,
};
