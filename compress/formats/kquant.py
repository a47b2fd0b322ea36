"""llama.cpp's k-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) stored as GGUF's own block bytes.

Stored: ``blocks`` uint8 ``[out, in / 256 * type_size]``, each row's super-blocks exactly as a GGUF file holds them, so
the GGUF export copies the bytes. The grids' math (fitting, the two-level scales) lives in ``compress.kquants`` and
``compress.quant``; this module is the byte layout and what reads it.

Per super-block of 256 weights (bytes in order; ``d``/``dmin`` float16; "planes" put value ``p * W + j`` of a group
of ``P * W`` values in byte ``j`` at bit ``p * bits``):

    Q2_K  84 B: scales[16] (low nibble l, high nibble m), codes 2-bit (2 groups x 4 planes x 32), d, dmin
    Q3_K 110 B: high code bits (8 planes x 32), low 2 bits (as Q2_K), scales[12] (l + 32, 6-bit, see
                ``_pack_6bit_16``), d
    Q4_K 144 B: d, dmin, scales[12] (l and m, 6-bit, see ``_pack_6bit_8x2``), codes 4-bit (4 groups x 2 planes x 32)
    Q5_K 176 B: d, dmin, scales[12] (as Q4_K), fifth code bits (8 planes x 32), low 4 bits (as Q4_K)
    Q6_K 210 B: low 4 bits (2 groups x 2 planes x 64), high 2 bits (2 groups x 4 planes x 32), scales int8[16], d
"""

from __future__ import annotations

import numpy as np
import torch

from ..kquants import KTYPES, SUPER_BLOCK, KType, expand, ktype, split
from ..packing import pack_rows
from ..quant import QuantSpec, decode
from .base import LayoutError, NotAnIntegerGrid, WeightFormat, register_format
from .onnx_custom import grid_matmul
from .onnx_ops import FLOAT, as_float, per_group, torch_initializer, unpack_codes

TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _planes(f: torch.Tensor, groups: int, planes: int, width: int, bits: int) -> torch.Tensor:
    """Values ``f[n, groups * planes * width]`` (each < 2^bits) as bytes ``[n, groups * width]``."""
    f = f.to(torch.uint8).reshape(f.shape[0], groups, planes, width)
    out = torch.zeros(f.shape[0], groups, width, dtype=torch.uint8)
    for p in range(planes):
        out |= f[:, :, p] << (bits * p)
    return out.reshape(f.shape[0], -1)


def _unplanes(b: torch.Tensor, groups: int, planes: int, width: int, bits: int) -> torch.Tensor:
    shifts = torch.arange(planes, dtype=torch.uint8).reshape(1, 1, planes, 1) * bits
    return ((b.reshape(b.shape[0], groups, 1, width) >> shifts) & ((1 << bits) - 1)).reshape(b.shape[0], -1)


def _pack_6bit_16(s: torch.Tensor) -> torch.Tensor:
    """16 6-bit values in 12 bytes (Q3_K): bytes 0-7 hold the low nibbles of values j and j + 8; byte 8 + k holds
    the top 2 bits of values k, k + 4, k + 8, k + 12 at bits 0, 2, 4, 6."""
    low = _planes(s & 0xF, 1, 2, 8, 4)
    return torch.cat([low, _planes(s >> 4, 1, 4, 4, 2)], dim=1)


def _unpack_6bit_16(b: torch.Tensor) -> torch.Tensor:
    return _unplanes(b[:, :8], 1, 2, 8, 4) | (_unplanes(b[:, 8:], 1, 4, 4, 2) << 4)


