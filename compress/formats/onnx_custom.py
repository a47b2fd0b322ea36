"""Our own onnxruntime operators (``compress/ortops``), for what onnxruntime's kernels cannot read as stored:

- ``compress::LutMatMul``: weights stored as look-up codes (palettes, vector code books). The file holds the
  checkpoint's row-packed codes and tables as they are, and the operator decodes each row from them while it
  multiplies, so the session keeps them compressed.
- ``compress::SparseMatMul``: a pruned weight whose kept values are 16-bit floats or an integer grid, from its
  bitmap and its values as stored.
- ``compress::GridMatMul``: codes on a grid whose scales (and offsets, or code book) no onnxruntime kernel reads:
  llama.cpp's k-quants (their two-level scales multiplied out in float32), NormalFloat at any width.
- ``compress::OutlierAdd``: a dense-and-sparse weight's outliers (compressed sparse rows, as stored) times their
  inputs, added to the dense part's product.
- ``compress::HalfMatMul``: a float16 or bfloat16 weight (a dense layer, the tied output head) multiplied from its
  16-bit bytes; onnxruntime's CPU MatMul would hold a float32 copy.

Used with ``weights: fast`` when the library is built (``python -m compress.ortops``); the export then ships the
library in its folder and names it in ``export.json`` and ``genai_config.json``. Without it look-up formats are
decoded in the graph (folded to float32 by onnxruntime when the session loads) and 16-bit weights cast to float32.
"""

from __future__ import annotations

import torch

from ..ortops import DOMAIN
from ..quant import QuantSpec
from .onnx_ops import torch_initializer


def _available(lowering) -> bool:
    """Whether the lowering may use our operators; a fast export without the library counts the layer it had to
    decode in the graph instead (the exporter says so)."""
    if lowering.custom_ops is None:
        lowering.decoded_without_ortops += lowering.custom_ops_wanted
        return False
    lowering.custom_ops_used = True
    return True


def lut_matmul(lowering, x: str, name: str, indices: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None,
               bits: int, dim: int, rows_per_table: int, shape: tuple[int, int]) -> str | None:
    """``x @ W.T`` for ``W[n, c*dim + j] = scale[n] * table[n // rows_per_table, code(n, c), j]``; ``indices`` uint8
    row-packed ``bits``-bit codes, ``table`` float16 or int8 ``[tables, 2^bits(, dim)]``, ``scale`` float16 ``[out]``
    or None. None when the lowering has no look-up kernel (``portable``, or the library is not built)."""
    if not _available(lowering):
        return None
    g = lowering.g
    rows, cols = shape
    inputs = [x, torch_initializer(g, f"{name}.indices", indices), torch_initializer(g, f"{name}.table", table)]
    if scale is not None:
        inputs.append(torch_initializer(g, f"{name}.scale", scale.half()))
    return g.op("LutMatMul", *inputs, domain=DOMAIN, K=cols, N=rows, bits=bits, dim=dim,
                rows_per_table=rows_per_table)


def half_matmul(lowering, x: str, name: str, weight: torch.Tensor | str, shape: tuple[int, int]) -> str | None:
    """``x @ W.T`` for ``W`` ``[out, in]`` float16 or bfloat16: a tensor (stored here as ``name.weight``, as it is)
    or the name of an initializer already holding it (a tied table). None without the library."""
    if lowering.custom_ops is None:  # cast to float32 instead: nothing to decode
        return None
    lowering.custom_ops_used = True
    if isinstance(weight, torch.Tensor):
        weight = torch_initializer(lowering.g, f"{name}.weight", weight)
    return lowering.g.op("HalfMatMul", x, weight, domain=DOMAIN, K=shape[1], N=shape[0])


def sparse_matmul(lowering, x: str, name: str, bitmap: torch.Tensor, stored: dict[str, torch.Tensor],
                  shape: tuple[int, int], kept: int, grid: QuantSpec | None = None) -> str | None:
    """``x @ W.T`` for a pruned ``W`` ``[out, in]``: ``bitmap`` its kept positions (row-packed bits) and the kept
    values in row order, ``stored`` as the checkpoint holds them: ``values`` 16-bit floats ``[out, kept]``, or on
    the integer ``grid``: row-packed ``codes``, float16 ``scales`` per group of kept values, packed ``zeros``
    (absent when symmetric). None without the library."""
    if not _available(lowering):
        return None
    g = lowering.g
    inputs = [x, torch_initializer(g, f"{name}.bitmap", bitmap)]
    attrs = {"K": shape[1], "N": shape[0], "kept": kept}
    if grid is None:
        inputs.append(torch_initializer(g, f"{name}.values", stored["values"]))
    else:
        inputs += [torch_initializer(g, f"{name}.{part}", stored[part]) for part in ("codes", "scales")]
        if "zeros" in stored:
            inputs.append(torch_initializer(g, f"{name}.zeros", stored["zeros"]))
        attrs.update(bits=grid.bits, group_size=grid.group_size or kept)
    return g.op("SparseMatMul", *inputs, domain=DOMAIN, **attrs)


