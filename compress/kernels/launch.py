"""Launching the CuPy raw CUDA kernels (``cuda/*.cu``) on a format's plan, with a torch fallback.

Importing this module never needs CuPy or a GPU. :func:`compressed_matmul` returns None when no
kernel applies (no CuPy, no GPU, float32 activations, or a format without a kernel) and
``CompressedLinear`` then takes the torch reference path (dequantize + matmul). The plan of a format
comes from the format itself (``compress.kernels.plan``); device copies of its buffers are made once
per format object and kept while it lives.
"""

from __future__ import annotations

import weakref
from functools import cache, lru_cache
from pathlib import Path

import torch

from ..packing import unpack_rows
from .plan import COL_NM, DENSE, DIMS, DTYPE_NAMES, VLUT, KernelPlan, decodable, takes_fast_path, vector_values

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = ("quant_gemv.cu", "compressed_gemv.cu", "kmeans_assign.cu")
MAX_M = 16            # activation rows per launch (cuda/compressed_gemv.cu)
WARPS_PER_BLOCK = 4
BUFFERS = ("codes", "scales", "zeros", "lut", "values", "nm_index")


@lru_cache(maxsize=1)
def cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, no driver, no device: all mean "use the torch path"
        return False


@cache
def cuda_module(source: str):
    """The compiled CuPy module of ``cuda/<source>`` (compiled once per process, cached by CuPy on disk)."""
    import cupy

    return cupy.RawModule(code=(CUDA_DIR / source).read_text(), options=NVRTC_OPTIONS)


NVRTC_OPTIONS = ("-std=c++17", f"-I{CUDA_DIR}")
QUANT_TILES = (1, 2, 4, 8, 16)     # activation rows per launch it is compiled for
CUDA_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
ROWS_PER_BLOCK = {1: 4, 2: 4, 4: 4, 8: 2, 16: 2}  # tile -> output rows per block (registers: rows x tile sums)
# Larger batches decode W on the GPU, then a dense matmul (cuBLAS). Measured on an H100 (bench/kernels.py):
# decode + cuBLAS costs about 2x fp16's matmul at any batch; quant_gemv beats that up to 8 rows, the
# one-warp-per-row sparse kernel up to about 32 (the sparse decode scatters positions with torch: ~425 us
# for 4096x4096, 2:4 or bitmap).
GEMV_MAX_ROWS = 8
SPARSE_GEMV_MAX_ROWS = 32
OUT_TYPES = {**CUDA_TYPES, torch.float32: "float"}


@cache
def quant_kernel(dtype: torch.dtype, value_mode: int, bits: int, rows: int, tile: int):
    """One instance of the ``quant_gemv`` template (compiled on first use, cached by CuPy on disk)."""
    import cupy

    name = f"quant_gemv<{CUDA_TYPES[dtype]}, {value_mode}, {bits}, {rows}, {tile}>"
    module = cupy.RawModule(code=(CUDA_DIR / "quant_gemv.cu").read_text(), options=NVRTC_OPTIONS,
                            name_expressions=[name])
    return module.get_function(name)


@cache
def dequant_kernel(dtype: torch.dtype, value_mode: int, bits: int):
    """One instance of the ``quant_dequant`` template (W in ``dtype``: fp16, bf16 or fp32)."""
    import cupy

    name = f"quant_dequant<{OUT_TYPES[dtype]}, {value_mode}, {bits}>"
    module = cupy.RawModule(code=(CUDA_DIR / "quant_gemv.cu").read_text(), options=NVRTC_OPTIONS,
                            name_expressions=[name])
    return module.get_function(name)


