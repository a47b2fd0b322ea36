"""GPTQ: "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(Frantar, Ashkboos, Hoefler, Alistarh, 2022).

Quantizes a layer's weights one input column at a time and spreads each column's rounding error
over the columns not yet quantized, using the inverse Hessian ``H = X^T X`` of the layer's
calibration inputs (Optimal Brain Quantization). As in the paper: Cholesky form of ``H^-1``,
dampening (``damp`` x mean diagonal), lazy batch updates over ``block_size`` columns.

``act_order`` visits columns by decreasing ``H_jj`` (most salient first). Combined with groups it
uses *static groups*: every group's scale and zero point is fitted on the original weights before
any update, so the stored layout keeps columns in their natural order and needs no runtime
permutation (``g_idx``). ``clip_search`` fits each group's range to minimise its rounding error.
``refit_scales`` then re-fits each group's scale for the codes the sweep chose (least squares on the
layer output error, zero points fixed): measured 2.5-7.5% less output error per layer, and AWQ + GPTQ
4-bit g64 perplexity 16.07 -> 16.00 on SmolLM2-135M.
"""

from typing import Literal

import torch
from pydantic import Field

from ..formats import QuantizedWeight, compact, grid_weight
from ..hessian import obq_sweep, output_error, prepare_inverse_hessian
from ..kquants import ktype, rounded
from ..modules import CompressedLinear
from ..quant import QuantSpec, decode, encode, fit_params, pad_to_groups
from .base import Requirements, current_mask, current_weight, input_width
from .quantizing import QuantizingPass, QuantOptions
from .registry import register