def grid_matmul(lowering, x: str, name: str, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                table: torch.Tensor | None, zero: float, bits: int, group_size: int, shape: tuple[int, int],
                zeros: torch.Tensor | None = None, accuracy_level: int = 0) -> str | None:
    """``x @ W.T`` for ``W[n, k] = (v(code) - zero - zeros[n, g]) * scales[n, g] + offsets[n, g]`` (``k`` in group
    ``g`` of ``group_size`` inputs; ``v(q) = q``, or ``table[q]``): ``codes`` row-packed ``bits``-bit ``[out,
    ceil(in * bits / 8)]``, ``scales`` and ``offsets`` float32 ``[out, groups]``, ``table`` float32 ``[2^bits]``,
    ``zeros`` integer zero points row-packed at ``bits``; ``accuracy_level`` 4: a decode step's tokens multiplied
    as int8 (2- and 4-bit integer grids). None without the library."""
    if not _available(lowering):
        return None
    g = lowering.g
    inputs = [x, torch_initializer(g, f"{name}.codes", codes), torch_initializer(g, f"{name}.scales", scales.float())]
    optional = [(offsets, "offsets", torch.Tensor.float), (table, "table", torch.Tensor.float),
                (zeros, "zeros", lambda t: t)]
    last = max((i for i, (t, _, _) in enumerate(optional) if t is not None), default=-1)
    for t, part, cast in optional[: last + 1]:  # an absent input before a present one is an empty name
        inputs.append("" if t is None else torch_initializer(g, f"{name}.{part}", cast(t)))
    return _grid_node(g, inputs, zero, bits, group_size, shape, **({"accuracy_level": 4} if accuracy_level else {}))


def shared_grid_matmul(lowering, x: str, codes: str, scales: str, zeros: str | None, bits: int, group_size: int,
                       shape: tuple[int, int]) -> str:
    """``x @ W.T`` for ``W`` an integer grid from initializers already made (a tied table's, which its lookup reads
    too): ``codes`` row-packed, ``scales`` float32 per group (any shape), ``zeros`` packed at ``bits`` (None: the
    zero point is ``2^(bits-1)``); with the lowering's activations (``accuracy_level`` 4: int8, 2 and 4 bits). Only
    where the library is built."""
    lowering.custom_ops_used = True
    inputs = [x, codes, scales] + (["", "", zeros] if zeros else [])
    level = {"accuracy_level": 4} if lowering.accuracy_level == 4 else {}
    return _grid_node(lowering.g, inputs, 0.0 if zeros else float(1 << (bits - 1)), bits, group_size, shape, **level)


def _grid_node(g, inputs: list[str], zero: float, bits: int, group_size: int, shape: tuple[int, int], **attrs) -> str:
    return g.op("GridMatMul", *inputs, domain=DOMAIN, K=shape[1], N=shape[0], bits=bits, group_size=group_size,
                zero=float(zero), **attrs)


def outlier_add(lowering, y: str, x: str, name: str, counts: torch.Tensor, columns: torch.Tensor,
                corrections: torch.Tensor) -> str | None:
    """``y + x @ S.T`` for the sparse ``S`` whose row ``n`` holds ``counts[n]`` corrections (float32) at
    ``columns`` (compressed sparse rows; counts and columns as stored, uint8 / uint16 / int32). None without the
    library (a scatter-add of standard ops then does it: nothing is decoded either way)."""
    if lowering.custom_ops is None:
        return None
    lowering.custom_ops_used = True
    g = lowering.g
    return g.op("OutlierAdd", y, x, torch_initializer(g, f"{name}.counts", counts),
                torch_initializer(g, f"{name}.columns", columns), g.tensor(f"{name}.corrections", corrections.numpy()),
                domain=DOMAIN)
