"""SparseGPT: "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (Frantar &
Alistarh, 2023).

Sweeps the columns like GPTQ: in each lazy block of ``block_size`` columns it chooses the mask by
the OBS saliency ``w^2 / [H^-1]_jj^2`` (for N:M, within every group of M columns as the sweep
reaches it), zeroes the pruned weights and spreads their error over the columns not yet visited,
reconstructing the layer's output. Per-row counts are exact: block b of each row prunes
``round(s * end_b) - round(s * start_b)`` weights.
"""

from typing import Literal

import torch
from pydantic import Field

from ..formats import nm_pattern
from ..hessian import prepare_inverse_hessian
from .base import current_weight
from .pruning import PruneOptions, PruningPass, check_shape, prune_count
from .registry import register


class SparseGPTConfig(PruneOptions):
    type: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(0.01, gt=0, le=1, description="dampening, fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=16, description="columns per lazy block (a multiple of M for N:M)")


def sparsegpt_prune(w, h, sparsity, pattern=None, block_size=128, damp=0.01):
    """-> (reconstructed weights with zeros at pruned places, keep-mask)."""
    w, hinv = prepare_inverse_hessian(w, h, damp)
    rows, cols = w.shape
    nm = nm_pattern(pattern)
    if nm:
        block_size = max(nm[1], block_size // nm[1] * nm[1])
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            k = prune_count(i2, sparsity) - prune_count(i1, sparsity)
            if k:
                saliency = w1.pow(2) / torch.diagonal(hinv1).pow(2).unsqueeze(0)
                prune1.scatter_(1, saliency.argsort(dim=1)[:, :k], True)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = w1[:, i:i + m].pow(2) / torch.diagonal(hinv1)[i:i + m].pow(2).unsqueeze(0)
                prune1[:, i:i + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        mask[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w * mask, mask


@register
class SparseGPT(PruningPass):
    name = "sparsegpt"
    Config = SparseGPTConfig
    needs = frozenset({"hessian"})

    def compress_layer(self, name, module, stats, cfg):
        w = current_weight(module)
        check_shape(name, w.shape[1], cfg.pattern)
        pruned, mask = sparsegpt_prune(w, stats.mean_hessian().cpu(), self.layer_sparsity(name, cfg), cfg.pattern,
                                       cfg.block_size, cfg.damp)
        return self.sparse_result(pruned, mask, cfg, origin=w)
