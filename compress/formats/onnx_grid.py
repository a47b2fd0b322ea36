"""Any weight that is an :class:`IntegerGrid` (``WeightFormat.integer_grid``) as an onnxruntime operator that
runs from its codes, so the session keeps it compressed in memory.

- ``weights: fast``: ``com.microsoft::MatMulNBits`` (onnxruntime's blocked low-bit kernel: float32 scales,
  packed codes and zero points per block). It reads 2, 4 and 8 bits: a grid of another width is *widened*
  without loss to the next one it reads (3 -> 4, 5..7 -> 8 bits), its codes and zero points unchanged. With
  float activations an 8-bit grid runs as two 4-bit kernels on its nibble planes (``_nibble_planes``), and a 2-bit
  or 3-bit grid in our ``compress::GridMatMul`` where the library is built (``_float_grid``: onnxruntime's 2-bit
  kernel has a fast path for int8 activations only, 3-bit codes would be widened to 4). With int8 activations
  (``accuracy_level`` 4) 2-, 3- and 4-bit grids run in ``compress::GridMatMul``'s int8 path where the library is
  built (``_int8_grid``, 3-bit codes as stored); so does a tied table's 2- or 4-bit head, with either
  activations, from the initializers its lookup gathers from (``shared_head_block``: MatMulNBits would hold a
  prepacked copy of the table beside them).
- ``weights: portable``: a blocked ``DequantizeLinear`` on the transposed codes feeding ``MatMul`` (standard
  ops, opset 21; 2-bit types opset 25), the pattern onnxruntime fuses into the same low-bit kernel.

Structured sparsity (N:M over an integer grid) arrives here as dense codes with the pruned weights at their
group's zero point: the 4-bit kernel then reads half the bytes an fp16 copy of the kept values would.
"""

from __future__ import annotations

import numpy as np
import torch

from ..packing import pack_rows
from . import onnx_custom
from .base import IntegerGrid
from .onnx_ops import FLOAT, MS_DOMAIN, SUB_BYTE_TYPES, per_group, unpack_codes

KERNEL_BITS = (2, 4, 8)  # the widths MatMulNBits (and sub-byte DequantizeLinear) read


def kernel_bits(bits: int) -> int | None:
    """The narrowest width the kernels read that holds ``bits``-bit codes."""
    return next((k for k in KERNEL_BITS if k >= bits), None)


def nbits_block(group_size: int) -> int | None:
    """Block size for MatMulNBits: a power of two in 16..256 that divides the group size."""
    for block in (256, 128, 64, 32, 16):
        if block <= group_size and group_size % block == 0:
            return block
    return None


def lower_integer_grid(lowering, x: str, grid: IntegerGrid, shape: tuple[int, int], name: str):
    """(description, output) of ``x @ W.T`` from ``grid``'s codes, or None when no kernel reads it."""
    width = kernel_bits(grid.bits)
    if width is None:
        return None
    widened = f" ({grid.bits}-bit codes widened)" if width != grid.bits else ""
    if lowering.weights == "portable":
        kind, y = _dequantize_linear(lowering, x, grid, width, name)
        return f"DequantizeLinear {kind} g{grid.group_size}{widened}", y
    if name in lowering.nbits_tensors:  # a tied table's head: the initializers its lookup gathers from
        block = shared_head_block(lowering, grid, shape)
        if block is not None:
            codes, scales, *zeros = lowering.nbits_tensors[name]
            kind = ", int8 activations" if lowering.accuracy_level == 4 else ""
            return f"GridMatMul {width}-bit g{block}{kind}{widened}", onnx_custom.shared_grid_matmul(
                lowering, x, codes, scales, zeros[0] if zeros else None, width, block, shape)
    elif grid.bits in FLOAT_GRID_BITS and grid.bits in OUR_GRID_BITS and lowering.accuracy_level == 0 \
            and lowering.custom_ops is not None:
        return _float_grid(lowering, x, grid, shape, name)
    elif lowering.accuracy_level == 4 and grid.bits in INT8_GRID_BITS and grid.bits in OUR_GRID_BITS \
            and lowering.custom_ops is not None:
        int8 = _int8_grid(lowering, x, grid, shape, name)
        if int8 is not None:
            return f"GridMatMul {grid.bits}-bit g{int8[1]}, int8 activations", int8[0]
    block = nbits_block(grid.group_size)
    if block is None:
        return None
    if width == 8 and lowering.accuracy_level == 0:
        return f"2 x MatMulNBits 4-bit block {block} (8-bit codes as two nibble planes)", _nibble_planes(
            lowering, x, grid, shape, block, name)
    return f"MatMulNBits {width}-bit block {block}{widened}", _matmul_nbits(lowering, x, grid, shape, width, block,
                                                                           name)