def _pack_6bit_8x2(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 scales and 8 minima (6-bit) in 12 bytes (Q4_K, Q5_K): bytes 0-3 scales 0-3, bytes 4-7 minima 0-3 (each with
    the top 2 bits of value j + 4 at bits 6-7); bytes 8-11 the low nibbles of scale j + 4 and minimum j + 4."""
    head = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6)], dim=1)
    return torch.cat([head, (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], dim=1)


def _unpack_6bit_8x2(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, m, tail = b[:, :4], b[:, 4:8], b[:, 8:]
    sc = torch.cat([s & 0x3F, (tail & 0xF) | ((s >> 6) << 4)], dim=1)
    mins = torch.cat([m & 0x3F, (tail >> 4) | ((m >> 6) << 4)], dim=1)
    return sc, mins


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().contiguous().view(torch.uint8).reshape(t.shape[0], 2)


def _from_fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def pack(kt: KType, codes, d, ints, dmin=None, mins=None) -> torch.Tensor:
    """Super-blocks as bytes ``[n, type_size]`` from codes ``[n, 256]``, factors ``[n]`` and sub-block integers
    ``[n, subs]`` (the symmetric types' signed)."""
    c = codes.to(torch.uint8)
    if kt.name == "Q2_K":
        scales = (ints.to(torch.uint8) & 0xF) | (mins.to(torch.uint8) << 4)
        parts = [scales, _planes(c, 2, 4, 32, 2), _fp16(d), _fp16(dmin)]
    elif kt.name == "Q3_K":
        parts = [_planes(c >> 2, 1, 8, 32, 1), _planes(c & 3, 2, 4, 32, 2), _pack_6bit_16((ints + 32).to(torch.uint8)),
                 _fp16(d)]
    elif kt.name in ("Q4_K", "Q5_K"):
        parts = [_fp16(d), _fp16(dmin), _pack_6bit_8x2(ints.to(torch.uint8), mins.to(torch.uint8))]
        if kt.name == "Q5_K":
            parts.append(_planes(c >> 4, 1, 8, 32, 1))
        parts.append(_planes(c & 0xF, 4, 2, 32, 4))
    else:  # Q6_K
        parts = [_planes(c & 0xF, 2, 2, 64, 4), _planes(c >> 4, 2, 4, 32, 2), ints.to(torch.int8).view(torch.uint8),
                 _fp16(d)]
    return torch.cat(parts, dim=1)


def unpack(kt: KType, b: torch.Tensor):
    """(codes ``[n, 256]`` uint8, d ``[n]`` float16, ints ``[n, subs]`` int16, dmin, mins (None when symmetric))."""
    if kt.name == "Q2_K":
        scales, qs = b[:, :16], b[:, 16:80]
        return (_unplanes(qs, 2, 4, 32, 2), _from_fp16(b[:, 80:82]), (scales & 0xF).to(torch.int16),
                _from_fp16(b[:, 82:84]), (scales >> 4).to(torch.int16))
    if kt.name == "Q3_K":
        codes = _unplanes(b[:, 32:96], 2, 4, 32, 2) | (_unplanes(b[:, :32], 1, 8, 32, 1) << 2)
        return codes, _from_fp16(b[:, 108:110]), _unpack_6bit_16(b[:, 96:108]).to(torch.int16) - 32, None, None
    if kt.name in ("Q4_K", "Q5_K"):
        sc, mins = _unpack_6bit_8x2(b[:, 4:16])
        low = b[:, 16:144] if kt.name == "Q4_K" else b[:, 48:176]
        codes = _unplanes(low, 4, 2, 32, 4)
        if kt.name == "Q5_K":
            codes = codes | (_unplanes(b[:, 16:48], 1, 8, 32, 1) << 4)
        return codes, _from_fp16(b[:, :2]), sc.to(torch.int16), _from_fp16(b[:, 2:4]), mins.to(torch.int16)
    codes = _unplanes(b[:, :128], 2, 2, 64, 4) | (_unplanes(b[:, 128:192], 2, 4, 32, 2) << 4)
    return codes, _from_fp16(b[:, 208:210]), b[:, 192:208].view(torch.int8).to(torch.int16), None, None


def spec_of(grid: str) -> QuantSpec:
    kt = KTYPES[grid]
    return QuantSpec(kt.bits, kt.sub_block, kt.symmetric, grid)


@register_format
class KQuantWeight(WeightFormat):
    """A weight ``[out, in]`` (``in`` a multiple of 256) in one k-quant type, as GGUF's block bytes."""

    kind = "gguf_k"

    def __init__(self, blocks: torch.Tensor, grid: str, shape):
        self.blocks, self.grid, self.shape = blocks, grid, tuple(shape)
        self.kt, self.spec = KTYPES[grid], spec_of(grid)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
        """From codes ``[out, in]`` and the effective per-group ``scale``/``zero`` that ``quant.fit_params`` gave
        (already integers times a float16 factor: splitting them again is exact)."""
        kt = ktype(spec.grid)
        assert kt is not None, spec
        out, k = codes.shape
        n = out * (k // SUPER_BLOCK)
        d, ints = split(scale, kt, kt.symmetric)
        dmin, mins = split(zero, kt, False) if not kt.symmetric else (None, None)
        subs = SUPER_BLOCK // kt.sub_block
        blocks = pack(kt, codes.reshape(n, SUPER_BLOCK), d.reshape(n), ints.reshape(n, subs),
                      None if dmin is None else dmin.reshape(n), None if mins is None else mins.reshape(n, subs))
        return cls(blocks.reshape(out, -1), spec.grid, (out, k))

    def parts(self):
        """(codes ``[out, in]`` uint8, d ``[out, S]`` float16, ints ``[out, groups]``, dmin, mins)."""
        out, k = self.shape
        codes, d, ints, dmin, mins = unpack(self.kt, self.blocks.reshape(-1, TYPE_SIZE[self.kt.name]))

        def rows(t):
            return None if t is None else t.reshape(out, -1)

        return codes.reshape(out, k), rows(d), rows(ints), rows(dmin), rows(mins)

    def unpacked(self):
        """(codes [out, in] uint8, scale [out, groups] float32, zero [out, groups] float32): ``quant.decode``'s
        inputs."""
        codes, d, ints, dmin, mins = self.parts()
        scale = expand(d, ints, self.kt)
        if self.kt.symmetric:
            return codes, scale, torch.full_like(scale, self.kt.zero_point)
        return codes, scale, expand(dmin, mins, self.kt)

    def dequantize(self):
        codes, scale, zero = self.unpacked()
        out, k = self.shape
        return decode(codes.reshape(out, -1, self.kt.sub_block), scale, zero, self.spec).reshape(out, k)

    def take_rows(self, rows):
        part = KQuantWeight(self.blocks[rows.to(torch.long)], self.grid, (len(rows), self.shape[1]))
        return part.dequantize()

    def split_rows(self, sizes: list[int]) -> list[KQuantWeight]:
        starts = np.cumsum([0, *sizes]).tolist()
        return [KQuantWeight(self.blocks[a:b], self.grid, (b - a, self.shape[1]))
                for a, b in zip(starts, starts[1:], strict=False)]

    def tensors(self):
        return {"blocks": self.blocks}

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape), "grid": self.grid}

    @classmethod
    def from_saved(cls, meta, tensors):
        return cls(tensors["blocks"], meta["grid"], meta["shape"])

    @classmethod
    def layout(cls, meta):
        out, k = meta["shape"]
        kt = KTYPES[meta["grid"]]
        if k % SUPER_BLOCK:
            raise ValueError(f"{kt.name} needs inputs in multiples of {SUPER_BLOCK}, the shape says {k}")
        return {"blocks": ((torch.uint8,), (out, k // SUPER_BLOCK * TYPE_SIZE[kt.name]))}

    def check_values(self):
        _, d, _, dmin, _ = self.parts()
        if not torch.isfinite(d).all() or (dmin is not None and not torch.isfinite(dmin).all()):
            raise LayoutError("super-block factors hold inf or nan")

    @staticmethod
    def stored_bytes(shape, spec: QuantSpec) -> int:
        out, k = shape
        return out * k // SUPER_BLOCK * TYPE_SIZE[KTYPES[spec.grid].name]

    def integer_grid(self):
        raise NotAnIntegerGrid(f"{self.describe()}: its group scales are integers times a float16 factor per 256 "
                               "inputs, which only GGUF holds")

    def onnx_matmul(self, lowering, x, name):
        """Our grid operator (``onnx_custom``) on the codes row-packed at the type's width and each sub-block's scale
        (and minimum, as a negative offset) multiplied out in float32, so the session keeps the codes."""
        codes, scale, zero = self.unpacked()
        if self.kt.symmetric:
            offsets, zero_point = None, float(self.kt.zero_point)
        else:
            offsets, zero_point = -zero, 0.0
        y = grid_matmul(lowering, x, name, pack_rows(codes, self.kt.bits), scale, offsets, None, zero_point,
                        self.kt.bits, self.kt.sub_block, self.shape)
        return None if y is None else (f"GridMatMul {self.kt.name}", y)

    def onnx_weight(self, g, prefix):
        """Codes (row-packed), the sub-block integers and the super-block factors, multiplied out in the graph."""
        rows, cols = self.shape
        codes, d, ints, dmin, mins = self.parts()
        subs = SUPER_BLOCK // self.kt.sub_block

        def effective(name, factor, integers):
            f = g.op("Unsqueeze", as_float(g, f"{prefix}.{name}_factor", factor), g.const([-1]))
            i = g.op("Cast", torch_initializer(g, f"{prefix}.{name}", integers.to(torch.int8)), to=FLOAT)
            per_block = g.op("Mul", g.op("Reshape", i, g.const([rows, -1, subs])), f)
            return g.op("Unsqueeze", g.op("Reshape", per_block, g.const([rows, -1])), g.const([-1]))

        packed = torch_initializer(g, f"{prefix}.codes", pack_rows(codes, self.kt.bits))
        values = unpack_codes(g, packed, rows, cols, self.kt.bits, FLOAT)
        scale = effective("scales", d, ints)
        if self.kt.symmetric:
            half = g.const(self.kt.zero_point, np.float32)
            return per_group(g, values, rows, cols, self.kt.sub_block,
                             lambda v: g.op("Mul", g.op("Sub", v, half), scale))
        minimum = effective("mins", dmin, mins)
        return per_group(g, values, rows, cols, self.kt.sub_block,
                         lambda v: g.op("Sub", g.op("Mul", v, scale), minimum))

    def describe(self):
        return f"{self.kt.name} ({self.kt.bits}-bit, super-blocks of {SUPER_BLOCK})"

