"""How each weight format is stored in the ONNX file and turned into ``x @ W.T``.

Two lowerings, chosen per layer (the report lists which one each layer got and its bytes):

- **a runtime kernel** on the packed codes: integer grids of 2, 4 or 8 bits become
  ``com.microsoft::MatMulNBits`` (``weights: fast``; onnxruntime's blocked low-bit kernel, fp32
  scales and packed zero points per block) or a standard blocked ``DequantizeLinear`` on
  ``uint4``/``int4`` (opset 21), ``uint2``/``int2`` (opset 25) or 8-bit tensors with fp16 scales
  (``weights: portable``, no contrib ops).
- **in-graph decoding** for everything no runtime op reads natively: 3-bit and other odd widths,
  NormalFloat / FP4 grids, palettes (look-up tables), outliers and sparse layouts. The file keeps
  the exact bytes of the compressed checkpoint (row-packed codes, tables, bitmaps / N:M indices,
  CSR outliers); a small subgraph of standard ops (BitShift, BitwiseAnd, Gather, ScatterElements)
  rebuilds the float weight. Its inputs are all initializers, so onnxruntime folds it into a
  float32 constant once when the session loads: the file stays small, inference runs a dense
  float MatMul (speed and memory of fp32 at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from ..formats import DenseWeight, QuantizedWeight, SparseWeight, WeightFormat, nm_pattern
from ..packing import pack_rows
from ..palette import OutlierWeight, PalettizedWeight
from ..quant import grid_values
from .graph import MS_DOMAIN, Graph

NBITS_KERNEL_BITS = (2, 4, 8)
SUB_BYTE_TYPES = {(4, False): TensorProto.UINT4, (4, True): TensorProto.INT4,
                  (2, False): TensorProto.UINT2, (2, True): TensorProto.INT2}
FLOAT = TensorProto.FLOAT


class UnsupportedFormat(ValueError):
    """A weight format this exporter has no lowering for."""


@dataclass
class LayerExport:
    lowering: str
    file_bytes: int


def torch_initializer(g: Graph, name: str, t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return g.packed(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes())
    return g.tensor(name, t.numpy())


def as_float(g: Graph, name: str, t: torch.Tensor) -> str:
    """An initializer holding ``t`` in its stored dtype, cast to float32 in the graph when needed."""
    init = torch_initializer(g, name, t)
    return init if t.dtype == torch.float32 else g.op("Cast", init, to=FLOAT)


def unpack_codes(g: Graph, packed: str, rows: int, count: int, bits: int, to: int = TensorProto.INT64) -> str:
    """Codes ``[rows, count]`` (as type ``to``) from row-packed bytes (layout of ``compress.packing``).

    Folding keeps every intermediate until the session is built, so the chain is kept short and narrow:
    1/2/4-bit codes are shifted out of single bytes; 3/5/6/7-bit codes come 8 at a time from one
    ``bits``-byte word (uint32 up to 4 bits, uint64 above)."""
    if bits == 8:
        return g.op("Cast", packed, to=to)
    chunks, row_bytes = -(-count // 8), -(-count * bits // 8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifted = g.op("BitShift", g.op("Unsqueeze", packed, g.const([-1])),
                       g.const(np.arange(per_byte) * bits, np.uint8), direction="RIGHT")
        codes = g.op("BitwiseAnd", shifted, g.const((1 << bits) - 1, np.uint8))
        total = row_bytes * per_byte
    else:
        wide = bits > 4
        if chunks * bits > row_bytes:
            packed = g.op("Pad", packed, g.const([0, 0, 0, chunks * bits - row_bytes]))
        word_type, np_word = (TensorProto.UINT64, np.uint64) if wide else (TensorProto.UINT32, np.uint32)
        grouped = g.op("Cast", g.op("Reshape", packed, g.const([rows, chunks, bits])), to=word_type)
        byte_planes = g.op("Split", grouped, g.const([1] * bits), axis=-1, outputs=bits)
        word = byte_planes[0]  # bytes shifted into place and added (ReduceSum would round above 2^53)
        for i in range(1, bits):
            word = g.op("BitwiseOr", word, g.op("BitShift", byte_planes[i], g.const(8 * i, np_word), direction="LEFT"))
        shifted = g.op("BitShift", word, g.const(np.arange(8) * bits, np_word), direction="RIGHT")
        codes = g.op("BitwiseAnd", shifted, g.const((1 << bits) - 1, np_word))
        total = chunks * 8
    codes = g.op("Reshape", g.op("Cast", codes, to=to), g.const([rows, total]))
    return codes if total == count else g.op("Slice", codes, g.const([0]), g.const([count]), g.const([1]))


def _per_group(g: Graph, values: str, rows: int, cols: int, group_size: int, apply) -> str:
    """``apply(values [rows, groups, group_size])`` back as ``[rows, cols]`` (the last group padded)."""
    groups = -(-cols // group_size)
    if groups * group_size > cols:
        values = g.op("Pad", values, g.const([0, 0, 0, groups * group_size - cols]))
    out = g.op("Reshape", apply(g.op("Reshape", values, g.const([rows, groups, group_size]))), g.const([rows, -1]))
    return out if groups * group_size == cols else g.op("Slice", out, g.const([0]), g.const([cols]), g.const([1]))


def weight_expression(g: Graph, fmt: WeightFormat, prefix: str) -> str:
    """A float32 ``[out, in]`` value computed in the graph from the format's stored tensors."""
    rows, cols = fmt.shape
    if isinstance(fmt, DenseWeight):
        return as_float(g, f"{prefix}.weight", fmt.weight)
    if isinstance(fmt, QuantizedWeight):
        return _quantized_expression(g, fmt, prefix)
    if isinstance(fmt, PalettizedWeight):
        codes = unpack_codes(g, torch_initializer(g, f"{prefix}.indices", fmt.indices), rows, cols, fmt.bits,
                             TensorProto.INT32)
        table = as_float(g, f"{prefix}.table", fmt.table)
        if fmt.table_scale is not None:
            scale = g.op("Unsqueeze", as_float(g, f"{prefix}.table_scale", fmt.table_scale), g.const([1]))
            table = g.op("Mul", table, scale)
        size = 1 << fmt.bits
        offsets = g.op("Cast", g.op("Unsqueeze", g.arange(rows, fmt.rows_per_table, size), g.const([1])),
                       to=TensorProto.INT32)
        return g.op("Gather", g.op("Reshape", table, g.const([-1])), g.op("Add", codes, offsets))
    if isinstance(fmt, OutlierWeight):
        return _outlier_expression(g, fmt, prefix)
    if isinstance(fmt, SparseWeight):
        return _sparse_expression(g, fmt, prefix)
    raise UnsupportedFormat(f"no ONNX lowering for weight format '{fmt.kind}'")


