"""llama.cpp's k-quant grids ("k-quants", ggml-org/llama.cpp pull request 1684, Kawrakow, 2023) as quantization math.

A k-quant stores weights in super-blocks of 256 inputs split into sub-blocks of 16 or 32. Each sub-block has its own
scale (and, for the asymmetric types, its own minimum), and those are themselves integers times one float16 factor
per super-block (``d``, and ``dmin`` for the minima):

    symmetric   Q3_K (3 bits, 16 x 16), Q6_K (6 bits, 16 x 16):  value = d * l * (code - 2^(bits-1)),
                l signed (6 bits: -32..31; 8 bits: -128..127)
    asymmetric  Q2_K (2 bits, 16 x 16; 4-bit l and m), Q4_K (4 bits, 8 x 32), Q5_K (5 bits, 8 x 32; 6-bit l and m):
                value = d * l * code - dmin * m

In ``compress.quant`` a k-quant is a grid like any other: each group (sub-block) has an effective ``scale = d * l``
(exact in float32) and, for the asymmetric types, a ``zero`` that holds the effective minimum ``dmin * m`` (not a
zero point). :func:`split` turns effective values into (factor, integers) and is idempotent: splitting values it
produced gives back the same factor and integers, so a format rebuilds the exact stored bytes from the effective
scales alone.

Fitting (:func:`raw_params`, then :func:`quantize_scales`): a sub-block's range sets its raw scale (the symmetric
types map the value of largest magnitude onto the code ``0``, i.e. ``-2^(bits-1)``, as llama.cpp does, so the sign
of ``l`` follows that value); then each super-block's factor is its largest scale over the largest integer, and
every scale rounds to an integer multiple of it (at least 1 where the raw scale is not 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER_BLOCK = 256


@dataclass(frozen=True)
class KType:
    name: str         # the GGML type
    bits: int         # per code
    sub_block: int    # inputs per scale
    symmetric: bool
    scale_bits: int   # per sub-block scale (and minimum)
    fallback: str     # the GGML type llama.cpp writes a tensor whose width is no multiple of 256 in

    @property
    def zero_point(self) -> float:
        """The fixed code of value 0 for the symmetric types (``2^(bits-1)``)."""
        return float(1 << (self.bits - 1))

    @property
    def scale_range(self) -> tuple[int, int]:
        """The integers a sub-block scale (or minimum) takes."""
        if self.symmetric:
            return -(1 << (self.scale_bits - 1)), (1 << (self.scale_bits - 1)) - 1
        return 0, (1 << self.scale_bits) - 1


KTYPES = {
    "gguf-q2_k": KType("Q2_K", 2, 16, False, 4, "Q4_0"),  # fallbacks: llama.cpp's llama_tensor_get_type
    "gguf-q3_k": KType("Q3_K", 3, 16, True, 6, "Q4_0"),
    "gguf-q4_k": KType("Q4_K", 4, 32, False, 6, "Q5_0"),
    "gguf-q5_k": KType("Q5_K", 5, 32, False, 6, "Q5_1"),
    "gguf-q6_k": KType("Q6_K", 6, 16, True, 8, "Q8_0"),
}
# llama.cpp's fallback types as our integer grids (bits, symmetric), all in groups of 32.
FALLBACK_GRIDS = {"Q4_0": (4, True), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}


def ktype(grid: str) -> KType | None:
    return KTYPES.get(grid)


def raw_params(lo: torch.Tensor, hi: torch.Tensor, kt: KType) -> tuple[torch.Tensor, torch.Tensor]:
    """Unrounded (scale, zero) of sub-blocks whose values span ``[lo, hi]``: for the symmetric types the scale maps the
    value of largest magnitude to code 0 and ``zero`` is the fixed ``2^(bits-1)``; for the asymmetric ones the codes
    span ``[min(lo, 0), hi]`` and ``zero`` is the minimum's magnitude."""
    if kt.symmetric:
        extreme = torch.where(hi.abs() >= lo.abs(), hi, lo)
        return -extreme / kt.zero_point, torch.full_like(extreme, kt.zero_point)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    return ((hi - lo) / ((1 << kt.bits) - 1)).clamp_min(0), -lo


def split(values: torch.Tensor, kt: KType, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``values[..., S * n]`` (n sub-blocks per super-block) as (float16 factor ``[..., S]``, integers ``[..., S * n]``
    in the type's range, int16) with ``factor * integer`` close to each value. ``signed``: the values are the
    symmetric types' scales (the largest magnitude takes the most negative integer); else non-negative scales or
    minima (the largest takes the largest integer)."""
    n = SUPER_BLOCK // kt.sub_block
    v = values.float().reshape(*values.shape[:-1], -1, n)
    lo, hi = kt.scale_range if signed else (0, (1 << kt.scale_bits) - 1)
    top = lo if signed else hi
    at = (v.abs() if signed else v).argmax(-1, keepdim=True)
    factor = (v.gather(-1, at) / top).squeeze(-1).half()
    f = factor.float().unsqueeze(-1)
    ints = torch.round(v / torch.where(f == 0, torch.inf, f)).clamp(lo, hi)
    ints = torch.where((ints == 0) & (v != 0) & (f != 0), torch.sign(v / f), ints)  # a live sub-block keeps a step
    # the largest takes exactly ``top`` (float16 rounding of a subnormal factor could move it): then splitting the
    # result again finds the same factor and integers
    ints.scatter_(-1, at, torch.where(f == 0, 0.0, float(top)))
    return factor, ints.to(torch.int16).reshape(values.shape)


def expand(factor: torch.Tensor, ints: torch.Tensor, kt: KType) -> torch.Tensor:
    """float32 ``factor * ints`` per sub-block (the inverse of :func:`split`)."""
    n = SUPER_BLOCK // kt.sub_block
    return (factor.float().unsqueeze(-1) * ints.float().reshape(*ints.shape[:-1], -1, n)).reshape(ints.shape)


def rounded(values: torch.Tensor, kt: KType, signed: bool) -> torch.Tensor:
    """``values`` as the type stores them: :func:`split`, then :func:`expand`."""
    return expand(*split(values, kt, signed), kt)


def quantize_scales(scale: torch.Tensor, zero: torch.Tensor, kt: KType) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective (scale, zero) ``[rows, groups]`` the type stores for the raw ones: each super-block's scales (and
    minima) rounded to integers times one float16 factor."""
    return rounded(scale, kt, kt.symmetric), zero if kt.symmetric else rounded(zero, kt, False)
