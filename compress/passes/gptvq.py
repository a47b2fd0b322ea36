"""GPTVQ: "GPTVQ: The Blessing of Dimensionality for LLM Quantization" (van Baalen, Kuzmin, Nagel, Couperus,
Bastoul, Mahurin, Blankevoort, Whatmough, 2024).

Vector quantization with GPTQ's error feedback: every ``dim`` consecutive inputs of a row form a vector that
is replaced by the nearest entry of a learned code book, and the error is spread over the inputs not yet
quantized through the Cholesky factor of ``H^-1`` (Optimal Brain Quantization over a block of ``dim``
columns at once). The nearest entry is chosen in the metric of that block's part of the factor, so a vector's
choice accounts for how its coordinates' errors can be compensated. Code books (one per ``rows_per_table``
rows, over unit-scale rows: each row keeps a float16 scale) are initialised by k-means weighted by each input's
saliency ``1 / [H^-1]_jj``; ``codebook_refit`` then re-fits them by least squares on the layer output error with
the codes fixed (conjugate gradients), kept only when the error drops. ``codebook_dtype: int8`` stores the books in
8 bits (the paper's own choice), half the bits of float16 books: twice as many books for the same overhead.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import PlanError
from ..families import find_blocks
from ..formats.base import NotAnIntegerGrid
from ..formats.vector import MAX_INDEX_BITS, VectorWeight, int8_units, stored, stored_books
from ..hessian import output_error, prepare_inverse_hessian
from ..vector_kmeans import slot_sums, vector_kmeans
from .base import Pass, PassConfig, Requirements, current_mask, current_weight
from .registry import register


class GPTVQConfig(PassConfig):
    type: Literal["gptvq"] = "gptvq"
    bits: int = Field(2, ge=1, le=8, description="bits per weight: a code book of 2^(bits x dim) vectors")
    dim: int = Field(2, ge=1, le=8, description="inputs per vector (bits x dim at most 8)")
    table_weights: int = Field(16384, ge=1, description="weights sharing one code book (whole rows: "
                               "rows_per_table = table_weights / in_features, at least 1)")
    act_order: bool = Field(True, description="quantize vectors by decreasing activation energy")
    damp: float = Field(0.01, gt=0, le=1, description="dampening, fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    iterations: int = Field(25, ge=1, description="at most this many Lloyd iterations for the code books")
    codebook_refit: int = Field(20, ge=0, description="conjugate-gradient steps re-fitting the code books on "
                                "the layer output error after the sweep (0: off)")
    codebook_dtype: Literal["float16", "int8"] = Field("float16", description="storage of the code books (int8: "
                                                       "half the bits, each book's step folded into its row scales)")

    @model_validator(mode="after")
    def _index_fits(self):
        if self.bits * self.dim > MAX_INDEX_BITS:
            raise ValueError(f"bits x dim = {self.bits * self.dim}: an index holds at most {MAX_INDEX_BITS} bits")
        return self

    def rows_per_table(self, in_features: int) -> int:
        return max(1, round(self.table_weights / in_features))


def gptvq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GPTVQConfig, seed: int = 0) -> VectorWeight:
    """GPTVQ of ``w[out, in]`` given the Hessian ``h[in, in]`` of its inputs."""
    rows, cols = w.shape
    d, k = cfg.dim, 1 << (cfg.bits * cfg.dim)
    rpt = min(cfg.rows_per_table(cols), rows)
    table = torch.arange(rows) // rpt
    scale = stored(w.float().pow(2).mean(1).sqrt().clamp_min(1e-8))
    books = _initial_books(w.float() / scale.unsqueeze(1), _saliency(h, cfg.damp), scale, rpt, d, k,
                           cfg.iterations, seed)
    if cfg.codebook_dtype == "int8":
        books, scale = int8_units(books, scale, rpt)
        scale = stored(scale)
    books = stored_books(books, cfg.codebook_dtype)  # codes are chosen against the stored values
    groups = cols // d
    group_order = torch.argsort(torch.diagonal(h).reshape(groups, d).sum(1), descending=True) if cfg.act_order \
        else torch.arange(groups)
    codes = _sweep(w, h, books, scale, table, group_order, cfg)
    if cfg.codebook_refit:
        books = refit_codebooks(w.float(), h, codes, books, scale, table, cfg.codebook_refit, cfg.codebook_dtype)
    return VectorWeight.from_codes(codes, books, scale, cfg.bits * d, rpt, cfg.codebook_dtype)


def _saliency(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``1 / [H^-1]_jj`` (dampened as the sweep dampens ``H``): the output error a unit change of input ``j``'s
    weight costs once the other weights compensate it (Optimal Brain Surgeon), which weights the k-means."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return (1 / torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()).float()


def _sweep(w, h, books, scale, table, group_order, cfg) -> torch.Tensor:
    """The codes ``[out, in/dim]`` (int64) GPTQ's column sweep chooses a vector at a time in ``group_order``."""
    rows, cols = w.shape
    d = cfg.dim
    perm = (group_order.unsqueeze(1) * d + torch.arange(d)).reshape(-1)
    work, hinv = prepare_inverse_hessian(w.float().clone(), h, cfg.damp, perm, in_place=True)
    codes = torch.zeros(rows, cols // d, dtype=torch.long)
    step = max(d, cfg.block_size // d * d)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1, hinv1 = work[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for v in range(0, i2 - i1, d):
            metric = torch.linalg.solve_triangular(hinv1[v:v + d, v:v + d], torch.eye(d), upper=True)
            code = _nearest(w1[:, v:v + d] / scale.unsqueeze(1), books, table, metric)
            codes[:, (i1 + v) // d] = code
            e = (w1[:, v:v + d] - books[table, code] * scale.unsqueeze(1)) @ metric
            w1[:, v + d:] -= e @ hinv1[v:v + d, v + d:]
            err1[:, v:v + d] = e
        work[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(group_order)]


def _initial_books(unit, saliency, scale, rpt, d, k, iterations, seed) -> torch.Tensor:
    """Code books ``[tables, k, d]`` by k-means over each table's unit-scale vectors, every
    coordinate weighted by its input's saliency and its row's squared scale (its share of the output error)."""
    rows, cols = unit.shape
    tables = -(-rows // rpt)
    pad = tables * rpt - rows
    weight = scale.pow(2).unsqueeze(1) * saliency.unsqueeze(0)
    x = torch.cat([unit, unit.new_zeros(pad, cols)]).reshape(tables, -1, d)
    wt = torch.cat([weight, weight.new_zeros(pad, cols)]).reshape(tables, -1, d)
    centroids, _ = vector_kmeans(x, k, wt + 1e-12, iterations, seed)
    return centroids


def _nearest(unit: torch.Tensor, books: torch.Tensor, table: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """For each row's unit-scale vector ``unit[rows, d]``, the entry of its code book nearest in the metric
    ``|(x - c) metric|`` (the block's part of the inverse Hessian factor, inverted): int64 ``[rows]``."""
    x = unit @ metric
    c = books @ metric  # [tables, k, d]
    dist = (c * c).sum(-1)[table] - 2 * torch.einsum("rd,rkd->rk", x, c[table])
    return dist.min(1).indices  # argmin's first index, faster on CPU


def refit_codebooks(w, h, codes, books, scale, table, steps: int, dtype: str = "float16") -> torch.Tensor:
    """The code books minimising the layer output error ``(w - q) H (w - q)^T`` with the codes fixed (a linear
    least-squares problem in the code book entries, solved by conjugate gradients from the current books);
    returned rounded as stored in ``dtype``, or the input books when that is not better."""
    rows, cols = w.shape
    tables, k, d = books.shape
    slot = (table.unsqueeze(1) * k + codes).reshape(-1)

    def expand(b):  # code books -> the weight they give
        return b.reshape(-1, d)[slot].reshape(rows, cols) * scale.unsqueeze(1)

    def gather(m):  # [rows, cols] -> its sum into the code book entries (the transpose of expand)
        return slot_sums(slot, (m * scale.unsqueeze(1)).reshape(-1, d), tables * k).float().reshape(tables, k, d)

    def normal(b):
        return gather(expand(b) @ h)

    x = books.clone()
    r = gather(w @ h) - normal(x)
    p = r.clone()
    rr = (r * r).sum()
    for _ in range(steps):
        ap = normal(p)
        alpha = rr / (p * ap).sum().clamp_min(1e-30)
        x += alpha * p
        r -= alpha * ap
        new_rr = (r * r).sum()
        if new_rr <= 1e-20:
            break
        p = r + (new_rr / rr) * p
        rr = new_rr
    x = stored_books(x, dtype)

    def error(b):
        e = w - expand(b)
        return float(((e @ h) * e).sum())

    return x if torch.isfinite(x).all() and error(x) < error(books) else books


@register
class GPTVQ(Pass):
    name = "gptvq"
    stage = "cluster"
    Config = GPTVQConfig

    def written_grids(self):
        raise NotAnIntegerGrid("gptvq stores indices into vector code books, not an integer grid")

    def requirements(self):
        return Requirements(stats=frozenset({"hessian"}), layer_parallel=True)

    def check_plan(self, passes):
        later = [p for p in passes[passes.index(self) + 1:] if p.writes_block_codes()]
        if later:
            raise PlanError(f"pass {later[0].name} cannot follow gptvq: its weights are already code-book "
                            "indices", "put gptvq last among the passes that compress the blocks' layers")

    def check_model(self, model):
        prefix, blocks = find_blocks(model)
        for name, module in blocks.named_modules(prefix=prefix):
            cfg = self.cfg.for_layer(name)
            if isinstance(module, nn.Linear) and cfg.applies_to(name) and module.in_features % cfg.dim:
                raise PlanError(f"layer {name} has {module.in_features} inputs, not a multiple of gptvq's dim "
                                f"{cfg.dim}", "choose a dim that divides every targeted layer's input width")

    def compress_layer(self, name, module, stats, cfg):
        if current_mask(module) is not None:
            raise PlanError(f"gptvq cannot keep the sparsity of pruned layer {name}",
                            "prune after gptvq is not possible either: use kmeans with error_feedback")
        w = current_weight(module)
        h = stats.mean_hessian().cpu()
        seed = (torch.initial_seed() + zlib.crc32(name.encode())) % (1 << 63)
        fmt = gptvq_quantize(w, h, cfg, seed)
        return fmt, {"format": fmt.describe(), "output_error": output_error(w, fmt.dequantize(), h)}
