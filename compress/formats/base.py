"""What every weight format declares, and the registry that reads checkpoints back.

A format is one object that owns everything about its layout:

- ``tensors()`` / ``meta()`` / ``from_saved()``: the exact tensors it writes and how to read them back;
  its size is the bytes of exactly those tensors, so the report's numbers are what the file holds;
- ``layout(meta)`` / ``check_values()``: the dtype and shape of every tensor its metadata implies, and the
  value ranges it relies on, checked whenever a saved format is read (:func:`format_from_saved`);
- ``dequantize()``: the float32 weight, the torch reference path;
- ``kernel_values(kept)``: how the CUDA kernels read its values (``compress.kernels.plan``);
  ``kernel_plan()`` the whole launch plan (sparse layouts add their column positions);
- ``onnx_weight(g, prefix)``: an ONNX subgraph computing the float32 weight from its stored bytes;
  ``onnx_matmul(lowering, x, name)``: a runtime operator that reads the bytes directly, when one exists;
- ``integer_grid()``: the weight as integer codes on a uniform grid (:class:`IntegerGrid`), the common form
  the serving exports (compressed-tensors, GPTQ, GGUF: ``compress.export``) write in their own bytes.

Formats are registered by ``kind`` (``@register_format``) so a checkpoint reads back without knowing which
pass wrote it. Formats compose: a sparse format wraps the format of its kept values, outliers wrap an
inner format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

FORMATS: dict[str, type[WeightFormat]] = {}


def register_format(cls):
    FORMATS[cls.kind] = cls
    return cls


class NoKernel(TypeError):
    """The GPU kernels have no plan for this format (the torch path serves it)."""


class LayoutError(ValueError):
    """Saved tensors disagree with what their format's metadata declares."""


class NotAnIntegerGrid(TypeError):
    """The weight is not integer codes on a uniform grid (a code book, outliers, a bitmap): serving formats
    that store such codes cannot hold it exactly."""


@dataclass
class IntegerGrid:
    """A weight ``[out, in]`` as ``(codes - zeros) * scales``, one scale and zero point per row and group of
    ``group_size`` consecutive inputs (the last group may be shorter).

    ``codes`` uint8 ``[out, in]`` in ``[0, 2^bits)``; ``scales`` float16 (or float32) ``[out, groups]``; ``zeros`` uint8
    ``[out, groups]`` (``2^(bits-1)`` everywhere when ``symmetric``); ``sparsity`` names a structure the zeros
    follow ("2:4"), pruned weights holding their group's zero point."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    sparsity: str | None = None


Layout = dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...]]]  # tensor name -> (allowed dtypes, shape)


class WeightFormat:
    """A weight matrix ``[out_features, in_features]`` in some stored representation."""

    kind: ClassVar[str]
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:  # float32 [out, in]
        raise NotImplementedError

    def take_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), in]``: the weight's rows ``rows`` (an embedding lookup). This default decodes
        the whole matrix; formats whose rows are stored apart decode only the rows asked for."""
        return self.dequantize()[rows]

    def onnx_rows(self, g, prefix: str, ids: str) -> str:
        """A float32 ``[*ids.shape, in]`` value: the rows ``ids`` of the weight, computed in graph ``g``. This
        default gathers from the in-graph decode (onnxruntime folds it to float32 at load)."""
        return g.op("Gather", self.onnx_weight(g, prefix), ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> WeightFormat:
        raise NotImplementedError

    @classmethod
    def layout(cls, meta: dict) -> Layout:
        """Every tensor ``meta`` implies: name -> (allowed dtypes, exact shape)."""
        raise NotImplementedError

    def check_values(self) -> None:
        """Raise LayoutError when a stored value is out of the range the format relies on."""

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

    def drop_block_scratch(self) -> None:
        """Drop what the passes of the current block kept beside the stored tensors (never saved)."""

    def integer_grid(self) -> IntegerGrid:
        """This weight as integer codes on a uniform grid, exactly; NotAnIntegerGrid says why it is not one."""
        raise NotAnIntegerGrid(f"{self.describe()} is not integer codes on a uniform grid")

    # --- GPU: how the kernels of cuda/ read this format (see compress.kernels.plan) ---
    def kernel_values(self, kept: int):
        """The ``ValuePlan`` of this format as the kept values of ``kept`` columns per row."""
        raise NoKernel(self.kind)

    def kernel_plan(self):
        """The ``KernelPlan`` of a launch on this format; None when no kernel takes it (cuBLAS or torch)."""
        from ..kernels.plan import COL_DENSE, KernelPlan

        rows, cols = self.shape
        try:
            v = self.kernel_values(cols)
        except NoKernel:
            return None
        return KernelPlan(v.mode, COL_DENSE, rows, cols, cols, v.dims, v.buffers, outliers=v.csr(rows))

    # --- ONNX: how the exporter stores and computes with this format (see compress.export.weights) ---
    def onnx_weight(self, g, prefix: str) -> str:
        """A float32 ``[out, in]`` value computed in graph ``g`` from the format's stored tensors."""
        from .onnx_ops import UnsupportedFormat

        raise UnsupportedFormat(f"no ONNX lowering for weight format '{self.kind}'")

    def onnx_matmul(self, lowering, x: str, name: str) -> tuple[str, str] | None:
        """(description, ``x @ W.T``) through a runtime operator that reads the stored bytes, or None
        (the exporter then multiplies by :meth:`onnx_weight`, which onnxruntime folds at load).

        A format that is an integer grid needs none: the exporter runs its :meth:`integer_grid` through
        ``onnx_grid`` (MatMulNBits, widened when needed)."""
        return None


def format_from_saved(meta: dict, tensors: dict[str, torch.Tensor], verify: bool = True) -> WeightFormat:
    """The format ``meta`` names, built from ``tensors``; with ``verify`` the tensors must be exactly what the
    metadata declares (names, dtypes, shapes, value ranges), else LayoutError says what differs."""
    cls = FORMATS.get(str(meta.get("kind"))) if isinstance(meta, dict) else None
    if cls is None:
        raise LayoutError(f"unknown weight format {meta.get('kind') if isinstance(meta, dict) else meta!r}")
    if verify:
        try:
            expected = cls.layout(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"metadata of a '{cls.kind}' layer is incomplete or wrong ({e!r})") from None
        check_layout(expected, tensors)
    fmt = cls.from_saved(meta, tensors)
    if verify:
        fmt.check_values()
    return fmt


def check_layout(expected: Layout, tensors: dict[str, torch.Tensor]) -> None:
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise LayoutError(f"tensors {', '.join(missing) or '-'} missing, {', '.join(extra) or '-'} unexpected")
    for name, (dtypes, shape) in expected.items():
        t = tensors[name]
        if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
            want = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            raise LayoutError(f"tensor {name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, its metadata "
                              f"says {want} {list(shape)}")


def prefixed(layout: Layout, prefix: str) -> Layout:
    """The layout of a wrapped format, under its wrapper's ``prefix.``."""
    return {f"{prefix}.{k}": v for k, v in layout.items()}


FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INDEX_TYPES = (torch.uint8, torch.uint16, torch.int32)


def inner_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a wrapped format, stored under ``prefix.`` by the format that wraps it."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
