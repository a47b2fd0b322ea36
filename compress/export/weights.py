"""How the exporter stores each linear layer in the ONNX file and turns it into ``x @ W.T``; the format
decides how (``WeightFormat.onnx_matmul`` / ``onnx_weight``, beside its layout in ``compress.formats``).

Two lowerings, chosen per layer (the report lists which one each layer got and its bytes):

- **a runtime kernel** on the stored codes: integer grids (any width: 3-bit widened to 4, 5-7 to 8) become
  ``com.microsoft::MatMulNBits`` (``weights: fast``) or a standard blocked ``DequantizeLinear`` + ``MatMul``
  (``weights: portable``, the pattern onnxruntime fuses into the same kernel); so do the formats that are
  exactly an integer grid (N:M sparse codes, int8-table palettes, FP4); NormalFloat-4 runs in
  ``MatMulBnb4``; outliers add their corrections to the inner kernel's product (``onnx_grid``, ``onnx_nf4``).
- **our operators** (``compress.ortops``, ``weights: fast``, ``onnx_custom``): ``compress::LutMatMul`` reads
  palettes and vector code books from their stored codes and tables, ``compress::HalfMatMul`` float16 layers.
- **in-graph decoding** for everything no runtime op reads: other NormalFloat widths, unstructured sparsity,
  and palettes / code books when our library is not built. The file keeps the exact bytes of the compressed
  checkpoint; a small subgraph of standard ops (BitShift, BitwiseAnd, Gather, ScatterElements) rebuilds the
  float weight. Its inputs are all initializers, so onnxruntime folds it into a float32 constant once when the
  session loads: the file stays small, inference runs a dense float MatMul (speed and memory of fp32 at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ortops
from ..formats import WeightFormat
from ..formats.base import IntegerGrid, NotAnIntegerGrid
from ..formats.onnx_grid import gather_grid_rows, lower_integer_grid
from ..formats.onnx_ops import UnsupportedFormat, as_float
from .graph import Graph

__all__ = ["LayerExport", "UnsupportedFormat", "WeightLowering"]


@dataclass
class LayerExport:
    lowering: str
    file_bytes: int


class WeightLowering:
    """Emits the matmul of every linear layer into ``g`` and records how each was stored.

    ``weights``: ``fast`` (MatMulNBits where it applies) or ``portable`` (standard ops only).
    ``accuracy_level``: MatMulNBits' compute type (0: float, 4: int8 activations).
    ``custom_ops``: a fast export may use our operators where the library is built (False: onnxruntime's kernels
    only, the formats only ours read decoded in the graph).
    """

    def __init__(self, g: Graph, weights: str = "fast", accuracy_level: int = 0, custom_ops: bool = True):
        self.g, self.weights, self.accuracy_level = g, weights, accuracy_level
        self.custom_ops_wanted = weights == "fast" and custom_ops
        self.dense_dtype: torch.dtype | None = None  # storage dtype of uncompressed linear layers
        self.layers: dict[str, LayerExport] = {}
        self.opset = 21
        self.nbits_tensors: dict[str, list[str]] = {}  # layer -> its MatMulNBits initializers (``onnx_grid``)
        # our look-up kernel (``compress.ortops``, ``onnx_custom``): fast exports only, when built
        self.custom_ops = ortops.current() if self.custom_ops_wanted else None
        self.custom_ops_used = False
        self.decoded_without_ortops = 0  # layers of a fast export decoded in the graph: our library is not built

    def linear(self, x: str, fmt: WeightFormat, bias: torch.Tensor | None, name: str) -> str:
        shared = set(self.nbits_tensors.get(name, ()))  # made before, for a tied embedding's lookup
        start = len(self.g.initializers)
        try:
            lowering, y = self._matmul(x, fmt, name)
        except UnsupportedFormat as e:
            raise UnsupportedFormat(f"layer {name}: {e}") from None
        if bias is not None:
            y = self.g.op("Add", y, as_float(self.g, f"{name}.bias", bias))
        nbytes = sum(len(t.raw_data) for t in self.g.initializers[start:])
        if shared:
            nbytes += sum(len(t.raw_data) for t in self.g.initializers[:start] if t.name in shared)
            lowering += " (its tensors shared with the token embedding)"
        self.layers[name] = LayerExport(lowering, nbytes)
        return y

    def runtime_matmul(self, x: str, fmt: WeightFormat, name: str) -> tuple[str, str] | None:
        """(description, ``x @ W.T``) by an operator that reads the stored bytes: the format's own, else the
        integer-grid kernels when the format is one exactly (``WeightFormat.integer_grid``); None if neither."""
        direct = fmt.onnx_matmul(self, x, name)
        if direct is not None:
            return direct
        try:
            grid = fmt.integer_grid()
        except NotAnIntegerGrid:
            return None
        return self.grid_matmul(x, grid, fmt.shape, name)

    def grid_matmul(self, x: str, grid: IntegerGrid, shape: tuple[int, int], name: str) -> tuple[str, str] | None:
        """``x @ W.T`` for ``W`` an integer grid, by onnxruntime's low-bit kernels (``onnx_grid``); None if the
        grid's group size fits no kernel block."""
        return lower_integer_grid(self, x, grid, shape, name)

    def rows(self, fmt: WeightFormat, ids: str, name: str, tied_to: str | None = None) -> str:
        """float32 rows ``ids`` of ``fmt`` (a token embedding ``name``). Tied to layer ``tied_to`` (the output head,
        lowered later): gathered from the initializers that layer's MatMulNBits reads when it runs in one, so the
        table is stored once; else from the format's own stored tensors (``WeightFormat.onnx_rows``)."""
        if tied_to is not None:
            try:
                grid = fmt.integer_grid()
            except NotAnIntegerGrid:
                grid = None
            rows = gather_grid_rows(self, grid, fmt.shape, ids, tied_to) if grid is not None else None
            if rows is not None:
                return rows
        return fmt.onnx_rows(self.g, name, ids)

    def _matmul(self, x: str, fmt: WeightFormat, name: str) -> tuple[str, str]:
        """A runtime operator when one reads the format, else its in-graph decode feeding a MatMul."""
        direct = self.runtime_matmul(x, fmt, name)
        if direct is not None:
            return direct
        w = fmt.onnx_weight(self.g, name)
        return f"in-graph decode ({fmt.describe()})", self.g.op("MatMul", x, self.g.op("Transpose", w))