def _float_grid(lowering, x: str, grid: IntegerGrid, shape, name: str):
    """A 2- or 3-bit grid with float activations in our grid operator: its codes and zero points as stored, float32
    scales. onnxruntime's 2-bit MatMulNBits has no float-activation fast path (it decodes the weight on every call,
    many times slower than its 4-bit one), and 3-bit codes would be widened to its 4-bit kernel (a third more bytes
    in the file and in memory); ours reads 2- and 3-bit codes as they are."""
    size = grid.group_size or shape[1]
    y = _own_grid_matmul(lowering, x, grid, shape, name, grid.bits, size)
    return f"GridMatMul {grid.bits}-bit g{size} (integer grid, float activations)", y


def _own_grid_matmul(lowering, x: str, grid: IntegerGrid, shape, name: str, bits: int, size: int,
                     accuracy_level: int = 0) -> str | None:
    """Our GridMatMul on ``grid``'s own codes and zero points packed at ``bits`` (its width, or wider), float32
    scales per group of ``size``; symmetric grids keep their zero point ``2^(grid.bits - 1)`` as an attribute."""
    zeros = None if grid.symmetric else pack_rows(grid.zeros.to(torch.uint8), bits)
    return onnx_custom.grid_matmul(lowering, x, name, pack_rows(grid.codes, bits), grid.scales, None, None,
                                   0.0 if zeros is not None else float(1 << (grid.bits - 1)), bits, size, shape,
                                   zeros=zeros, accuracy_level=accuracy_level)


OUR_GRID_BITS = (2, 3, 4)  # the widths our GridMatMul runs in place of MatMulNBits (the bench empties it to compare)
FLOAT_GRID_BITS = (2, 3)  # those it runs with float activations (``_float_grid``)
INT8_GRID_BITS = (2, 3, 4)  # those its int8 path multiplies


def shared_head_block(lowering, grid: IntegerGrid, shape) -> int | None:
    """The block at which our GridMatMul runs a tied table's head from the MatMulNBits initializers its lookup
    gathers from (row-packed codes, a float32 scale and a packed zero point per block: the bytes it reads), with
    float or int8 activations; None where MatMulNBits runs it (our library not built, 8 bits, blocks that do not
    divide the inputs). MatMulNBits would hold a prepacked copy of the table beside the codes the lookup reads."""
    width, block = kernel_bits(grid.bits), nbits_block(grid.group_size)
    if width not in OUR_GRID_BITS or lowering.custom_ops is None or block is None:
        return None
    runs = shape[1] % block == 0 and (lowering.accuracy_level == 0 or block % 32 == 0)
    return block if runs else None


def _int8_grid(lowering, x: str, grid: IntegerGrid, shape, name: str) -> tuple[str, int] | None:
    """(output, group size) of a 2-, 3- or 4-bit grid with int8 activations in our grid operator
    (``accuracy_level`` 4), its own codes, float32 scales and zero points; None where it cannot run it (inputs or
    groups not multiples of 32). onnxruntime's int8 kernel would hold a repacked copy of the codes with a float32
    block sum per block beside them (a third more than the 4-bit layer's bytes at blocks of 32), and 3-bit codes
    would be widened to its 4-bit kernel."""
    size = grid.group_size or shape[1]
    if size % 32 or shape[1] % 32:
        return None
    y = _own_grid_matmul(lowering, x, grid, shape, name, grid.bits, size, accuracy_level=4)
    return None if y is None else (y, size)


def _nibble_planes(lowering, x: str, grid: IntegerGrid, shape, block: int, name: str) -> str:
    """An 8-bit grid as the sum of two 4-bit kernels, exactly: with ``c = 16 h + l`` and ``z = 16 h_z + l_z``,
    ``s (c - z) = 16 s (h - h_z) + s (l - l_z)``. onnxruntime's 8-bit kernel has no float-activation fast path
    (it decodes the weight on every call); two 4-bit ones read the same bytes an order of magnitude faster."""
    high = IntegerGrid(grid.codes >> 4, grid.scales.float() * 16, grid.zeros >> 4, 4, grid.group_size, False)
    low = IntegerGrid(grid.codes & 15, grid.scales.float(), grid.zeros & 15, 4, grid.group_size, False)
    return lowering.g.op("Add", _matmul_nbits(lowering, x, high, shape, 4, block, f"{name}.high"),
                         _matmul_nbits(lowering, x, low, shape, 4, block, f"{name}.low"))


