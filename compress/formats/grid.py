"""Integer and non-uniform grids: a code per weight, a float16 scale (and zero point) per group of inputs.

The grids' math lives in ``compress.quant``; this module is the stored layout and what reads it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.plan import GRID, INT_ASYM, INT_SYM, ValuePlan, empty_dims
from ..kquants import ktype
from ..packing import pack_rows, packed_row_bytes, unpack_rows
from ..quant import QuantSpec, decode, encode, fit_params, grid_values, pad_to_groups
from .base import IntegerGrid, LayoutError, NotAnIntegerGrid, WeightFormat, register_format
from .kquant import KQuantWeight
from .onnx_custom import grid_matmul
from .onnx_nf4 import nf4_matmul
from .onnx_ops import (
    FLOAT,
    TensorProto,
    as_float,
    per_group,
    torch_initializer,
    unpack_codes,
)


@register_format
class QuantizedWeight(WeightFormat):
    """Integer codes per weight, a float16 scale (and a zero point) per group of inputs.

    Stored: ``codes`` uint8 ``[out, ceil(in*bits/8)]`` (row-packed, see ``packing``),
    ``scales`` float16 ``[out, groups]``, and for asymmetric int grids ``zeros`` packed at
    ``bits`` bits ``[out, ceil(groups*bits/8)]``. The last group may be shorter than
    ``group_size`` when ``in_features`` is not a multiple of it.
    """

    kind = "quant"

    def __init__(self, codes, scales, zeros, spec: QuantSpec, shape):
        self.codes, self.scales, self.zeros = codes, scales, zeros
        self.spec, self.shape = spec, tuple(shape)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero, spec: QuantSpec):
        """Build from unpacked codes ``[out, in]`` and per-group ``scale``/``zero`` ``[out, groups]``."""
        packed_zeros = pack_rows(zero.to(torch.uint8), spec.bits) if spec.has_zeros else None
        return cls(pack_rows(codes, spec.bits), scale.half(), packed_zeros, spec, codes.shape)

    def unpacked(self):
        """(codes [out, in] uint8, scale [out, groups] float32, zero [out, groups] float32 | None)."""
        out, k = self.shape
        groups = self.spec.groups(k)
        codes = unpack_rows(self.codes, self.spec.bits, k)
        scale = self.scales.float()
        if self.spec.has_zeros:
            zero = unpack_rows(self.zeros, self.spec.bits, groups).float()
        elif self.spec.grid == "int":
            zero = torch.full_like(scale, float((self.spec.maxq + 1) // 2))
        else:
            zero = None
        return codes, scale, zero

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """The formats of consecutive row blocks (rows are packed independently, so this is exact)."""
        parts, start = [], 0
        for n in sizes:
            zeros = self.zeros[start:start + n] if self.zeros is not None else None
            parts.append(QuantizedWeight(self.codes[start:start + n], self.scales[start:start + n], zeros,
                                         self.spec, (n, self.shape[1])))
            start += n
        return parts

    def dequantize(self):
        return self._decode(self.codes, self.scales, self.zeros)

    def take_rows(self, rows):
        """Only the asked rows are unpacked and decoded (rows are packed independently)."""
        rows = rows.to(torch.long)
        return self._decode(self.codes[rows], self.scales[rows], self.zeros[rows] if self.zeros is not None else None)

    def _decode(self, packed, scales, zeros):
        """float32 weights of the rows whose packed codes, scales and packed zero points are given."""
        n, k = packed.shape[0], self.shape[1]
        part = QuantizedWeight(packed, scales, zeros, self.spec, (n, k))
        codes, scale, zero = part.unpacked()
        gs = self.spec.group_size or k
        codes = pad_to_groups(codes, gs).reshape(n, -1, gs)
        return decode(codes, scale, zero, self.spec).reshape(n, -1)[:, :k]

    def tensors(self):
        t = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            t["zeros"] = self.zeros
        return t

    def meta(self):
        s = self.spec
        return {"kind": self.kind, "shape": list(self.shape), "bits": s.bits,
                "group_size": s.group_size, "symmetric": s.symmetric, "grid": s.grid}

    @classmethod
    def from_saved(cls, meta, tensors):
        spec = QuantSpec(meta["bits"], meta["group_size"], meta["symmetric"], meta["grid"])
        return cls(tensors["codes"], tensors["scales"], tensors.get("zeros"), spec, meta["shape"])

    @classmethod
    def layout(cls, meta):
        out, k = meta["shape"]
        spec = QuantSpec(int(meta["bits"]), meta["group_size"], bool(meta["symmetric"]), meta["grid"])
        if not 1 <= spec.bits <= 8 or (spec.group_size is not None and spec.group_size < 1):
            raise ValueError(f"bits {spec.bits}, group_size {spec.group_size}")
        groups = spec.groups(k)
        t = {"codes": ((torch.uint8,), (out, packed_row_bytes(k, spec.bits))),
             "scales": ((torch.float16,), (out, groups))}
        if spec.has_zeros:
            t["zeros"] = ((torch.uint8,), (out, packed_row_bytes(groups, spec.bits)))
        return t

    def check_values(self):
        if not torch.isfinite(self.scales).all():
            raise LayoutError("scales hold inf or nan")

    @staticmethod
    def stored_bytes(shape, spec: QuantSpec) -> int:
        """Bytes a QuantizedWeight of ``shape`` stores with ``spec`` (codes, scales, zeros), without building it."""
        out, k = shape
        groups = spec.groups(k)
        zeros = out * packed_row_bytes(groups, spec.bits) if spec.has_zeros else 0
        return out * packed_row_bytes(k, spec.bits) + out * groups * 2 + zeros

    def integer_grid(self):
        if self.spec.grid != "int":
            raise NotAnIntegerGrid(f"{self.describe()} codes index the {self.spec.grid} code book, not a uniform grid")
        codes, _, zero = self.unpacked()
        return IntegerGrid(codes, self.scales, zero.to(torch.uint8), self.spec.bits,
                           self.spec.group_size or self.shape[1], self.spec.symmetric)

    def fp4_integer_grid(self) -> IntegerGrid:
        """An FP4 (E2M1) grid exactly as an integer grid: every code book value is ``k / 12`` of the group's absmax,
        ``k`` an integer in -12..12, so the weight is ``(k + 16 - 16) * absmax / 12``: 5-bit codes, zero point 16."""
        codes, scale, _ = self.unpacked()
        twelfths = torch.round(grid_values("fp4", 4) * 12).to(torch.int16)
        zeros = torch.full(scale.shape, 16, dtype=torch.uint8)
        return IntegerGrid((twelfths[codes.long()] + 16).to(torch.uint8), scale / 12, zeros, 5,
                           self.spec.group_size or self.shape[1], False)

    def onnx_matmul(self, lowering, x, name):
        """Non-uniform grids through kernels that read codes: FP4 as its exact integer grid
        (:meth:`fp4_integer_grid`, widened to 8 bits), NormalFloat at any width in our grid operator
        (``onnx_custom``; NF4 without it in onnxruntime's bitsandbytes kernel, ``onnx_nf4``; ``weights: fast`` only).
        Integer grids need none (``integer_grid``)."""
        if self.spec.grid == "fp4":
            lowered = lowering.grid_matmul(x, self.fp4_integer_grid(), self.shape, name)
            return None if lowered is None else (f"{lowered[0]}, FP4 as its exact integer grid", lowered[1])
        if self.spec.grid == "nf" and lowering.weights == "fast":
            group = self.spec.group_size or self.shape[1]
            if lowering.custom_ops is None and self.spec.bits == 4:  # onnxruntime's bitsandbytes kernel instead
                codes, scale, _ = self.unpacked()
                bnb4 = nf4_matmul(lowering, x, codes, scale, group, name)
                if bnb4 is not None:
                    return bnb4
            y = grid_matmul(lowering, x, name, self.codes, self.scales, None, grid_values("nf", self.spec.bits), 0.0,
                            self.spec.bits, group, self.shape)
            return None if y is None else (f"GridMatMul NF{self.spec.bits} g{group}", y)
        return None

    def kernel_values(self, kept):
        s = self.spec
        dims = empty_dims()
        dims.update(bits=s.bits, group_size=s.group_size or kept, groups=s.groups(kept), row_bytes=self.codes.shape[1])
        buffers = {"codes": self.codes, "scales": self.scales}
        if s.grid != "int":
            buffers["lut"] = grid_values(s.grid, s.bits).float()
            return ValuePlan(GRID, dims, buffers)
        if s.has_zeros:
            buffers["zeros"] = self.zeros
            dims["zero_row_bytes"] = self.zeros.shape[1]
            return ValuePlan(INT_ASYM, dims, buffers)
        return ValuePlan(INT_SYM, dims, buffers)

    def onnx_weight(self, g, prefix):
        """Codes unpacked from the row-packed bytes, times the group scales (minus the zero points)."""
        rows, cols = self.shape
        spec = self.spec
        size = spec.group_size or cols
        packed = torch_initializer(g, f"{prefix}.codes", self.codes)
        scale = g.op("Unsqueeze", as_float(g, f"{prefix}.scales", self.scales), g.const([-1]))
        if spec.grid != "int":
            grid = g.const(grid_values(spec.grid, spec.bits).numpy(), np.float32)
            values = g.op("Gather", grid, unpack_codes(g, packed, rows, cols, spec.bits, TensorProto.INT32))
            return per_group(g, values, rows, cols, size, lambda v: g.op("Mul", v, scale))
        codes = unpack_codes(g, packed, rows, cols, spec.bits, FLOAT)
        if spec.has_zeros:
            zeros = torch_initializer(g, f"{prefix}.zeros", self.zeros)
            zero = g.op("Unsqueeze", unpack_codes(g, zeros, rows, spec.groups(cols), spec.bits, FLOAT), g.const([-1]))
        else:
            zero = g.const(float((spec.maxq + 1) // 2), np.float32)
        return per_group(g, codes, rows, cols, size, lambda v: g.op("Mul", g.op("Sub", v, zero), scale))

    def onnx_rows(self, g, prefix, ids):
        """The rows ``ids`` gathered from the packed codes, scales and zero points, then decoded: the session
        holds the table as stored and decodes only the looked-up rows."""
        rows, cols = self.shape
        spec = self.spec
        flat = g.op("Reshape", ids, g.const([-1]))
        packed = g.op("Gather", torch_initializer(g, f"{prefix}.codes", self.codes), flat)
        scale = g.op("Unsqueeze", g.op("Gather", as_float(g, f"{prefix}.scales", self.scales), flat), g.const([-1]))
        if spec.grid != "int":
            grid = g.const(grid_values(spec.grid, spec.bits).numpy(), np.float32)
            values = g.op("Gather", grid, unpack_codes(g, packed, -1, cols, spec.bits, TensorProto.INT32))
            decoded = per_group(g, values, -1, cols, spec.group_size or cols, lambda v: g.op("Mul", v, scale))
        else:
            codes = unpack_codes(g, packed, -1, cols, spec.bits, FLOAT)
            if spec.has_zeros:
                zeros = g.op("Gather", torch_initializer(g, f"{prefix}.zeros", self.zeros), flat)
                zero = g.op("Unsqueeze", unpack_codes(g, zeros, -1, spec.groups(cols), spec.bits, FLOAT),
                            g.const([-1]))
            else:
                zero = g.const(float((spec.maxq + 1) // 2), np.float32)
            decoded = per_group(g, codes, -1, cols, spec.group_size or cols,
                                lambda v: g.op("Mul", g.op("Sub", v, zero), scale))
        shape = g.op("Concat", g.op("Shape", ids), g.const([cols]), axis=0)
        return g.op("Reshape", decoded, shape)

    def describe(self):
        s = self.spec
        grid = "" if s.grid == "int" else f" {s.grid}"
        sym = "sym" if s.symmetric else "asym"
        return f"{s.bits}-bit{grid} g{s.group_size or 'row'} {sym}"


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> WeightFormat:
    """Round-to-nearest quantization of a whole matrix, group by group."""
    w = w.float()
    out, k = w.shape
    gs = spec.group_size or k
    groups = pad_to_groups(w, gs).reshape(out, -1, gs)
    scale, zero = fit_params(groups, spec)
    codes = encode(groups, scale, zero, spec).reshape(out, -1)[:, :k]
    return grid_weight(codes, scale, zero, spec)


def grid_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> WeightFormat:
    """The stored format of codes ``[out, in]`` on ``spec``'s grid with their per-group ``scale``/``zero``: GGUF's
    super-block bytes for a k-quant, else :class:`QuantizedWeight`."""
    if ktype(spec.grid) is not None:
        assert zero is not None, "k-quants have a zero tensor"
        return KQuantWeight.from_codes(codes, scale, zero, spec)
    return QuantizedWeight.from_codes(codes, scale, zero, spec)
