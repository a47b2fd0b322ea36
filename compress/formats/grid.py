"""Integer and non-uniform grids: a code per weight, a float16 scale (and zero point) per group of inputs.

The grids' math lives in ``compress.quant``; this module is the stored layout and what reads it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.plan import GRID, INT_ASYM, INT_SYM, ValuePlan, empty_dims
from ..packing import pack_rows, packed_row_bytes, unpack_rows
from ..quant import QuantSpec, decode, encode, fit_params, grid_values, pad_to_groups
from .base import IntegerGrid, LayoutError, NotAnIntegerGrid, WeightFormat, register_format
from .onnx_ops import (
    FLOAT,
    MS_DOMAIN,
    SUB_BYTE_TYPES,
    TensorProto,
    as_float,
    per_group,
    torch_initializer,
    unpack_codes,
)

NBITS_KERNEL_BITS = (2, 4, 8)  # widths onnxruntime's MatMulNBits reads

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
        out, k = self.shape
        codes, scale, zero = self.unpacked()
        gs = self.spec.group_size or k
        codes = pad_to_groups(codes, gs).reshape(out, -1, gs)
        return decode(codes, scale, zero, self.spec).reshape(out, -1)[:, :k]

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

    def onnx_matmul(self, lowering, x, name):
        """2/4/8-bit integer grids run from their codes: ``MatMulNBits`` (``weights: fast``) or a blocked
        ``DequantizeLinear`` (``weights: portable``, standard ops only)."""
        if self.spec.grid != "int" or self.spec.bits not in NBITS_KERNEL_BITS:
            return None
        block = _nbits_block(self.spec.group_size or self.shape[1])
        if lowering.weights == "fast" and block is not None:
            return f"MatMulNBits {self.spec.bits}-bit block {block}", _matmul_nbits(lowering, x, self, block, name)
        if lowering.weights == "portable":
            return _dequantize_linear(lowering, x, self, name)
        return None

    def describe(self):
        s = self.spec
        grid = "" if s.grid == "int" else f" {s.grid}"
        sym = "sym" if s.symmetric else "asym"
        return f"{s.bits}-bit{grid} g{s.group_size or 'row'} {sym}"


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a whole matrix, group by group."""
    w = w.float()
    out, k = w.shape
    gs = spec.group_size or k
    groups = pad_to_groups(w, gs).reshape(out, -1, gs)
    scale, zero = fit_params(groups, spec)
    codes = encode(groups, scale, zero, spec).reshape(out, -1)[:, :k]
    return QuantizedWeight.from_codes(codes, scale, zero if zero is not None else None, spec)


def _nbits_block(group_size: int) -> int | None:
    """Block size for MatMulNBits: a power of two in 16..256 that divides the group size."""
    for block in (256, 128, 64, 32, 16):
        if block <= group_size and group_size % block == 0:
            return block
    return None


def _per_block(t: torch.Tensor, blocks: int, repeat: int) -> torch.Tensor:
    return t[:, torch.arange(blocks) // repeat]


def _matmul_nbits(lowering, x: str, fmt: QuantizedWeight, block: int, name: str) -> str:
    g, spec = lowering.g, fmt.spec
    rows, cols = fmt.shape
    repeat = (spec.group_size or cols) // block
    blocks = -(-cols // block)
    codes, scale, zero = fmt.unpacked()
    if cols % block == 0:  # the checkpoint's row-packed bytes are already MatMulNBits' layout
        packed = fmt.codes.reshape(rows, blocks, block * spec.bits // 8)
    else:
        codes = torch.nn.functional.pad(codes, (0, blocks * block - cols))
        packed = pack_rows(codes, spec.bits).reshape(rows, blocks, block * spec.bits // 8)
    inputs = [x, g.tensor(f"{name}.qweight", packed.numpy()),
              g.tensor(f"{name}.scales", _per_block(scale, blocks, repeat).reshape(-1).numpy())]
    if spec.has_zeros:
        zp = fmt.zeros.reshape(-1) if repeat == 1 and cols % block == 0 else \
            pack_rows(_per_block(zero, blocks, repeat).to(torch.uint8), spec.bits).reshape(-1)
        inputs.append(g.tensor(f"{name}.zero_points", zp.numpy()))
    return g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=cols, N=rows, bits=spec.bits, block_size=block,
                accuracy_level=lowering.accuracy_level)

def _dequantize_linear(lowering, x: str, fmt: QuantizedWeight, name: str) -> tuple[str, str]:
    """Blocked DequantizeLinear on the transposed codes ``[in, out]`` (blocks along the inputs) feeding
    MatMul directly, with float32 scales: the pattern onnxruntime fuses into its low-bit MatMul."""
    g, spec = lowering.g, fmt.spec
    codes, scale, zero = fmt.unpacked()
    signed = not spec.has_zeros
    if signed:  # symmetric: code - 2^(b-1) in two's complement, no zero point stored
        codes = codes ^ (1 << (spec.bits - 1))
    inputs = [_integer_tensor(lowering, f"{name}.qweight", codes.t().contiguous(), spec.bits, signed),
              g.tensor(f"{name}.scales", scale.t().contiguous().numpy())]
    if not signed:
        inputs.append(_integer_tensor(lowering, f"{name}.zero_points", zero.t().contiguous().to(torch.uint8),
                                           spec.bits, False))
    w = g.op("DequantizeLinear", *inputs, axis=0, block_size=spec.group_size or fmt.shape[1])
    kind = {(4, False): "uint4", (4, True): "int4", (2, False): "uint2", (2, True): "int2"}.get(
        (spec.bits, signed), "int8" if signed else "uint8")
    return f"DequantizeLinear {kind} g{spec.group_size or 'row'}", g.op("MatMul", x, w)

def _integer_tensor(lowering, name: str, values: torch.Tensor, bits: int, signed: bool) -> str:
    if bits == 8:
        arr = values.numpy().view(np.int8) if signed else values.numpy()
        return lowering.g.tensor(name, arr)
    if bits == 2:
        lowering.opset = max(lowering.opset, 25)
    raw = pack_rows(values.reshape(1, -1), bits).numpy().tobytes()
    return lowering.g.packed(name, SUB_BYTE_TYPES[(bits, signed)], list(values.shape), raw)
