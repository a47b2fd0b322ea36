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
"""

from typing import Literal

import torch
from pydantic import Field

from ..formats import QuantizedWeight
from ..quant import QuantSpec, decode, encode, fit_params, pad_to_groups
from .base import current_weight
from .quantizing import QuantizingPass, QuantOptions
from .registry import register


class GPTQConfig(QuantOptions):
    type: Literal["gptq"] = "gptq"
    clip_search: bool = Field(True, description="search a clipping range minimising the error")
    damp: float = Field(0.01, gt=0, le=1, description="dampening, fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    act_order: bool = Field(True, description="quantize columns by decreasing activation energy")


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error ||(W - Wq) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T)."""
    d = w - wq
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-12))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True) -> QuantizedWeight:
    """GPTQ of ``w[out, in]`` given the Hessian ``h[in, in]`` of its inputs."""
    w = w.float().clone()
    h = h.float().clone()
    rows, cols = w.shape
    gs = spec.group_size or cols
    if gs < cols:
        block_size = max(gs, block_size // gs * gs)  # groups never straddle a lazy block
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    groups = spec.groups(cols)
    scale = torch.zeros(rows, groups)
    zero = torch.zeros(rows, groups) if spec.grid == "int" else None
    static = act_order or gs == cols
    if static:  # fit every group on the original weights
        grouped = pad_to_groups(w, gs).reshape(rows, groups, gs)
        s, z = fit_params(grouped, spec)
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    group_of = perm // gs  # group of each (permuted) column

    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, g = w1[:, i], int(group_of[i1 + i])
            if not static and (i1 + i) % gs == 0:  # fit the group on the weights as updated so far
                s, z = fit_params(w1[:, i: i + gs], spec)
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
            z = zero[:, g] if zero is not None else None
            q = encode(col, scale[:, g], z, spec)
            codes[:, i1 + i] = q
            e = (col - decode(q, scale[:, g], z, spec)) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight.from_codes(codes, scale, zero, spec)


@register
class GPTQ(QuantizingPass):
    name = "gptq"
    Config = GPTQConfig
    needs = frozenset({"hessian"})

    def compress_layer(self, name, module, stats, cfg):
        w = current_weight(module)
        h = stats.mean_hessian().cpu()
        fmt = gptq_quantize(w, h, self.layer_spec(name, cfg), cfg.block_size, cfg.damp, cfg.act_order)
        return fmt, {"format": fmt.describe(), "output_error": output_error(w, fmt.dequantize(), h)}