def _per_block(t: torch.Tensor, blocks: int, repeat: int) -> torch.Tensor:
    return t[:, torch.arange(blocks) // repeat]


def _matmul_nbits(lowering, x: str, grid: IntegerGrid, shape, width: int, block: int, name: str) -> str:
    rows, cols = shape
    return lowering.g.op("MatMulNBits", x, *_nbits_tensors(lowering, grid, shape, width, block, name),
                         domain=MS_DOMAIN, K=cols, N=rows, bits=width, block_size=block,
                         accuracy_level=lowering.accuracy_level)


def _nbits_tensors(lowering, grid: IntegerGrid, shape, width: int, block: int, name: str,
                   gather_layout: bool = False) -> list[str]:
    """MatMulNBits' initializers of ``grid`` (made once per ``name``: a tied embedding's lookup reads the same ones):
    codes ``[rows, blocks, block * width / 8]``, float32 scales ``[rows * blocks]`` (``gather_layout``: ``[rows,
    blocks, 1]``, GatherBlockQuantized's, where our GridMatMul head reads them rather than MatMulNBits: no reshaped
    copy at load), and packed zero points ``[rows * ceil(blocks * width / 8)]`` unless the kernel's default
    (2^(width-1)) is every zero point."""
    made = lowering.nbits_tensors.get(name)
    if made is not None:
        return made
    g = lowering.g
    rows, cols = shape
    repeat, blocks = grid.group_size // block, -(-cols // block)
    codes = torch.nn.functional.pad(grid.codes, (0, blocks * block - cols))
    packed = pack_rows(codes, width).reshape(rows, blocks, block * width // 8)
    scales = _per_block(grid.scales.float(), blocks, repeat)
    scales = scales.unsqueeze(-1) if gather_layout else scales.reshape(-1)
    inputs = [g.tensor(f"{name}.qweight", packed.numpy()), g.tensor(f"{name}.scales", scales.numpy())]
    if not grid.symmetric or width != grid.bits:  # the kernel's default zero point is 2^(width-1)
        zeros = pack_rows(_per_block(grid.zeros, blocks, repeat).to(torch.uint8), width).reshape(-1)
        inputs.append(g.tensor(f"{name}.zero_points", zeros.numpy()))
    lowering.nbits_tensors[name] = inputs
    return inputs


def gather_grid_rows(lowering, grid: IntegerGrid, shape: tuple[int, int], ids: str, name: str) -> str | None:
    """Rows ``ids`` of ``grid`` (float32 ``[*ids.shape, cols]``) gathered from the initializers the MatMulNBits of
    layer ``name`` reads, then decoded (4 and 8 bits by onnxruntime's GatherBlockQuantized, with ``ids`` [batch,
    seq]; other widths by standard ops): a token embedding tied to that layer (the output head) stores its table
    once. None when that layer would not run in one 2/4/8-bit MatMulNBits (the caller then stores the table
    apart)."""
    width, block = kernel_bits(grid.bits), nbits_block(grid.group_size)
    if lowering.weights != "fast" or width is None or block is None or (width == 8 and lowering.accuracy_level == 0):
        return None
    g = lowering.g
    rows, cols = shape
    blocks = -(-cols // block)
    if width in GATHER_BITS:
        gather_layout = shared_head_block(lowering, grid, shape) == block  # the head in our GridMatMul
        inputs = _nbits_tensors(lowering, grid, shape, width, block, name, gather_layout)
        return _gather_block_quantized(lowering, grid, shape, ids, width, block, inputs, name, gather_layout)
    inputs = _nbits_tensors(lowering, grid, shape, width, block, name)
    flat = g.op("Reshape", ids, g.const([-1]))
    packed = g.op("Reshape", g.op("Gather", inputs[0], flat), g.const([-1, blocks * block * width // 8]))
    codes = unpack_codes(g, packed, -1, blocks * block, width, FLOAT)

    def per_row(values: str, count: int) -> str:  # entries [r * count, (r + 1) * count) of a flat initializer
        at = g.op("Add", g.op("Mul", g.op("Unsqueeze", flat, g.const([-1])), g.const(count)),
                  g.const(np.arange(count)))
        return g.op("Gather", values, at)

    scale = g.op("Unsqueeze", per_row(inputs[1], blocks), g.const([-1]))
    if len(inputs) > 2:
        zero_bytes = -(-blocks * width // 8)
        zero = g.op("Unsqueeze", unpack_codes(g, per_row(inputs[2], zero_bytes), -1, blocks, width, FLOAT),
                    g.const([-1]))
    else:
        zero = g.const(float(1 << (width - 1)), np.float32)
    decoded = per_group(g, codes, -1, blocks * block, block, lambda v: g.op("Mul", g.op("Sub", v, zero), scale))
    if blocks * block != cols:
        decoded = g.op("Slice", decoded, g.const([0]), g.const([cols]), g.const([1]))
    return g.op("Reshape", decoded, g.op("Concat", g.op("Shape", ids), g.const([cols]), axis=0))


GATHER_BITS = (4, 8)  # the widths GatherBlockQuantized reads from MatMulNBits' packed bytes


def _gather_block_quantized(lowering, grid: IntegerGrid, shape, ids: str, width: int, block: int, inputs: list[str],
                            name: str, scales_shaped: bool = False) -> str:
    """Rows ``ids`` [batch, seq] decoded by onnxruntime's ``GatherBlockQuantized`` (one kernel) from the codes
    MatMulNBits reads ``[rows, blocks, block * width / 8]``, quantized along their last axis: the scales reshaped to
    ``[rows, blocks, 1]`` (a copy of the scales only, at load; none where they are stored so, ``scales_shaped``),
    the zero points stored again one a byte (the kernel's layout for one block on that axis; MatMulNBits' packs them
    across blocks)."""
    g = lowering.g
    rows, cols = shape
    blocks = -(-cols // block)
    extra = []
    if len(inputs) > 2:
        zeros = _per_block(grid.zeros, blocks, grid.group_size // block).to(torch.uint8).reshape(rows, blocks, 1)
        extra.append(g.tensor(f"{name}.zero_points_per_block", zeros.numpy()))
    scales = inputs[1] if scales_shaped else g.op("Reshape", inputs[1], g.const([rows, blocks, 1]))
    decoded = g.op("GatherBlockQuantized", inputs[0], ids, scales, *extra, domain=MS_DOMAIN, bits=width,
                   block_size=block, gather_axis=0, quantize_axis=2)
    decoded = g.op("Reshape", decoded, g.const([0, 0, blocks * block]))  # [batch, seq, blocks, block] -> rows
    if blocks * block != cols:
        decoded = g.op("Slice", decoded, g.const([0]), g.const([cols]), g.const([-1]))
    return decoded


def _dequantize_linear(lowering, x: str, grid: IntegerGrid, width: int, name: str) -> tuple[str, str]:
    """Blocked DequantizeLinear on the transposed codes ``[in, out]`` (blocks along the inputs) feeding
    MatMul directly, with float32 scales: the pattern onnxruntime fuses into its low-bit MatMul."""
    g = lowering.g
    codes = grid.codes
    signed = grid.symmetric and width == grid.bits
    if signed:  # symmetric: code - 2^(b-1) in two's complement, no zero point stored
        codes = codes ^ (1 << (width - 1))
    inputs = [_integer_tensor(lowering, f"{name}.qweight", codes.t().contiguous(), width, signed),
              g.tensor(f"{name}.scales", grid.scales.float().t().contiguous().numpy())]
    if not signed:
        inputs.append(_integer_tensor(lowering, f"{name}.zero_points", grid.zeros.t().contiguous().to(torch.uint8),
                                      width, False))
    w = g.op("DequantizeLinear", *inputs, axis=0, block_size=grid.group_size)
    kind = {(4, False): "uint4", (4, True): "int4", (2, False): "uint2", (2, True): "int2"}.get(
        (width, signed), "int8" if signed else "uint8")
    return kind, g.op("MatMul", x, w)


def _integer_tensor(lowering, name: str, values: torch.Tensor, bits: int, signed: bool) -> str:
    if bits == 8:
        arr = values.numpy().view(np.int8) if signed else values.numpy()
        return lowering.g.tensor(name, arr)
    if bits == 2:
        lowering.opset = max(lowering.opset, 25)
    raw = pack_rows(values.reshape(1, -1), bits).numpy().tobytes()
    return lowering.g.packed(name, SUB_BYTE_TYPES[(bits, signed)], list(values.shape), raw)
