"""Quantization math shared by every quantizing pass (RTN, GPTQ, mixed precision).

A group of weights ``x[rows, g]`` is mapped to integer codes with one scale (and, for
asymmetric integer grids, one zero point) per row of the group:

- ``int`` grid, asymmetric: ``code = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x ~= (code - z) * s``;
- ``int`` grid, symmetric: as above with ``z = 2^(b-1)`` fixed (not stored);
- non-uniform grids (``nf``, ``fp4``): ``x ~= grid[code] * s`` with ``s`` the group's absmax.
  NormalFloat follows QLoRA (Dettmers et al., 2023); FP4 is the E2M1 value set. Both are
  compared against integer grids in "Understanding the Impact of Post-Training Quantization
  on Large Language Models".
- llama.cpp's k-quants (``gguf-q2_k`` ... ``gguf-q6_k``, see ``compress.kquants``): groups are the type's
  sub-blocks and their scales (and minima) are integers times one float16 factor per super-block of 256 inputs;
  for the asymmetric types ``zero`` holds the group's minimum ``m`` and ``x ~= code * s - m``.

Scales are rounded to float16 *before* codes are chosen, so the codes fit the stored scale.
``clip_search`` shrinks the range over a small grid and keeps, per row, the shrink with the
least ``|x - q(x)|^2.4`` error (the norm the GPTQ reference uses for its MSE search).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .kquants import FALLBACK_GRIDS, KTYPES, SUPER_BLOCK, ktype, quantize_scales, raw_params

CODEBOOKS = ("nf", "fp4")  # non-uniform grids: a code book scaled by the group's absmax
GRIDS = ("int", *CODEBOOKS, *KTYPES)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int | None = 128  # None: one group per output row (per-channel)
    symmetric: bool = False
    grid: str = "int"
    clip_search: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def has_zeros(self) -> bool:
        return self.grid == "int" and not self.symmetric

    @property
    def is_codebook(self) -> bool:
        """A non-uniform grid (``nf``, ``fp4``): no zero tensor, the scale is the group's absmax."""
        return self.grid in CODEBOOKS

    def groups(self, in_features: int) -> int:
        size = self.group_size or in_features
        return (in_features + size - 1) // size

    def for_width(self, in_features: int) -> QuantSpec:
        """This grid on a layer of ``in_features`` inputs: a k-quant on a width no multiple of 256 becomes the grid in
        groups of 32 that llama.cpp falls back to for its type; every other grid stays."""
        kt = ktype(self.grid)
        if kt is None or in_features % SUPER_BLOCK == 0:
            return self
        bits, symmetric = FALLBACK_GRIDS[kt.fallback]
        return QuantSpec(bits, 32, symmetric, "int", self.clip_search)


@cache
def grid_values(grid: str, bits: int) -> torch.Tensor:
    """Sorted code book in [-1, 1] for a non-uniform grid."""
    if grid == "fp4":
        if bits != 4:
            raise ValueError("the fp4 (E2M1) grid has exactly 4 bits")
        pos = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        vals = torch.cat([-pos.flip(0)[:-1], pos, torch.tensor([0.0])])  # 16 codes, 0 twice
        return (vals / 6.0).sort().values
    if grid == "nf":
        # QLoRA's construction: quantiles of N(0,1), asymmetric so that 0 is exact.
        offset = 0.9677083
        half = 1 << (bits - 1)
        pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
        neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
        vals = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
        return (vals / vals.abs().max()).sort().values.float()
    raise ValueError(f"unknown grid {grid!r}")


