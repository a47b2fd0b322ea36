"""Formats of clustered weights: look-up tables + indices, and dense-and-sparse outliers.

``PalettizedWeight`` (the coremltools / eDKM "palettization" layout): every weight is a ``bits``-bit
index into a table of ``2^bits`` centroids. One table serves ``rows_per_table`` consecutive output
channels: all of them (per tensor), one (per channel) or a group of channels.

``OutlierWeight`` (SqueezeLLM's dense-and-sparse decomposition): any inner format plus a few
weights kept exactly in float16 in a compressed-sparse-row side matrix, which replace the inner
format's values at their positions.
"""

from __future__ import annotations

import torch

from .formats import WeightFormat, format_from_saved, register_format
from .packing import pack_rows, unpack_rows

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
        return {"kind": self.kind, "shape": list(self.shape), "bits": self.bits,
                "rows_per_table": self.rows_per_table}

    @classmethod
    def from_saved(cls, meta, tensors):
        return cls(tensors["indices"], tensors["table"], tensors.get("table_scale"), meta["bits"],
                   meta["rows_per_table"], meta["shape"])

    def describe(self):
        rows = self.shape[0]
        per = "tensor" if self.rows_per_table >= rows else "channel" if self.rows_per_table == 1 \
            else f"{self.rows_per_table} channels"
        table = " int8 table" if self.table_scale is not None else ""
        return f"{self.bits}-bit palette per {per}{table}"


def _index_dtype(limit: int) -> torch.dtype:
    """The smallest unsigned dtype safetensors holds for integers below ``limit``."""
    return torch.uint8 if limit <= (1 << 8) else torch.uint16 if limit <= (1 << 16) else torch.int32


@register_format
class OutlierWeight(WeightFormat):
    """An inner format with some weights replaced by exact float16 values, stored row by row:
    ``counts`` ``[out]`` (outliers per row), ``columns`` ``[nnz]`` and ``values`` float16 ``[nnz]``;
    counts and columns take the smallest of uint8 / uint16 / int32 that holds them."""

    kind = "outliers"

    def __init__(self, inner: WeightFormat, counts, columns, values):
        self.inner, self.shape = inner, inner.shape
        self.counts, self.columns, self.values = counts, columns, values

    @classmethod
    def from_mask(cls, inner: WeightFormat, w: torch.Tensor, outlier: torch.Tensor) -> OutlierWeight:
        """Keep ``w`` exactly where ``outlier[out, in]`` is True (row-major order)."""
        rows, cols = outlier.nonzero(as_tuple=True)
        counts = outlier.sum(1)
        counts = counts.to(_index_dtype(int(counts.max()) + 1 if counts.numel() else 1))
        return cls(inner, counts, cols.to(_index_dtype(outlier.shape[1])), w[rows, cols].half())

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.counts.long())
        return rows, self.columns.long()

    def outlier_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[self.positions()] = True
        return mask

    def dequantize(self):
        w = self.inner.dequantize()
        w[self.positions()] = self.values.float()
        return w

    def tensors(self):
        t = {"counts": self.counts, "columns": self.columns, "values": self.values}
        t.update({f"inner.{k}": v for k, v in self.inner.tensors().items()})
        return t

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape), "outliers": int(self.values.numel()),
                "inner": self.inner.meta()}

    @classmethod
    def from_saved(cls, meta, tensors):
        inner = {k[len("inner."):]: v for k, v in tensors.items() if k.startswith("inner.")}
        return cls(format_from_saved(meta["inner"], inner), tensors["counts"], tensors["columns"],
                   tensors["values"])

    def describe(self):
        share = self.values.numel() / self.numel
        return f"{self.inner.describe()} + {share:.2%} fp16 outliers"
