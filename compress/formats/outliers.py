"""Dense-and-sparse outliers (SqueezeLLM): any inner format plus a few weights kept exactly in float16 in a
compressed-sparse-row side matrix, which replace the inner format's values at their positions.
"""

from __future__ import annotations

import numpy as np
import torch

from . import onnx_custom
from .base import (
    FORMATS,
    INDEX_TYPES,
    LayoutError,
    WeightFormat,
    format_from_saved,
    inner_tensors,
    prefixed,
    register_format,
)
from .onnx_ops import TensorProto, as_float, scalar, torch_initializer


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

    @classmethod
    def layout(cls, meta):
        inner = meta["inner"]
        if list(inner["shape"]) != list(meta["shape"]):
            raise ValueError(f"inner shape {inner['shape']} vs {meta['shape']}")
        nnz = int(meta["outliers"])
        return {"counts": (INDEX_TYPES, (meta["shape"][0],)), "columns": (INDEX_TYPES, (nnz,)),
                "values": ((torch.float16,), (nnz,)), **prefixed(FORMATS[inner["kind"]].layout(inner), "inner")}

    def check_values(self):
        self.inner.check_values()  # its layout was checked with this format's (prefixed)
        counts, cols = self.counts.long(), self.columns.long()
        if int(counts.sum()) != cols.numel():
            raise LayoutError(f"outlier counts add up to {int(counts.sum())}, {cols.numel()} are stored")
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= self.shape[1]):
            raise LayoutError(f"an outlier column lies outside 0..{self.shape[1] - 1}")
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), counts)
        if cols.numel() > 1 and not bool(((rows[1:] > rows[:-1]) | (cols[1:] > cols[:-1])).all()):
            raise LayoutError("outlier columns are not in increasing order within their rows")
        if not torch.isfinite(self.values).all():
            raise LayoutError("outlier values hold inf or nan")

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape), "outliers": int(self.values.numel()),
                "inner": self.inner.meta()}

    @classmethod
    def from_saved(cls, meta, tensors):
        inner = format_from_saved(meta["inner"], inner_tensors(tensors, "inner"), verify=False)
        return cls(inner, tensors["counts"], tensors["columns"], tensors["values"])

    def describe(self):
        share = self.values.numel() / self.numel
        return f"{self.inner.describe()} + {share:.2%} fp16 outliers"

    def kernel_values(self, kept):
        """The inner format's values, with the float32 corrections that turn them into the outliers."""
        v = self.inner.kernel_values(kept)
        r, c = self.positions()
        v.outliers = (r, c, self.values.float() - self.inner.dequantize()[r, c])
        return v

    def _onnx_rows(self, g, prefix) -> str:
        """Each outlier's row (int64 ``[nnz]``) from the stored counts: a 1 where each row's outliers end (one
        spare slot for the last row), summed up. The file holds just counts, columns and values."""
        nnz = int(self.values.numel())
        counts = g.op("Cast", torch_initializer(g, f"{prefix}.counts", self.counts), to=TensorProto.INT64)
        ends = g.op("CumSum", counts, g.const(0))
        starts = g.op("ConstantOfShape", g.const([nnz + 1]), value=scalar(0, np.int64))
        ones = g.op("ConstantOfShape", g.const([self.shape[0]]), value=scalar(1, np.int64))
        marks = g.op("ScatterElements", starts, ends, ones, axis=0, reduction="add")
        return g.op("Slice", g.op("CumSum", marks, g.const(0)), g.const([0]), g.const([nnz]), g.const([0]))

    def onnx_weight(self, g, prefix):
        """Inner weight with the CSR outliers written over it."""
        rows, cols = self.shape
        inner = g.op("Reshape", self.inner.onnx_weight(g, f"{prefix}.inner"), g.const([-1]))
        column = g.op("Cast", torch_initializer(g, f"{prefix}.columns", self.columns), to=TensorProto.INT64)
        flat = g.op("Add", g.op("Mul", self._onnx_rows(g, prefix), g.const(cols)), column)
        values = as_float(g, f"{prefix}.values", self.values)
        return g.op("Reshape", g.op("ScatterElements", inner, flat, values, axis=0), g.const([rows, cols]))

    def onnx_matmul(self, lowering, x, name):
        """The inner format's runtime operator, plus each outlier's correction (its value minus the inner value
        there, float32) times its input, added to its output: by our ``OutlierAdd`` from the stored rows, else
        gathered and scatter-added by standard ops. The weight is never decoded. None when the inner format has no
        runtime operator (the whole weight is then decoded in the graph)."""
        inner = lowering.runtime_matmul(x, self.inner, f"{name}.inner")
        if inner is None:
            return None
        g = lowering.g
        rows, cols = self.positions()
        corrections = self.values.float() - self.inner.dequantize()[rows, cols]
        added = onnx_custom.outlier_add(lowering, inner[1], x, name, self.counts, self.columns, corrections)
        if added is not None:
            return f"{inner[0]} + {self.values.numel()} outliers (OutlierAdd)", added
        column = g.op("Cast", torch_initializer(g, f"{name}.columns", self.columns), to=TensorProto.INT64)
        update = g.op("Mul", g.op("Gather", x, column, axis=-1), g.tensor(f"{name}.corrections", corrections.numpy()))
        row = g.op("Expand", self._onnx_rows(g, name), g.op("Shape", update))
        y = g.op("ScatterElements", inner[1], row, update, axis=-1, reduction="add")
        return f"{inner[0]} + {self.values.numel()} outliers (scatter-add)", y