def _params_for_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    kt = ktype(spec.grid)
    if kt is not None:
        return raw_params(lo, hi, kt)  # rounded per super-block once every group is fitted (fit_params)
    if spec.grid != "int":
        scale = torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-8)
        return scale.half().float(), None
    if spec.symmetric:
        amax = torch.maximum(hi.abs(), lo.abs())
        scale = (2 * amax / spec.maxq).clamp_min(1e-8).half().float()
        return scale, torch.full_like(scale, float((spec.maxq + 1) // 2))
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / spec.maxq).clamp_min(1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec):
    """Codes (uint8) of ``x[rows, ...]`` given per-row ``scale``/``zero`` (broadcast on the last dim)."""
    s = scale.unsqueeze(-1) if x.dim() > scale.dim() else scale
    kt = ktype(spec.grid)
    if kt is not None:
        assert zero is not None, "k-quants have a zero tensor"
        z = zero.unsqueeze(-1) if x.dim() > zero.dim() else zero
        s = torch.where(s == 0, torch.inf, s)  # a sub-block whose scale rounded to 0 holds one value
        q = torch.round(x / s) + z if kt.symmetric else torch.round((x + z) / s)
        return torch.clamp(q, 0, spec.maxq).to(torch.uint8)
    if spec.grid != "int":
        grid = grid_values(spec.grid, spec.bits).to(x.device)
        # nearest code book entry through the midpoints of the sorted grid
        mids = (grid[1:] + grid[:-1]) / 2
        return torch.bucketize((x / s).contiguous(), mids).to(torch.uint8)
    assert zero is not None, "integer grids have zero points"
    z = zero.unsqueeze(-1) if x.dim() > zero.dim() else zero
    return torch.clamp(torch.round(x / s) + z, 0, spec.maxq).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec):
    """Values of ``codes`` (float32), the inverse of :func:`encode` up to rounding."""
    s = scale.unsqueeze(-1) if codes.dim() > scale.dim() else scale
    kt = ktype(spec.grid)
    if kt is not None and not kt.symmetric:
        assert zero is not None, "k-quants have a zero tensor"
        z = zero.unsqueeze(-1) if codes.dim() > zero.dim() else zero
        return codes.float() * s - z
    if spec.is_codebook:
        return grid_values(spec.grid, spec.bits).to(codes.device)[codes.long()] * s
    assert zero is not None, "integer grids have zero points"
    z = zero.unsqueeze(-1) if codes.dim() > zero.dim() else zero
    return (codes.float() - z) * s


FIT_ROWS = 512  # rows per clip search: its temporaries stay a few MB whatever the layer's height


def fit_params(x: torch.Tensor, spec: QuantSpec, steps: int = 20, max_shrink: float = 0.25):
    """Per-row scale and zero of a group ``x[rows, g]`` (min/max, optionally clip-searched).

    Rows are fitted ``FIT_ROWS`` at a time (each row's fit is independent): the search over a whole
    3072-row GPTQ batch of SmolLM2 at once raised the process's peak by ~80 MB."""
    parts = [_fit_rows(rows, spec, steps, max_shrink) for rows in x.split(FIT_ROWS)]
    scale, zero = torch.cat([s for s, _ in parts]), None if parts[0][1] is None else torch.cat([z for _, z in parts])
    kt = ktype(spec.grid)
    if kt is not None:
        if x.dim() != 3 or x.shape[1] * x.shape[2] % SUPER_BLOCK:
            raise ValueError(f"{kt.name} fits whole rows of whole super-blocks of 256 inputs, got {list(x.shape)}")
        assert zero is not None, "k-quants have a zero tensor"
        scale, zero = quantize_scales(scale, zero, kt)
    return scale, zero


def _fit_rows(x: torch.Tensor, spec: QuantSpec, steps: int, max_shrink: float):
    lo, hi = x.min(dim=-1).values, x.max(dim=-1).values
    scale, zero = _params_for_range(lo, hi, spec)
    if not spec.clip_search:
        return scale, zero
    best = _group_error(x, scale, zero, spec)
    for i in range(1, steps + 1):
        p = 1 - max_shrink * i / steps
        s_try, z_try = _params_for_range(lo * p, hi * p, spec)
        err = _group_error(x, s_try, z_try, spec)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s_try, scale)
        if zero is not None:
            zero = torch.where(better, z_try, zero)
    return scale, zero


def _group_error(x, scale, zero, spec):
    return (decode(encode(x, scale, zero, spec), scale, zero, spec) - x).abs().pow(2.4).sum(-1)


def pad_to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pad the columns of ``w`` to a multiple of ``group_size`` by repeating the last column,
    so a shorter last group keeps its own min/max."""
    k = w.shape[1]
    pad = (-k) % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize ``w[out, in]`` group by group (no packing):
    the values :func:`compress.formats.quantize_rtn` stores, for searches that try many options."""
    out, k = w.shape
    gs = spec.group_size or k
    groups = pad_to_groups(w.float(), gs).reshape(out, -1, gs)
    scale, zero = fit_params(groups, spec)
    return decode(encode(groups, scale, zero, spec), scale, zero, spec).reshape(out, -1)[:, :k]
