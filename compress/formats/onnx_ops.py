"""ONNX building blocks the formats' lowerings share: initializers in their stored dtype, codes unpacked
from row-packed bytes, per-group arithmetic. ``g`` is a ``compress.export.graph.Graph``."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

FLOAT = TensorProto.FLOAT
MS_DOMAIN = "com.microsoft"
SUB_BYTE_TYPES = {(4, False): TensorProto.UINT4, (4, True): TensorProto.INT4,
                  (2, False): TensorProto.UINT2, (2, True): TensorProto.INT2}


class UnsupportedFormat(ValueError):
    """A weight format the ONNX exporter has no lowering for."""


def torch_initializer(g, name: str, t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return g.packed(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes())
    return g.tensor(name, t.numpy())


def as_float(g, name: str, t: torch.Tensor) -> str:
    """An initializer holding ``t`` in its stored dtype, cast to float32 in the graph when needed."""
    init = torch_initializer(g, name, t)
    return init if t.dtype == torch.float32 else g.op("Cast", init, to=FLOAT)


def unpack_codes(g, packed: str, rows: int, count: int, bits: int, to: int = TensorProto.INT64) -> str:
    """Codes ``[rows, count]`` (as type ``to``) from row-packed bytes (layout of ``compress.packing``); ``rows``
    may be -1 (a number known at run time).

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


def per_group(g, values: str, rows: int, cols: int, group_size: int, apply) -> str:
    """``apply(values [rows, groups, group_size])`` back as ``[rows, cols]`` (the last group padded); ``rows`` may
    be -1 (a number known at run time)."""
    groups = -(-cols // group_size)
    if groups * group_size > cols:
        values = g.op("Pad", values, g.const([0, 0, 0, groups * group_size - cols]))
    out = g.op("Reshape", apply(g.op("Reshape", values, g.const([rows, groups, group_size]))),
               g.const([rows, groups * group_size]))
    return out if groups * group_size == cols else g.op("Slice", out, g.const([0]), g.const([cols]), g.const([1]))


def scalar(v, dtype):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([v], dtype=dtype))
