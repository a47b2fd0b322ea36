"""Launch plans: what the CUDA kernels of ``cuda/`` need to compute with one compressed weight.

A plan is plain torch data (value mode, column mode, an int32 ``dims`` array, byte buffers, and for
outliers a CSR correction). Each weight format builds its own plan (``WeightFormat.kernel_values`` /
``kernel_plan``), so this module knows no format. :func:`emulate` computes a plan's product in torch
the way the kernels read it, so every plan is tested on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..packing import unpack_rows

INT_ASYM, INT_SYM, GRID, LUT, DENSE, VLUT = range(6)   # value modes (cuda/compressed_gemv.cu)
COL_DENSE, COL_NM = 0, 1                         # column modes
DIMS = ("bits", "group_size", "groups", "row_bytes", "zero_row_bytes", "rows_per_table", "value_cols",
        "nm_keep", "nm_group", "index_bits", "index_row_bytes", "vector_dim")
DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16"}
QUANT_BITS = (2, 3, 4, 8)          # widths cuda/quant_gemv.cu takes


def empty_dims() -> dict[str, int]:
    return dict.fromkeys(DIMS, 0)


@dataclass
class ValuePlan:
    """How the kernels read the kept values of a format: mode, dims, buffers, and the outliers written
    over them (rows, columns in the values' own coordinates, float32 corrections) or None."""

    mode: int
    dims: dict[str, int]
    buffers: dict[str, torch.Tensor]
    outliers: tuple | None = None

    def csr(self, rows: int, columns: torch.Tensor | None = None):
        """The outliers as (row_start int32 [rows+1], cols int32, delta float32), row-major; ``columns``
        maps compacted columns to the activations' columns (sparse layouts)."""
        if self.outliers is None:
            return None
        r, c, delta = self.outliers
        if columns is not None:
            c = columns[r, c]
        order = torch.argsort(r * (int(c.max()) + 1 if c.numel() else 1) + c)
        counts = torch.bincount(r, minlength=rows)
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        return row_start.int(), c[order].int(), delta[order].float()


@dataclass
class KernelPlan:
    value_mode: int
    col_mode: int
    rows: int
    cols: int                     # K of the activations
    kept: int                     # values per row the kernel walks (K, or the kept count when sparse)
    dims: dict[str, int]
    buffers: dict[str, torch.Tensor]
    bitmap: torch.Tensor | None = None          # [N, ceil(K/8)] keep mask (unstructured sparsity)
    outliers: tuple | None = None               # (row_start int32 [N+1], cols int32, delta float32)
    device_buffers: dict = field(default_factory=dict)  # device -> buffers, filled by the launcher

    def kernel(self, dtype: torch.dtype) -> str:
        t = DTYPE_NAMES[dtype]
        if self.bitmap is not None:
            return f"bitmap_gemv_{t}_v{self.value_mode}"
        return f"gemv_{t}_v{self.value_mode}_c{self.col_mode}"


def kernel_plan(fmt) -> KernelPlan | None:
    """How the kernels compute with ``fmt``, or None when no kernel takes it (dense weights: cuBLAS)."""
    return fmt.kernel_plan()


def takes_fast_path(plan: KernelPlan) -> bool:
    """True when cuda/quant_gemv.cu serves the plan: dense columns, 2/3/4/8-bit codes, K a multiple of 32
    and whole 32-code chunks per group."""
    return (plan.col_mode == COL_DENSE and plan.bitmap is None and plan.value_mode not in (DENSE, VLUT)
            and decodable(plan))


def decodable(plan: KernelPlan) -> bool:
    """True when the GPU can decode the plan's kept values (fp16 values, vector code books, or codes the
    ``quant_dequant`` template reads: 2/3/4/8 bits, a multiple of 32 kept per row, whole 32-code chunks per group); the
    positions of sparse layouts are then scattered with torch."""
    d = plan.dims
    if plan.value_mode in (DENSE, VLUT):  # VLUT: gathered from the code books by torch on the device
        return True
    return (plan.value_mode in (INT_ASYM, INT_SYM, GRID, LUT) and plan.kept % 32 == 0 and d["bits"] in QUANT_BITS
            and d["row_bytes"] == plan.kept * d["bits"] // 8
            and (plan.value_mode == LUT or d["group_size"] % 32 == 0))


def vector_values(plan: KernelPlan, codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weights ``[out, in]`` (float32) of a VLUT plan from its unpacked codes ``[out, in/dim]``, code books and
    row scales, on their device: code j of row r holds columns ``j*dim .. j*dim+dim-1``, read from the row's book."""
    d = plan.dims
    dim, size = d["vector_dim"], 1 << d["bits"]
    table = torch.arange(plan.rows, device=codes.device) // d["rows_per_table"]
    slots = (table * size)[:, None] + codes.long()
    return lut.float().reshape(-1, dim)[slots].reshape(plan.rows, plan.cols) * scales.float().reshape(-1, 1)


def emulate(plan: KernelPlan, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` computed from a plan's buffers the way the kernels read them (float32, on CPU)."""
    d, b = plan.dims, plan.buffers
    rows, kept = plan.rows, plan.kept
    k = torch.arange(kept)
    if plan.value_mode == DENSE:
        values = b["values"].float()
    else:
        codes = unpack_rows(b["codes"], d["bits"], kept).long()
        if plan.value_mode == VLUT:
            values = vector_values(plan, codes, b["lut"], b["scales"])
            kept, k = plan.cols, torch.arange(plan.cols)
        elif plan.value_mode == LUT:
            size = 1 << d["bits"]
            values = b["lut"][(torch.arange(rows) // d["rows_per_table"] * size)[:, None] + codes]
        else:
            scale = b["scales"].float()[:, k // d["group_size"]]
            if plan.value_mode == GRID:
                values = b["lut"][codes] * scale
            elif plan.value_mode == INT_SYM:
                values = (codes - (1 << (d["bits"] - 1))) * scale
            else:
                zero = unpack_rows(b["zeros"], d["bits"], d["groups"]).float()[:, k // d["group_size"]]
                values = (codes - zero) * scale
    if plan.bitmap is not None:
        mask = unpack_rows(plan.bitmap, 1, plan.cols).bool()
        columns = mask.nonzero()[:, 1].reshape(rows, kept)
    elif plan.col_mode == COL_NM:
        index = unpack_rows(b["nm_index"], d["index_bits"], kept).long()
        columns = (k // d["nm_keep"] * d["nm_group"])[None, :] + index
    else:
        columns = k.expand(rows, kept)
    w = torch.zeros(rows, plan.cols).scatter_(1, columns, values.float())
    if plan.outliers is not None:
        row_start, cols, delta = plan.outliers
        r = torch.repeat_interleave(torch.arange(rows), (row_start[1:] - row_start[:-1]).long())
        w.index_put_((r, cols.long()), delta, accumulate=True)
    return x.float() @ w.T
