"""Compressed matmuls on the GPU: launch plans that each format builds (``plan``), and their launch
through CuPy raw CUDA kernels with a torch fallback (``launch``)."""

from .launch import (
    CUDA_DIR,
    CUDA_TYPES,
    OUT_TYPES,
    QUANT_TILES,
    SOURCES,
    compressed_matmul,
    cupy_available,
    dequantize,
    kmeans_assign,
)
from .plan import (
    COL_DENSE,
    COL_NM,
    DENSE,
    GRID,
    INT_ASYM,
    INT_SYM,
    LUT,
    QUANT_BITS,
    VLUT,
    KernelPlan,
    ValuePlan,
    decodable,
    emulate,
    kernel_plan,
    takes_fast_path,
)

__all__ = ["CUDA_DIR", "CUDA_TYPES", "OUT_TYPES", "QUANT_TILES", "SOURCES", "compressed_matmul", "cupy_available",
           "dequantize", "kmeans_assign", "COL_DENSE", "COL_NM", "DENSE", "GRID", "INT_ASYM", "INT_SYM", "LUT",
           "QUANT_BITS", "VLUT", "KernelPlan", "ValuePlan", "decodable", "emulate", "kernel_plan", "takes_fast_path"]