_device_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def device_plan(fmt, device) -> KernelPlan | None:
    plan = _device_plans.get(fmt, False)
    if plan is False:
        plan = fmt.kernel_plan()
        _device_plans[fmt] = plan
    if plan is None:
        return None
    if device not in plan.device_buffers:
        pad = torch.zeros(8, dtype=torch.uint8)  # kernels may read 8 bytes past a row (see the .cu)

        def put(t):
            return torch.cat([t.reshape(-1), pad]).to(device) if t.dtype == torch.uint8 else t.contiguous().to(device)

        dummy = torch.zeros(16, dtype=torch.uint8, device=device)
        bufs = {name: put(plan.buffers[name]) if name in plan.buffers else dummy for name in BUFFERS}
        bufs["dims"] = torch.tensor([plan.dims[k] for k in DIMS], dtype=torch.int32, device=device)
        if plan.bitmap is not None:
            bufs["bitmap"] = put(plan.bitmap)
        if plan.outliers is not None:
            bufs["outliers"] = tuple(t.to(device) for t in plan.outliers)
        plan.device_buffers[device] = bufs
    return plan


def _args(*args) -> tuple:
    """Kernel arguments for CuPy: a torch tensor goes as its device pointer (CuPy takes no torch tensors)."""
    import numpy as np

    return tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)


def _torch_stream(device):
    """CuPy's handle on torch's current stream, so kernels queue behind torch's work (and into its graphs)."""
    import cupy

    handle = torch.cuda.current_stream(device).cuda_stream
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(torch.cuda.current_stream(device))
        except Exception:  # noqa: BLE001 - older CuPy: fall back to the raw handle
            pass
    return cupy.cuda.ExternalStream(handle)