def _quantized_expression(g: Graph, fmt: QuantizedWeight, prefix: str) -> str:
    rows, cols = fmt.shape
    spec = fmt.spec
    size = spec.group_size or cols
    packed = torch_initializer(g, f"{prefix}.codes", fmt.codes)
    scale = g.op("Unsqueeze", as_float(g, f"{prefix}.scales", fmt.scales), g.const([-1]))
    if spec.grid != "int":
        grid = g.const(grid_values(spec.grid, spec.bits).numpy(), np.float32)
        values = g.op("Gather", grid, unpack_codes(g, packed, rows, cols, spec.bits, TensorProto.INT32))
        return _per_group(g, values, rows, cols, size, lambda v: g.op("Mul", v, scale))
    codes = unpack_codes(g, packed, rows, cols, spec.bits, FLOAT)
    if spec.has_zeros:
        zeros = torch_initializer(g, f"{prefix}.zeros", fmt.zeros)
        zero = g.op("Unsqueeze", unpack_codes(g, zeros, rows, spec.groups(cols), spec.bits, FLOAT), g.const([-1]))
    else:
        zero = g.const(float((spec.maxq + 1) // 2), np.float32)
    return _per_group(g, codes, rows, cols, size, lambda v: g.op("Mul", g.op("Sub", v, zero), scale))


def _outlier_expression(g: Graph, fmt: OutlierWeight, prefix: str) -> str:
    """Inner weight with the CSR outliers written over it; row numbers come from the cumulative
    counts in the graph, so the file holds just counts, columns and values."""
    rows, cols = fmt.shape
    nnz = int(fmt.values.numel())
    inner = g.op("Reshape", weight_expression(g, fmt.inner, f"{prefix}.inner"), g.const([-1]))
    counts = g.op("Cast", torch_initializer(g, f"{prefix}.counts", fmt.counts), to=TensorProto.INT64)
    # a 1 where each row's outliers end (one spare slot for the last row), summed up: the row of every outlier
    ends = g.op("CumSum", counts, g.const(0))
    starts = g.op("ConstantOfShape", g.const([nnz + 1]), value=_scalar(0, np.int64))
    ones = g.op("ConstantOfShape", g.const([rows]), value=_scalar(1, np.int64))
    marks = g.op("ScatterElements", starts, ends, ones, axis=0, reduction="add")
    row = g.op("Slice", g.op("CumSum", marks, g.const(0)), g.const([0]), g.const([nnz]), g.const([0]))
    column = g.op("Cast", torch_initializer(g, f"{prefix}.columns", fmt.columns), to=TensorProto.INT64)
    flat = g.op("Add", g.op("Mul", row, g.const(cols)), column)
    values = as_float(g, f"{prefix}.values", fmt.values)
    return g.op("Reshape", g.op("ScatterElements", inner, flat, values, axis=0), g.const([rows, cols]))


def _sparse_expression(g: Graph, fmt: SparseWeight, prefix: str) -> str:
    """Kept values scattered into zeros at the positions of the bitmap (unstructured) or of the
    N:M indices, in row-major order as ``SparseWeight`` stores them."""
    rows, cols = fmt.shape
    kept = int(fmt.mask[0].sum())
    values = g.op("Reshape", weight_expression(g, fmt.values, f"{prefix}.values"), g.const([-1]))
    positions = fmt._position_tensors()
    nm = nm_pattern(fmt.pattern)
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
    zeros = g.op("ConstantOfShape", g.const([rows * cols]), value=_scalar(0.0, np.float32))
    return g.op("Reshape", g.op("ScatterElements", zeros, flat, values, axis=0), g.const([rows, cols]))


def _scalar(v, dtype):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([v], dtype=dtype))


def _kernel_block(group_size: int) -> int | None:
    """Block size for MatMulNBits: a power of two in 16..256 that divides the group size."""
    for block in (256, 128, 64, 32, 16):
        if block <= group_size and group_size % block == 0:
            return block
    return None


def _per_block(t: torch.Tensor, blocks: int, repeat: int) -> torch.Tensor:
    return t[:, torch.arange(blocks) // repeat]


class WeightLowering:
    """Emits the matmul of every linear layer into ``g`` and records how each was stored.

    ``weights``: ``fast`` (MatMulNBits where it applies) or ``portable`` (standard ops only).
    ``accuracy_level``: MatMulNBits' compute type (0: float, 4: int8 activations).
    """

    def __init__(self, g: Graph, weights: str = "fast", accuracy_level: int = 0):
        self.g, self.weights, self.accuracy_level = g, weights, accuracy_level
        self.dense_dtype: torch.dtype | None = None  # storage dtype of uncompressed linear layers
        self.layers: dict[str, LayerExport] = {}
        self.opset = 21

    def linear(self, x: str, fmt: WeightFormat, bias: torch.Tensor | None, name: str) -> str:
        start = len(self.g.initializers)
        try:
            lowering, y = self._matmul(x, fmt, name)
        except UnsupportedFormat as e:
            raise UnsupportedFormat(f"layer {name}: {e}") from None
        if bias is not None:
            y = self.g.op("Add", y, as_float(self.g, f"{name}.bias", bias))
        nbytes = sum(len(t.raw_data) for t in self.g.initializers[start:])
        self.layers[name] = LayerExport(lowering, nbytes)
        return y

    def _matmul(self, x: str, fmt: WeightFormat, name: str) -> tuple[str, str]:
        g = self.g
        if isinstance(fmt, DenseWeight):  # stored transposed: MatMul reads [in, out]
            return f"dense {str(fmt.weight.dtype).removeprefix('torch.')}", g.op(
                "MatMul", x, as_float(g, f"{name}.weight_t", fmt.weight.t()))
        if isinstance(fmt, QuantizedWeight) and fmt.spec.grid == "int" and fmt.spec.bits in NBITS_KERNEL_BITS:
            block = _kernel_block(fmt.spec.group_size or fmt.shape[1])
            if self.weights == "fast" and block is not None:
                return f"MatMulNBits {fmt.spec.bits}-bit block {block}", self._matmul_nbits(x, fmt, block, name)
            if self.weights == "portable":
                return self._dequantize_linear(x, fmt, name)
        w = weight_expression(g, fmt, name)
        return f"in-graph decode ({fmt.describe()})", g.op("MatMul", x, g.op("Transpose", w))

    def _matmul_nbits(self, x: str, fmt: QuantizedWeight, block: int, name: str) -> str:
        g, spec = self.g, fmt.spec
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
                    accuracy_level=self.accuracy_level)

    def _dequantize_linear(self, x: str, fmt: QuantizedWeight, name: str) -> tuple[str, str]:
        """Blocked DequantizeLinear on the transposed codes ``[in, out]`` (blocks along the inputs) feeding
        MatMul directly, with float32 scales: the pattern onnxruntime fuses into its low-bit MatMul."""
        g, spec = self.g, fmt.spec
        codes, scale, zero = fmt.unpacked()
        signed = not spec.has_zeros
        if signed:  # symmetric: code - 2^(b-1) in two's complement, no zero point stored
            codes = codes ^ (1 << (spec.bits - 1))
        inputs = [self._integer_tensor(f"{name}.qweight", codes.t().contiguous(), spec.bits, signed),
                  g.tensor(f"{name}.scales", scale.t().contiguous().numpy())]
        if not signed:
            inputs.append(self._integer_tensor(f"{name}.zero_points", zero.t().contiguous().to(torch.uint8),
                                               spec.bits, False))
        w = g.op("DequantizeLinear", *inputs, axis=0, block_size=spec.group_size or fmt.shape[1])
        kind = {(4, False): "uint4", (4, True): "int4", (2, False): "uint2", (2, True): "int2"}.get(
            (spec.bits, signed), "int8" if signed else "uint8")
        return f"DequantizeLinear {kind} g{spec.group_size or 'row'}", g.op("MatMul", x, w)

    def _integer_tensor(self, name: str, values: torch.Tensor, bits: int, signed: bool) -> str:
        if bits == 8:
            arr = values.numpy().view(np.int8) if signed else values.numpy()
            return self.g.tensor(name, arr)
        if bits == 2:
            self.opset = max(self.opset, 25)
        raw = pack_rows(values.reshape(1, -1), bits).numpy().tobytes()
        return self.g.packed(name, SUB_BYTE_TYPES[(bits, signed)], list(values.shape), raw)