class GPTQConfig(QuantOptions):
    type: Literal["gptq"] = "gptq"
    clip_search: bool = Field(True, description="search a clipping range minimising the error")
    damp: float = Field(0.01, gt=0, le=1, description="dampening, fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    act_order: bool = Field(True, description="quantize columns by decreasing activation energy")
    float_target_strength: float = Field(0.0, ge=0, le=1, description="GPTQv2's asymmetric calibration: the share "
                              "of the step towards the float model's layer outputs (0 = off; 0.125 is what "
                              "helped on SmolLM2; larger steps over-fit the calibration tokens)")
    refit_scales: bool = Field(True, description="after the sweep, re-fit each group's scale by least "
                               "squares on the layer output error with the codes fixed")

    renamed = {"asymmetric": "float_target_strength"}  # a strength, not a grid's (a)symmetry


def float_target(w: torch.Tensor, stats, damp: float, strength: float) -> torch.Tensor:
    """GPTQv2's asymmetric calibration ("GPTQv2: Efficient Finetuning-Free Quantization with
    Asymmetric Calibration", Li et al., 2025) in closed form. The weights whose outputs on this
    model's inputs ``X`` best match the float model's outputs ``W X_float`` are
    ``W + W (X_float^T X - X^T X) (X^T X + damp)^-1``; GPTQ of those under ``H = X^T X`` minimises
    ``||W X_float - Q X||^2``. The correction is estimated from the calibration tokens and its full
    step over-fits them (SmolLM2-135M AWQ + GPTQ 3-bit g64, 32 x 512 tokens: perplexity 19.59 with
    no step, 18.50 at 0.125, 18.78 at 0.25, 21.61 at 0.5, 271 at 1), so only ``strength`` of it is
    taken, as the paper's code scales it by 0.25. Without cross statistics: ``w`` unchanged."""
    cross = stats.mean_cross() if stats is not None else None
    if cross is None or strength == 0:
        return w
    h = stats.mean_hessian().cpu().double()
    delta = cross.cpu().double() - h
    h.diagonal().add_(damp * h.diagonal().mean() + 1e-12)
    return (w.double() + strength * torch.linalg.solve(h, (w.double() @ delta).t()).t()).float()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, mask: torch.Tensor | None = None,
                  refit: bool = False):
    """GPTQ of ``w[out, in]`` given the Hessian ``h[in, in]`` of its inputs.

    With a keep-``mask`` (a pruned layer), pruned weights stay exactly zero, their drift is
    compensated like rounding error, and only kept weights get codes: groups then run over each
    row's kept weights (static groups), and the result is a SparseWeight."""
    rows, cols = w.shape
    original = w.float()
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    w = w.float().clone()  # fitted in natural order (static groups); the sweep visits it in ``perm`` order
    w[:, torch.diagonal(h) == 0] = 0  # inputs that never fired, as the sweep sees them
    width = int(mask[0].sum()) if mask is not None else cols  # columns of the stored code matrix
    gs = spec.group_size or width
    if gs < cols and mask is None:
        block_size = max(gs, block_size // gs * gs)  # groups never straddle a lazy block
    # k-quants fit a super-block of groups at once: static too
    static = act_order or gs == width or mask is not None or ktype(spec.grid) is not None
    scale = torch.zeros(rows, spec.groups(width))
    zero = None if spec.is_codebook else torch.zeros_like(scale)
    if static:  # fit every group on the original (kept) weights
        kept = compact(w, mask) if mask is not None else w
        s, z = fit_params(pad_to_groups(kept, gs).reshape(rows, -1, gs), spec)
        del kept
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)
    # the group of every weight in sweep order: by its column, or (pruned rows) by its place among the row's kept
    # weights; looked up a column at a time (a [rows, in] table of scales would cost as much as the weights)
    if mask is not None:
        gidx = ((mask.cumsum(1, dtype=torch.int32) - 1).clamp_min(0) // gs)[:, perm].long()
    else:
        gidx = (torch.arange(cols) // gs)[perm]
    w, hinv = prepare_inverse_hessian(w, h, damp, perm, in_place=True)
    keep = mask[:, perm] if mask is not None else None
    codes = torch.zeros(rows, cols, dtype=torch.uint8)

    def params_at(j):
        """(scale, zero) of every row's weight in sweep column ``j`` (static groups)."""
        if gidx.dim() == 1:
            g = int(gidx[j])
            return scale[:, g], zero[:, g] if zero is not None else None
        at = gidx[:, j:j + 1]
        return scale.gather(1, at)[:, 0], zero.gather(1, at)[:, 0] if zero is not None else None

    def round_column(j, rest):
        if static:
            s_col, z_col = params_at(j)
        else:
            g = int(gidx[j])
            if j % gs == 0:  # fit the group on the weights as updated so far
                s, z = fit_params(rest[:, :gs], spec)
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
            s_col, z_col = scale[:, g], zero[:, g] if zero is not None else None
        codes[:, j] = encode(rest[:, 0], s_col, z_col, spec)
        deq = decode(codes[:, j], s_col, z_col, spec)
        return deq * keep[:, j] if keep is not None else deq

    obq_sweep(w, hinv, round_column, block_size)
    del w, hinv
    codes = codes[:, torch.argsort(perm)]
    if mask is None:
        if refit and not spec.is_codebook:
            scale = refit_scales(original, h, codes, scale, zero, spec)
        return grid_weight(codes, scale, zero, spec)
    return QuantizedWeight.from_codes(compact(codes, mask), scale, zero, spec)


def refit_scales(w, h, codes, scale, zero, spec: QuantSpec, rows_at_once: int = 1024) -> torch.Tensor:
    """Least-squares group scales for fixed codes and zero points: per row, the scales minimising the
    layer output error ``(w - wq) H (w - wq)^T`` with ``wq = (code - zero) * scale`` (a G x G system per
    row), then rounded as the grid stores them (float16; a k-quant's integers times a float16 factor per super-block,
    whose asymmetric types fit ``w + minimum = code * scale`` with their minima fixed). Rows where the rounded result
    is not better keep their scales. Rows are independent: they are solved ``rows_at_once`` at a time, so the G x G
    systems of a tall layer never all sit in memory."""
    cols = w.shape[1]
    gs = spec.group_size or cols
    pad = scale.shape[1] * gs - cols
    hp = torch.nn.functional.pad(h.float(), (0, pad, 0, pad)) if pad else h.float()
    kt = ktype(spec.grid)
    if kt is None:
        def rounding(s):
            return s.half().float()
    else:
        def rounding(s):
            return rounded(s, kt, kt.symmetric)
        if not kt.symmetric:
            w, zero = w + zero.repeat_interleave(gs, 1)[:, :cols], torch.zeros_like(zero)
    return torch.cat([_refit_rows(w[r:r + rows_at_once], h, hp, codes[r:r + rows_at_once],
                                  scale[r:r + rows_at_once], zero[r:r + rows_at_once], gs, rounding,
                                  positive=kt is None)
                      for r in range(0, w.shape[0], rows_at_once)])


def _refit_rows(w, h, hp, codes, scale, zero, gs: int, rounding, positive: bool) -> torch.Tensor:
    rows, cols = w.shape
    groups = scale.shape[1]
    pad = groups * gs - cols
    d = (pad_to_groups(codes.float(), gs).reshape(rows, groups, gs) - zero.unsqueeze(-1)).reshape(rows, -1)
    if pad:
        d[:, cols:] = 0
    m = torch.stack([((d[:, g * gs:(g + 1) * gs] @ hp[g * gs:(g + 1) * gs]) * d).reshape(rows, groups, gs).sum(-1)
                     for g in range(groups)], 1)
    b = ((torch.nn.functional.pad(w, (0, pad)) @ hp) * d).reshape(rows, groups, gs).sum(-1)
    m.diagonal(dim1=1, dim2=2).add_(1e-6 * m.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True) + 1e-12)
    new = rounding(torch.linalg.solve(m, b))

    def err(s):
        e = w - (d * s.repeat_interleave(gs, 1))[:, :cols]
        return ((e @ h) * e).sum(1)

    better = err(new) < err(scale)
    if positive:
        better &= (new > 0).all(1)
    return torch.where(better.unsqueeze(1), new, scale)


@register
class GPTQ(QuantizingPass):
    name = "gptq"
    Config = GPTQConfig

    def requirements(self):
        stats = {"hessian", "cross"} if self.cfg.float_target_strength > 0 else {"hessian"}
        return Requirements(stats=frozenset(stats), model_plan=self.mixed_precision_plan(), layer_parallel=True)

    def apply(self, work, replace):
        """Layers that read the same input (q/k/v, gate/up) share one Hessian and, GPTQ being
        independent per output row, are quantized in one sweep over their stacked rows: the same
        result for a third fewer column steps (the sweep's cost is its Python loop over columns)."""
        batches: dict[tuple, list[str]] = {}
        for name, module in work.layers.items():
            cfg, stats = self.cfg.for_layer(name), work.stats.get(name)
            alone = current_mask(module) is not None or stats is None
            key = (name,) if alone else (id(stats), self.layer_spec(name, cfg, input_width(module)), cfg.block_size,
                                          cfg.damp, cfg.act_order)
            batches.setdefault(key, []).append(name)
        for names in batches.values():
            if len(names) == 1:
                module = work.layers[names[0]]
                done = [(names[0], *self.compress_layer(names[0], module, work.stats.get(names[0]),
                                                        self.cfg.for_layer(names[0])))]
            else:
                done = self._quantize_together(names, work)
            for name, fmt, note in done:
                replace(name, CompressedLinear.from_module(work.layers[name], fmt))
                work.notes[name] = note

    def _quantize_together(self, names: list[str], work) -> list[tuple]:
        cfg, h = self.cfg.for_layer(names[0]), work.stats[names[0]].mean_hessian().cpu()
        weights = [float_target(current_weight(work.layers[n]), work.stats[n], cfg.damp, cfg.float_target_strength)
                   for n in names]
        stacked = gptq_quantize(torch.cat(weights), h, self.layer_spec(names[0], cfg, h.shape[0]), cfg.block_size,
                                cfg.damp, cfg.act_order, refit=cfg.refit_scales)
        parts = stacked.split_rows([len(w) for w in weights])
        return [(name, fmt, {"format": fmt.describe(), "output_error": output_error(w, fmt.dequantize(), h)})
                for name, w, fmt in zip(names, weights, parts, strict=True)]

    def compress_layer(self, name, module, stats, cfg):
        w = float_target(current_weight(module), stats, cfg.damp, cfg.float_target_strength)
        mask = current_mask(module)
        h = stats.mean_hessian().cpu()
        values = gptq_quantize(w, h, self.layer_spec(name, cfg, w.shape[1]), cfg.block_size, cfg.damp, cfg.act_order,
                               mask, cfg.refit_scales)
        fmt = self.keep_sparsity(module, values)
        return fmt, {"format": fmt.describe(), "output_error": output_error(w, fmt.dequantize(), h)}
