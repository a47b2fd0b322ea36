"""Palettized weights (the coremltools / eDKM "palettization" layout): every weight is a ``bits``-bit
index into a table of ``2^bits`` centroids. One table serves ``rows_per_table`` consecutive output
channels: all of them (per tensor), one (per channel) or a group of channels.
"""

from __future__ import annotations

import torch

from ..kernels.plan import LUT, ValuePlan, empty_dims
from ..packing import pack_rows, packed_row_bytes, unpack_rows
from .base import IntegerGrid, LayoutError, WeightFormat, register_format
from .onnx_custom import lut_matmul
from .onnx_ops import TensorProto, as_float, torch_initializer, unpack_codes

TABLE_DTYPES = ("float16", "int8")


def quantize_table(table: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A table ``[T, k]`` as stored: float16, or int8 with one float16 scale per table."""
    if dtype == "float16":
        return table.half(), None
    scale = (table.abs().amax(1) / 127).clamp_min(1e-8).half()
    return torch.round(table / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8), scale


def stored_table(table: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values a table takes after storage rounding (what codes must be chosen against)."""
    q, scale = quantize_table(table, dtype)
    return q.float() if scale is None else q.float() * scale.float().unsqueeze(1)


@register_format
class PalettizedWeight(WeightFormat):
    """``indices`` uint8 ``[out, ceil(in*bits/8)]`` (row-packed), ``table`` ``[tables, 2^bits]`` in
    float16 (or int8 + ``table_scale`` float16 ``[tables]``); row ``r`` uses table ``r // rows_per_table``."""

    kind = "palette"

    def __init__(self, indices, table, table_scale, bits: int, rows_per_table: int, shape):
        self.indices, self.table, self.table_scale = indices, table, table_scale
        self.bits, self.rows_per_table, self.shape = bits, rows_per_table, tuple(shape)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, table: torch.Tensor, bits: int, rows_per_table: int,
                   table_dtype: str = "float16") -> PalettizedWeight:
        q, scale = quantize_table(table, table_dtype)
        return cls(pack_rows(codes.to(torch.uint8), bits), q, scale, bits, rows_per_table, codes.shape)

    def tables(self) -> torch.Tensor:
        """Float32 tables ``[tables, 2^bits]``."""
        t = self.table.float()
        return t if self.table_scale is None else t * self.table_scale.float().unsqueeze(1)

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.indices, self.bits, self.shape[1])

    def row_tables(self) -> torch.Tensor:
        """The table of every output row ``[out, 2^bits]``."""
        return self.tables()[torch.arange(self.shape[0]) // self.rows_per_table]

    def dequantize(self):
        return self.row_tables().gather(1, self.codes().long())

    def tensors(self):
        t = {"indices": self.indices, "table": self.table}
        if self.table_scale is not None:
            t["table_scale"] = self.table_scale
        return t

    def meta(self):
        table_dtype = "int8" if self.table_scale is not None else "float16"
        return {"kind": self.kind, "shape": list(self.shape), "bits": self.bits,
                "rows_per_table": self.rows_per_table, "table_dtype": table_dtype}

    @classmethod
    def from_saved(cls, meta, tensors):
        return cls(tensors["indices"], tensors["table"], tensors.get("table_scale"), meta["bits"],
                   meta["rows_per_table"], meta["shape"])

    @classmethod
    def layout(cls, meta):
        out, k = meta["shape"]
        bits, per = int(meta["bits"]), int(meta["rows_per_table"])
        tables = -(-out // per)
        t = {"indices": ((torch.uint8,), (out, packed_row_bytes(k, bits))),
             "table": ((torch.int8 if meta["table_dtype"] == "int8" else torch.float16,), (tables, 1 << bits))}
        if meta["table_dtype"] == "int8":
            t["table_scale"] = ((torch.float16,), (tables,))
        return t

    def check_values(self):
        if not torch.isfinite(self.tables()).all():
            raise LayoutError("the look-up table holds inf or nan")

    def describe(self):
        rows = self.shape[0]
        per = "tensor" if self.rows_per_table >= rows else "channel" if self.rows_per_table == 1 \
            else f"{self.rows_per_table} channels"
        table = " int8 table" if self.table_scale is not None else ""
        return f"{self.bits}-bit palette per {per}{table}"

    def kernel_values(self, kept):
        dims = empty_dims()
        dims.update(bits=self.bits, row_bytes=self.indices.shape[1], rows_per_table=self.rows_per_table)
        return ValuePlan(LUT, dims, {"codes": self.indices, "lut": self.tables().reshape(-1)})

    def int8_grid(self) -> IntegerGrid | None:
        """With int8 tables every weight is ``table_scale * q``, q an int8 table entry: exactly a symmetric
        8-bit grid (code ``q + 128``, one scale per row), which onnxruntime's 8-bit kernel reads. None with
        float16 tables (no grid holds arbitrary float16 centroids exactly)."""
        if self.table_scale is None:
            return None
        rows = torch.arange(self.shape[0]) // self.rows_per_table
        codes = (self.table.to(torch.int16)[rows].gather(1, self.codes().long()) + 128).to(torch.uint8)
        zeros = torch.full((self.shape[0], 1), 128, dtype=torch.uint8)
        return IntegerGrid(codes, self.table_scale[rows].unsqueeze(1), zeros, 8, self.shape[1], True)

    def onnx_matmul(self, lowering, x, name):
        """The look-up kernel on the stored codes and table (``onnx_custom``); without it, int8 tables run as their
        exact 8-bit grid (:meth:`int8_grid`) and float16 tables are decoded in the graph."""
        rows = torch.arange(self.shape[0]) // self.rows_per_table
        scale = None if self.table_scale is None else self.table_scale[rows]
        y = lut_matmul(lowering, x, name, self.indices, self.table, scale, self.bits, 1, self.rows_per_table,
                       self.shape)
        if y is not None:
            return f"LutMatMul {self.describe()}", y
        grid = self.int8_grid()
        if grid is None:
            return None
        lowered = lowering.grid_matmul(x, grid, self.shape, name)
        return None if lowered is None else (f"{lowered[0]}, int8-table palette as its 8-bit grid", lowered[1])

    def onnx_weight(self, g, prefix):
        """Indices unpacked from their bytes, offset to their row's table, gathered from the flat tables."""
        rows, cols = self.shape
        codes = unpack_codes(g, torch_initializer(g, f"{prefix}.indices", self.indices), rows, cols, self.bits,
                             TensorProto.INT32)
        table = as_float(g, f"{prefix}.table", self.table)
        if self.table_scale is not None:
            scale = g.op("Unsqueeze", as_float(g, f"{prefix}.table_scale", self.table_scale), g.const([1]))
            table = g.op("Mul", table, scale)
        size = 1 << self.bits
        offsets = g.op("Cast", g.op("Unsqueeze", g.arange(rows, self.rows_per_table, size), g.const([1])),
                       to=TensorProto.INT32)
        return g.op("Gather", g.op("Reshape", table, g.const([-1])), g.op("Add", codes, offsets))
