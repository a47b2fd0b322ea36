"""Vector-quantized weights: every ``dim`` consecutive inputs of a row form one vector, stored as an index into a
code book of ``2^index_bits`` vectors (GPTVQ's layout, "GPTVQ: The Blessing of Dimensionality for LLM
Quantization", van Baalen et al., 2024). One code book serves ``rows_per_table`` consecutive output rows; each row
has a float16 scale, so rows of different magnitude share a code book of unit-scale vectors.

Code books are float16, or int8 (as GPTVQ's paper stores them): then the entries are integers and the book's step
is folded into the row scales, so the format needs no other tensor and every reader's decode stays
``row_scale * entry`` in float32; an int8 book costs half the bits, which buys twice as many books.
"""

from __future__ import annotations

import torch

from ..packing import pack_rows, packed_row_bytes, unpack_rows
from .base import LayoutError, WeightFormat, register_format
from .onnx_custom import lut_matmul
from .onnx_ops import TensorProto, as_float, torch_initializer, unpack_codes

MAX_INDEX_BITS = 8  # indices are row-packed bytes (pack_rows)
CODEBOOK_DTYPES = {"float16": torch.float16, "int8": torch.int8}


@register_format
class VectorWeight(WeightFormat):
    """``indices`` uint8 ``[out, ceil(in/dim * index_bits/8)]`` (row-packed), ``codebook`` float16 or int8
    ``[tables, 2^index_bits, dim]``, ``row_scale`` float16 ``[out]``: weight ``[r, v*dim:(v+1)*dim]`` is
    ``row_scale[r] * codebook[r // rows_per_table, index[r, v]]``."""

    kind = "vector"

    def __init__(self, indices, codebook, row_scale, index_bits: int, rows_per_table: int, shape):
        self.indices, self.codebook, self.row_scale = indices, codebook, row_scale
        self.index_bits, self.rows_per_table, self.shape = index_bits, rows_per_table, tuple(shape)

    @property
    def dim(self) -> int:
        return int(self.codebook.shape[2])

    @property
    def codebook_dtype(self) -> str:
        return "int8" if self.codebook.dtype == torch.int8 else "float16"

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebook: torch.Tensor, row_scale: torch.Tensor, index_bits: int,
                   rows_per_table: int, codebook_dtype: str = "float16") -> VectorWeight:
        """``codes[out, in/dim]`` indices, ``codebook[tables, K, dim]`` and ``row_scale[out]``, rounded here as
        stored (codes must have been chosen against the rounded values: :func:`stored`, :func:`stored_books`)."""
        dim = codebook.shape[2]
        shape = (codes.shape[0], codes.shape[1] * dim)
        book = stored_books(codebook, codebook_dtype).to(CODEBOOK_DTYPES[codebook_dtype])
        return cls(pack_rows(codes.to(torch.uint8), index_bits), book, row_scale.half(), index_bits,
                   rows_per_table, shape)

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.indices, self.index_bits, self.shape[1] // self.dim)

    def dequantize(self):
        rows, cols = self.shape
        table = (torch.arange(rows) // self.rows_per_table).unsqueeze(1)
        vectors = self.codebook.float()[table, self.codes().long()]  # [out, in/dim, dim]
        return vectors.reshape(rows, cols) * self.row_scale.float().unsqueeze(1)

    def tensors(self):
        return {"indices": self.indices, "codebook": self.codebook, "row_scale": self.row_scale}

    def meta(self):
        return {"kind": self.kind, "shape": list(self.shape), "dim": self.dim, "index_bits": self.index_bits,
                "rows_per_table": self.rows_per_table, "codebook_dtype": self.codebook_dtype}

    @classmethod
    def from_saved(cls, meta, tensors):
        return cls(tensors["indices"], tensors["codebook"], tensors["row_scale"], meta["index_bits"],
                   meta["rows_per_table"], meta["shape"])

    @classmethod
    def layout(cls, meta):
        out, k = (int(v) for v in meta["shape"])
        dim, bits, per = int(meta["dim"]), int(meta["index_bits"]), int(meta["rows_per_table"])
        book_dtype = meta.get("codebook_dtype", "float16")  # checkpoints before int8 books name none
        if dim < 1 or k % dim or not 1 <= bits <= MAX_INDEX_BITS or per < 1 or book_dtype not in CODEBOOK_DTYPES:
            raise ValueError(f"dim {dim}, index_bits {bits}, rows_per_table {per}, codebook_dtype {book_dtype} for "
                             f"a {out} x {k} weight")
        return {"indices": ((torch.uint8,), (out, packed_row_bytes(k // dim, bits))),
                "codebook": ((CODEBOOK_DTYPES[book_dtype],), (-(-out // per), 1 << bits, dim)),
                "row_scale": ((torch.float16,), (out,))}

    def check_values(self):
        if not (torch.isfinite(self.codebook).all() and torch.isfinite(self.row_scale).all()):
            raise LayoutError("the code book or a row scale holds inf or nan")

    def describe(self):
        bits = self.index_bits / self.dim
        book = "int8 code book" if self.codebook_dtype == "int8" else "code book"
        return f"{bits:g}-bit vectors of {self.dim}, {1 << self.index_bits}-entry {book} per {self.rows_per_table} rows"

    def kernel_plan(self):
        """The vector look-up mode of ``cuda/compressed_gemv.cu``: one code per ``dim`` columns, the row's code book
        (float32, int8 entries as their values) and scale. Prefill batches and float32 activations gather the
        weights on the GPU from the same buffers (``kernels.plan.vector_values``) and multiply with cuBLAS."""
        from ..kernels.plan import COL_DENSE, VLUT, KernelPlan, empty_dims

        rows, cols = self.shape
        dims = empty_dims()
        dims.update(bits=self.index_bits, row_bytes=self.indices.shape[1], rows_per_table=self.rows_per_table,
                    vector_dim=self.dim, group_size=cols, groups=1)
        buffers = {"codes": self.indices, "lut": self.codebook.float().reshape(-1),
                   "scales": self.row_scale.reshape(-1, 1)}
        return KernelPlan(VLUT, COL_DENSE, rows, cols, cols // self.dim, dims, buffers)

    def onnx_matmul(self, lowering, x, name):
        """The look-up kernel on the stored codes, code books and row scales (``onnx_custom``), when built."""
        y = lut_matmul(lowering, x, name, self.indices, self.codebook, self.row_scale, self.index_bits, self.dim,
                       self.rows_per_table, self.shape)
        return None if y is None else (f"LutMatMul {self.describe()}", y)

    def onnx_weight(self, g, prefix):
        """Indices unpacked from their bytes, offset to their row's code book, gathered from the flat code
        books, scaled per row (onnxruntime folds it to float32 at session load)."""
        rows, cols = self.shape
        dim = self.dim
        codes = unpack_codes(g, torch_initializer(g, f"{prefix}.indices", self.indices), rows, cols // dim,
                             self.index_bits, TensorProto.INT32)
        size = 1 << self.index_bits
        offsets = g.op("Cast", g.op("Unsqueeze", g.arange(rows, self.rows_per_table, size), g.const([1])),
                       to=TensorProto.INT32)
        book = g.op("Reshape", as_float(g, f"{prefix}.codebook", self.codebook), g.const([-1, dim]))
        vectors = g.op("Reshape", g.op("Gather", book, g.op("Add", codes, offsets)), g.const([rows, cols]))
        scale = g.op("Unsqueeze", as_float(g, f"{prefix}.row_scale", self.row_scale), g.const([1]))
        return g.op("Mul", vectors, scale)


def stored(values: torch.Tensor) -> torch.Tensor:
    """The float32 values a float16 code book or a row scale takes after its storage."""
    return values.half().float()


def stored_books(books: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values code books take after storage in ``dtype`` (int8: entries rounded to integers)."""
    return stored(books) if dtype == "float16" else books.round().clamp(-127, 127)


def int8_units(books: torch.Tensor, row_scale: torch.Tensor, rows_per_table: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code books ``[tables, K, dim]`` of unit-scale vectors and row scales ``[out]`` re-expressed for int8 storage:
    each book divided by its step (its largest entry maps to 127), the step folded into its rows' scales. The
    weights they give are unchanged; round the books with :func:`stored_books` and the scales with :func:`stored`."""
    step = (books.abs().amax((1, 2)) / 127).clamp_min(1e-12)
    rows = torch.arange(row_scale.shape[0]) // rows_per_table
    return books / step[:, None, None], row_scale * step[rows]