def compressed_matmul(fmt, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ W.T`` for a compressed weight and fp16/bf16 activations on a GPU, or None (use torch).
    Up to GEMV_MAX_ROWS activation rows (SPARSE_GEMV_MAX_ROWS for sparse layouts) the weights are decoded
    inside a GEMV; larger batches decode W on the GPU once and multiply with cuBLAS."""
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and cupy_available()):
        return None
    plan = device_plan(fmt, x.device)
    if plan is None:
        return None
    x2 = x.reshape(-1, plan.cols)
    total = x2.shape[0]
    if decodable(plan) and total > (GEMV_MAX_ROWS if takes_fast_path(plan) else SPARSE_GEMV_MAX_ROWS):
        y = x2 @ decode_plan(plan, x.device, x.dtype).T
        return y.reshape(*x.shape[:-1], plan.rows)
    import numpy as np

    bufs = plan.device_buffers[x.device]
    x2 = x2.contiguous()
    y = torch.empty(total, plan.rows, dtype=x.dtype, device=x.device)
    module = cuda_module("compressed_gemv.cu")
    gemv = module.get_function(plan.kernel(x.dtype))
    grid, block = ((plan.rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,), (WARPS_PER_BLOCK * 32,)
    weight = [bufs[name] for name in BUFFERS] + [bufs["dims"]]
    n, k = np.int32(plan.rows), np.int32(plan.cols)
    fast = takes_fast_path(plan) and x2.data_ptr() % 16 == 0
    with _torch_stream(x.device):
        for start in range(0, total, MAX_M):
            xs, ys = x2[start:start + MAX_M], y[start:start + MAX_M]
            m = np.int32(xs.shape[0])
            if fast:
                tile = next(t for t in QUANT_TILES if t >= xs.shape[0])
                rows = ROWS_PER_BLOCK[tile]
                kernel = quant_kernel(x.dtype, plan.value_mode, plan.dims["bits"], rows, tile)
                kernel(((plan.rows + rows - 1) // rows,), (128,),
                       _args(xs, bufs["codes"], bufs["scales"], bufs["zeros"], bufs["lut"], ys, m, n, k,
                             *_layout_args(plan)))
            elif plan.bitmap is not None:
                gemv(grid, block, _args(xs, *weight, bufs["bitmap"], np.int32(plan.bitmap.shape[1]), ys, m, n, k))
            else:
                gemv(grid, block, _args(xs, *weight, ys, m, n, k, np.int32(plan.kept)))
            if plan.outliers is not None:
                add = module.get_function("csr_add_" + DTYPE_NAMES[x.dtype])
                add(grid, block, _args(xs, *bufs["outliers"], ys, m, n, k))
    return y.reshape(*x.shape[:-1], plan.rows)


def _layout_args(plan: KernelPlan) -> tuple:
    import numpy as np

    return tuple(np.int32(plan.dims[name]) for name in ("group_size", "groups", "zero_row_bytes", "rows_per_table"))


def dequantize(fmt, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight ``[out, in]`` in ``dtype`` (fp16, bf16 or fp32) decoded on the GPU, or None when
    no GPU kernel decodes this format (the caller dequantizes with torch)."""
    device = torch.device(device)
    if not (device.type == "cuda" and dtype in OUT_TYPES and cupy_available()):
        return None
    plan = device_plan(fmt, device)
    if plan is None or not decodable(plan):
        return None
    return decode_plan(plan, device, dtype)


def decode_plan(plan: KernelPlan, device, dtype: torch.dtype) -> torch.Tensor:
    """W ``[out, in]`` of a decodable plan in ``dtype`` on ``device``: kept values (one thread per 32 codes),
    scattered to their columns when sparse, outliers added."""
    bufs = plan.device_buffers[device]
    decoded = torch.float32 if plan.outliers is not None else dtype  # outliers: correct before rounding
    values = _decode_values(plan, bufs, device, decoded)
    d = plan.dims
    if plan.bitmap is not None:
        mask = unpack_rows(bufs["bitmap"][:plan.bitmap.numel()].view(plan.bitmap.shape), 1, plan.cols).bool()
        w = torch.zeros(plan.rows, plan.cols, dtype=decoded, device=device).masked_scatter_(mask, values)
    elif plan.col_mode == COL_NM:
        index = bufs["nm_index"][:plan.buffers["nm_index"].numel()].view(plan.buffers["nm_index"].shape)
        k = torch.arange(plan.kept, device=device)
        columns = (k // d["nm_keep"] * d["nm_group"])[None, :] + unpack_rows(index, d["index_bits"], plan.kept).long()
        w = torch.zeros(plan.rows, plan.cols, dtype=decoded, device=device).scatter_(1, columns, values)
    else:
        w = values
    if plan.outliers is None:
        return w
    row_start, cols, delta = bufs["outliers"]
    rows = torch.repeat_interleave(torch.arange(plan.rows, device=device), (row_start[1:] - row_start[:-1]).long())
    return w.index_put_((rows, cols.long()), delta, accumulate=True).to(dtype)


def _decode_values(plan: KernelPlan, bufs: dict, device, dtype: torch.dtype) -> torch.Tensor:
    """The kept values ``[out, kept]`` in ``dtype`` (vector code books: the weights ``[out, in]``, gathered)."""
    import numpy as np

    if plan.value_mode == DENSE:
        return bufs["values"].reshape(plan.rows, plan.kept).to(dtype)
    if plan.value_mode == VLUT:
        codes = unpack_rows(bufs["codes"][:plan.buffers["codes"].numel()].view(plan.buffers["codes"].shape),
                            plan.dims["bits"], plan.kept)
        return vector_values(plan, codes, bufs["lut"], bufs["scales"]).to(dtype)
    w = torch.empty(plan.rows, plan.kept, dtype=dtype, device=device)
    threads = plan.rows * (plan.kept // 32)
    kernel = dequant_kernel(dtype, plan.value_mode, plan.dims["bits"])
    with _torch_stream(device):
        kernel(((threads + 255) // 256,), (256,),
               _args(bufs["codes"], bufs["scales"], bufs["zeros"], bufs["lut"], w, np.int32(plan.rows),
                     np.int32(plan.kept), *_layout_args(plan)))
    return w


def kmeans_assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor | None:
    """Nearest sorted centroid per value on the GPU (``values`` [T, n], ``centroids`` [T, k] float32),
    uint8 codes; None when the kernel does not apply."""
    if not (values.is_cuda and cupy_available() and centroids.shape[1] <= 256):
        return None
    import numpy as np

    values, centroids = values.float().contiguous(), centroids.float().contiguous()
    t, n = values.shape
    codes = torch.empty(t, n, dtype=torch.uint8, device=values.device)
    kernel = cuda_module("kmeans_assign.cu").get_function("kmeans_assign")
    with _torch_stream(values.device):
        kernel((min(64, (n + 255) // 256), t), (256,), _args(values, centroids, codes, np.int32(n),
                                                               np.int32(centroids.shape[1])))
    return codes
