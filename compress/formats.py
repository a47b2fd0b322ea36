"""Compressed weight formats, each with exact storage accounting.

A format is data: the tensors it writes to disk (``tensors()``), the JSON metadata needed to
read them back (``meta()``), and ``dequantize()`` for the torch reference path. Its size is the
bytes of exactly those tensors, so the report's numbers are what the checkpoint holds.

Formats are registered by ``kind`` so checkpoints can be read back without knowing which
pass wrote them. Formats compose: a sparse format wraps the format of its kept values.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .packing import pack_rows, unpack_rows
from .quant import QuantSpec, decode, encode, fit_params, pad_to_groups

FORMATS: dict[str, type[WeightFormat]] = {}


def register_format(cls):
    FORMATS[cls.kind] = cls
    return cls


class WeightFormat:
    """A weight matrix ``[out_features, in_features]`` in some stored representation."""

    kind: ClassVar[str]
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:  # float32 [out, in]
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> WeightFormat:
        raise NotImplementedError

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bytes_by_part(self) -> dict[str, int]:
        return {k: t.numel() * t.element_size() for k, t in self.tensors().items()}

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.numel

    def describe(self) -> str:
        return self.kind

    @property
    def mask(self) -> torch.Tensor | None:
        """Boolean keep-mask when the format is sparse, else None."""
        return None


def format_from_saved(meta: dict, tensors: dict[str, torch.Tensor]) -> WeightFormat:
    return FORMATS[meta["kind"]].from_saved(meta, tensors)


@register_format
class DenseWeight(WeightFormat):
    """An uncompressed weight stored in float16/bfloat16/float32."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float16):
        self.weight = weight.detach().to(dtype).contiguous()
        self.shape = tuple(self.weight.shape)

    def dequantize(self):
        return self.weight.float()

    def tensors(self):
        return {"weight": self.weight}

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape)}

    @classmethod
    def from_saved(cls, meta, tensors):
        w = tensors["weight"]
        return cls(w, w.dtype)

    def describe(self):
        return f"dense {str(self.weight.dtype).removeprefix('torch.')}"


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

    def __init__(self, mask: torch.Tensor, values: WeightFormat, pattern: str | None = None):
        self.shape = tuple(mask.shape)
        self._mask = mask.bool()
        self.values = values
        self.pattern = pattern or "unstructured"

    @property
    def mask(self):
        return self._mask

    def dequantize(self):
        dense = torch.zeros(self.shape)
        dense[self._mask] = self.values.dequantize().flatten()
        return dense

    def _position_tensors(self) -> dict[str, torch.Tensor]:
        nm = nm_pattern(self.pattern)
        if nm is None:
            return {"mask": pack_rows(self._mask.to(torch.uint8), 1)}
        n, m = nm
        rows, k = self.shape
        within = torch.arange(k).remainder(m).expand(rows, k)
        idx = within[self._mask].reshape(rows, -1)
        return {"indices": pack_rows(idx.to(torch.uint8), (m - 1).bit_length())}

    def tensors(self):
        t = self._position_tensors()
        t.update({f"values.{k}": v for k, v in self.values.tensors().items()})
        return t

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape), "pattern": self.pattern,
                "kept_per_row": int(self._mask[0].sum()), "values": self.values.meta()}

    @classmethod
    def from_saved(cls, meta, tensors):
        rows, k = meta["shape"]
        inner = {k2[len("values."):]: v for k2, v in tensors.items() if k2.startswith("values.")}
        values = format_from_saved(meta["values"], inner)
        nm = nm_pattern(meta["pattern"])
        if nm is None:
            mask = unpack_rows(tensors["mask"], 1, k).bool()
        else:
            n, m = nm
            idx = unpack_rows(tensors["indices"], (m - 1).bit_length(), meta["kept_per_row"]).long()
            cols = (torch.arange(meta["kept_per_row"]) // n * m).expand(rows, -1) + idx
            mask = torch.zeros(rows, k, dtype=torch.bool).scatter_(1, cols, True)
        return cls(mask, values, meta["pattern"])

    def describe(self):
        sparsity = 1 - self._mask.float().mean().item()
        pat = self.pattern if self.pattern != "unstructured" else f"{sparsity:.0%} sparse"
        return f"{pat} + {self.values.describe()}"


from . import palette  # noqa: E402,F401  (registers the look-up-table and outlier formats)
