"""Pruned weights: which positions are kept (a bitmap, or N:M indices), and the kept values in any format."""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.plan import COL_DENSE, COL_NM, KernelPlan
from ..packing import pack_rows, packed_row_bytes, unpack_rows
from .base import (
    FORMATS,
    IntegerGrid,
    LayoutError,
    NoKernel,
    NotAnIntegerGrid,
    WeightFormat,
    format_from_saved,
    inner_tensors,
    prefixed,
    register_format,
)
from .onnx_ops import TensorProto, scalar, torch_initializer, unpack_codes


def nm_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4); None or "unstructured" -> None."""
    if pattern in (None, "unstructured"):
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def compact(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept values of ``w`` row by row, ``[rows, kept per row]`` (every row keeps as many)."""
    keep = int(mask[0].sum())
    return w[mask].reshape(w.shape[0], keep)


@register_format
class SparseWeight(WeightFormat):
    """A pruned weight: which positions are kept, and the kept values in any inner format.

    Every row keeps the same number of weights, so the kept values form a regular matrix
    ``[rows, kept]`` (row-major order) stored by ``values`` (dense fp16, quantized, clustered).
    Positions: unstructured -> a bitmap, 1 bit per weight (``mask`` ``[rows, ceil(in/8)]``);
    N:M -> for every kept value its index inside its group of M, ``log2(M)`` bits each
    (``indices``, row-packed), e.g. 2:4 costs 1 bit per original weight.
    """

    kind = "sparse"
    # the float weight before pruning, kept while its block is compressed so that a pass refining the mask
    # (DSnoT) can use it; never stored
    dense_origin: torch.Tensor | None = None

    def __init__(self, mask: torch.Tensor, values: WeightFormat, pattern: str | None = None):
        self.shape = (int(mask.shape[0]), int(mask.shape[1]))
        self._mask = mask.bool()
        self.values = values
        self.pattern = pattern or "unstructured"

    @property
    def mask(self):
        return self._mask

    def drop_block_scratch(self) -> None:
        self.dense_origin = None

    @property
    def kept_per_row(self) -> int:
        return int(self._mask[0].sum())

    def dequantize(self):
        dense = torch.zeros(self.shape)
        dense[self._mask] = self.values.dequantize().flatten()
        return dense

    def position_tensors(self) -> dict[str, torch.Tensor]:
        """The stored positions: ``mask`` (bitmap) or ``indices`` (N:M, row-packed)."""
        nm = nm_pattern(self.pattern)
        if nm is None:
            return {"mask": pack_rows(self._mask.to(torch.uint8), 1)}
        n, m = nm
        rows, k = self.shape
        within = torch.arange(k).remainder(m).expand(rows, k)
        idx = within[self._mask].reshape(rows, -1)
        return {"indices": pack_rows(idx.to(torch.uint8), (m - 1).bit_length())}

    def tensors(self):
        t = self.position_tensors()
        t.update({f"values.{k}": v for k, v in self.values.tensors().items()})
        return t

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape), "pattern": self.pattern,
                "kept_per_row": self.kept_per_row, "values": self.values.meta()}

    @classmethod
    def from_saved(cls, meta, tensors):
        rows, k = meta["shape"]
        values = format_from_saved(meta["values"], inner_tensors(tensors, "values"), verify=False)
        nm = nm_pattern(meta["pattern"])
        if nm is None:
            mask = unpack_rows(tensors["mask"], 1, k).bool()
        else:
            n, m = nm
            idx = unpack_rows(tensors["indices"], (m - 1).bit_length(), meta["kept_per_row"]).long()
            cols = (torch.arange(meta["kept_per_row"]) // n * m).expand(rows, -1) + idx
            mask = torch.zeros(rows, k, dtype=torch.bool).scatter_(1, cols, True)
        return cls(mask, values, meta["pattern"])

    @classmethod
    def layout(cls, meta):
        rows, k = meta["shape"]
        kept, inner = int(meta["kept_per_row"]), meta["values"]
        if list(inner["shape"]) != [rows, kept] or not 0 <= kept <= k:
            raise ValueError(f"kept values {inner['shape']} for {kept} kept of {k} per row")
        nm = nm_pattern(meta["pattern"])
        if nm is None:
            positions = {"mask": ((torch.uint8,), (rows, packed_row_bytes(k, 1)))}
        else:
            n, m = nm
            if k % m or kept != k // m * n:
                raise ValueError(f"{kept} kept of {k} is not {n}:{m}")
            positions = {"indices": ((torch.uint8,), (rows, packed_row_bytes(kept, (m - 1).bit_length())))}
        return {**positions, **prefixed(FORMATS[inner["kind"]].layout(inner), "values")}

    def check_values(self):
        self.values.check_values()  # its layout was checked with this format's (prefixed)
        kept = self._mask.sum(1)
        if not bool((kept == self.kept_per_row).all()):
            raise LayoutError(f"rows keep {int(kept.min())}..{int(kept.max())} weights, not {self.kept_per_row} each")
        nm = nm_pattern(self.pattern)
        if nm is not None and not bool((self._mask.reshape(self.shape[0], -1, nm[1]).sum(-1) == nm[0]).all()):
            raise LayoutError(f"a group of {nm[1]} does not keep exactly {nm[0]} weights (repeated indices)")

    def describe(self):
        sparsity = 1 - self._mask.float().mean().item()
        pat = self.pattern if self.pattern != "unstructured" else f"{sparsity:.0%} sparse"
        return f"{pat} + {self.values.describe()}"

    def integer_grid(self):
        """N:M only: every run of M columns keeps N weights, so a group of ``g`` kept values per row spans exactly
        the dense columns of ``g * M / N`` inputs, and a pruned weight is its group's zero point."""
        nm = nm_pattern(self.pattern)
        inner = self.values.integer_grid()
        if nm is None:
            raise NotAnIntegerGrid(f"{self.describe()}: unstructured sparsity has no dense group layout")
        n, m = nm
        if inner.group_size % n:  # a group boundary would split the kept weights of one run of M
            raise NotAnIntegerGrid(f"{self.describe()}: its groups of kept values do not span whole dense groups")
        group = inner.group_size * m // n
        rows, cols = self.shape
        zero_at = inner.zeros[:, torch.arange(cols) // group]
        codes = zero_at.clone()
        codes[self._mask] = inner.codes.flatten()
        return IntegerGrid(codes, inner.scales, inner.zeros, inner.bits, group, inner.symmetric, self.pattern)

    def kernel_values(self, kept):
        raise NoKernel("a sparse layout inside another format")

    def kernel_plan(self):
        """The kept values' plan, walked over the bitmap (unstructured) or the N:M indices."""
        rows, cols = self.shape
        kept = self.kept_per_row
        try:
            v = self.values.kernel_values(kept)
        except NoKernel:
            return None
        kept_cols = self._mask.nonzero()[:, 1].reshape(rows, kept)  # compacted column -> column of the activations
        outliers = v.csr(rows, kept_cols)
        nm = nm_pattern(self.pattern)
        if nm is None:
            return KernelPlan(v.mode, COL_DENSE, rows, cols, kept, v.dims, v.buffers,
                              bitmap=pack_rows(self._mask.to(torch.uint8), 1), outliers=outliers)
        n, m = nm
        index = self.position_tensors()["indices"]
        v.dims.update(nm_keep=n, nm_group=m, index_bits=(m - 1).bit_length(), index_row_bytes=index.shape[1])
        v.buffers["nm_index"] = index
        return KernelPlan(v.mode, COL_NM, rows, cols, kept, v.dims, v.buffers, outliers=outliers)

    def onnx_matmul(self, lowering, x, name):
        """Our sparse operator (``onnx_custom``) on the positions as a bitmap (N:M indices become their bitmap: the
        same bytes for 2:4), never densified, and the kept values as stored: 16-bit floats, or an integer grid's
        codes, scales and zero points. (N:M over an integer grid whose groups span whole dense groups runs as dense
        codes instead, half the bytes of the bitmap and the kept codes at 2:4: see :meth:`integer_grid`.)"""
        from .dense import DenseWeight
        from .grid import QuantizedWeight
        from .onnx_custom import sparse_matmul

        values = self.values
        bitmap = pack_rows(self._mask.to(torch.uint8), 1)
        if isinstance(values, DenseWeight) and values.weight.dtype in (torch.float16, torch.bfloat16):
            stored = {"values": values.weight}
        elif isinstance(values, QuantizedWeight) and values.spec.grid == "int":
            try:
                self.integer_grid()
                return None
            except NotAnIntegerGrid:
                stored = values.tensors()
        else:
            return None
        grid = values.spec if isinstance(values, QuantizedWeight) else None
        y = sparse_matmul(lowering, x, name, bitmap, stored, self.shape, self.kept_per_row, grid)
        return None if y is None else (f"SparseMatMul {self.describe()}", y)

    def onnx_weight(self, g, prefix):
        """Kept values scattered into zeros at the positions of the bitmap (unstructured) or of the
        N:M indices, in row-major order as ``SparseWeight`` stores them."""
        rows, cols = self.shape
        kept = self.kept_per_row
        values = g.op("Reshape", self.values.onnx_weight(g, f"{prefix}.values"), g.const([-1]))
        positions = self.position_tensors()
        nm = nm_pattern(self.pattern)
        if nm is None:
            bitmap = unpack_codes(g, torch_initializer(g, f"{prefix}.mask", positions["mask"]), rows, cols, 1,
                                  TensorProto.BOOL)
            flat = g.op("Reshape", g.op("NonZero", g.op("Reshape", bitmap, g.const([-1]))), g.const([-1]))
        else:
            n, m = nm
            idx = unpack_codes(g, torch_initializer(g, f"{prefix}.indices", positions["indices"]), rows, kept,
                               (m - 1).bit_length())
            group_start = g.op("Add", g.op("Unsqueeze", g.arange(kept, n, m), g.const([0])),
                               g.op("Unsqueeze", g.arange(rows, 1, cols), g.const([1])))
            flat = g.op("Reshape", g.op("Add", idx, group_start), g.const([-1]))
        zeros = g.op("ConstantOfShape", g.const([rows * cols]), value=scalar(0.0, np.float32))
        return g.op("Reshape", g.op("ScatterElements", zeros, flat, values, axis=0), g.const([rows, cols]))
