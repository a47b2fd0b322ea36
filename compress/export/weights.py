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


def unpack_codes(g: Graph, packed: str, rows: int, count: int, bits: int) -> str:
    """int64 codes ``[rows, count]`` from row-packed bytes (layout of ``compress.packing``)."""
    if bits == 8:
        return g.op("Cast", packed, to=TensorProto.INT64)
    shifted = g.op("BitShift", g.op("Unsqueeze", packed, g.const([-1])), g.const(np.arange(8), np.uint8),
                   direction="RIGHT")
    stream = g.op("Reshape", g.op("BitwiseAnd", shifted, g.const(1, np.uint8)), g.const([rows, -1]))
    stream = g.op("Slice", stream, g.const([0]), g.const([count * bits]), g.const([1]))
    per_code = g.op("Cast", g.op("Reshape", stream, g.const([rows, count, bits])), to=TensorProto.INT32)
    weighted = g.op("Mul", per_code, g.const(1 << np.arange(bits), np.int32))
    return g.op("Cast", g.op("ReduceSum", weighted, g.const([-1]), keepdims=0), to=TensorProto.INT64)


def weight_expression(g: Graph, fmt: WeightFormat, prefix: str) -> str:
    """A float32 ``[out, in]`` value computed in the graph from the format's stored tensors."""
    rows, cols = fmt.shape
    if isinstance(fmt, DenseWeight):
        return as_float(g, f"{prefix}.weight", fmt.weight)
    if isinstance(fmt, QuantizedWeight):
        return _quantized_expression(g, fmt, prefix)
    if isinstance(fmt, PalettizedWeight):
        codes = unpack_codes(g, torch_initializer(g, f"{prefix}.indices", fmt.indices), rows, cols, fmt.bits)
        table = as_float(g, f"{prefix}.table", fmt.table)
        if fmt.table_scale is not None:
            scale = g.op("Unsqueeze", as_float(g, f"{prefix}.table_scale", fmt.table_scale), g.const([1]))
            table = g.op("Mul", table, scale)
        size = 1 << fmt.bits
        offsets = g.op("Unsqueeze", g.arange(rows, fmt.rows_per_table, size), g.const([1]))
        return g.op("Gather", g.op("Reshape", table, g.const([-1])), g.op("Add", codes, offsets))
    if isinstance(fmt, OutlierWeight):
        return _outlier_expression(g, fmt, prefix)
    if isinstance(fmt, SparseWeight):
        return _sparse_expression(g, fmt, prefix)
    raise UnsupportedFormat(f"no ONNX lowering for weight format '{fmt.kind}'")


def _quantized_expression(g: Graph, fmt: QuantizedWeight, prefix: str) -> str:
    rows, cols = fmt.shape
    spec = fmt.spec
    groups = spec.groups(cols)
    codes = unpack_codes(g, torch_initializer(g, f"{prefix}.codes", fmt.codes), rows, cols, spec.bits)
    group_of_column = g.arange(cols, divide=spec.group_size or cols)
    scale = g.op("Gather", as_float(g, f"{prefix}.scales", fmt.scales), group_of_column, axis=1)
    if spec.grid != "int":
        values = g.op("Gather", g.const(grid_values(spec.grid, spec.bits).numpy(), np.float32), codes)
        return g.op("Mul", values, scale)
    if spec.has_zeros:
        zeros = unpack_codes(g, torch_initializer(g, f"{prefix}.zeros", fmt.zeros), rows, groups, spec.bits)
        zero = g.op("Gather", g.op("Cast", zeros, to=FLOAT), group_of_column, axis=1)
    else:
        zero = g.const(float((spec.maxq + 1) // 2), np.float32)
    return g.op("Mul", g.op("Sub", g.op("Cast", codes, to=FLOAT), zero), scale)


def _outlier_expression(g: Graph, fmt: OutlierWeight, prefix: str) -> str:
    """Inner weight with the CSR outliers written over it; row numbers come from the cumulative
    counts in the graph, so the file holds just counts, columns and values."""
    rows, cols = fmt.shape
    nnz = int(fmt.values.numel())
    inner = g.op("Reshape", weight_expression(g, fmt.inner, f"{prefix}.inner"), g.const([-1]))
    counts = g.op("Cast", torch_initializer(g, f"{prefix}.counts", fmt.counts), to=TensorProto.INT64)
    ends = g.op("CumSum", counts, g.const(0))
    position = g.arange(nnz)
    passed = g.op("LessOrEqual", g.op("Unsqueeze", ends, g.const([0])), g.op("Unsqueeze", position, g.const([1])))
    row = g.op("ReduceSum", g.op("Cast", passed, to=TensorProto.INT64), g.const([1]), keepdims=0)
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
        bitmap = unpack_codes(g, torch_initializer(g, f"{prefix}.mask", positions["mask"]), rows, cols, 1)
        flat = g.op("Reshape", g.op("NonZero", g.op("Reshape", bitmap, g.const([-1]))), g.const([-1]))
    else:
        n, m = nm
        idx = unpack_codes(g, torch_initializer(g, f"{prefix}.indices", positions["indices"]), rows, kept,
                           (m - 1).bit_length())
        group_start = g.op("Add", g.op("Unsqueeze", g.arange(kept, n, m), g.const([0])),
                           g.op("Unsqueeze", g.arange(rows, 1, cols), g.const([1])))
        flat = g.op("Reshape", g.op("Add", idx, group_start), g.const([-1]))
    zeros = g.op("ConstantOfShape", g.const([rows * cols]), value=_float_scalar(0.0))
    return g.op("Reshape", g.op("ScatterElements", zeros, flat, values, axis=0), g.const([rows, cols]))


def _float_scalar(v: float):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([v], dtype=np.float32))


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
        g, spec = self.g, fmt.spec
        rows, cols = fmt.shape
        codes, _, zero = fmt.unpacked()
        signed = not spec.has_zeros
        if signed:  # symmetric: code - 2^(b-1) in two's complement, no zero point stored
            codes = codes ^ (1 << (spec.bits - 1))
        inputs = [self._integer_tensor(f"{name}.qweight", codes, spec.bits, signed),
                  torch_initializer(g, f"{name}.scales", fmt.scales)]
        if not signed:
            inputs.append(self._integer_tensor(f"{name}.zero_points", zero.to(torch.uint8), spec.bits, False))
        w = g.op("DequantizeLinear", *inputs, axis=1, block_size=spec.group_size or cols)
        w = g.op("Transpose", g.op("Cast", w, to=FLOAT))
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
