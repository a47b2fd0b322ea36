"""DSnoT: "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs" (Zhang et al., 2023).

Refines the mask a pruning pass just chose, with no weight update and no backpropagation. For
each output row the expected reconstruction error is ``delta = sum_j (W_j - W'_j) E[x_j]``
(``W'`` the pruned row). Each cycle, in every row whose ``|delta|`` is still large, it revives the
pruned weight that cancels most of ``delta`` (largest ``sign(delta) W_j E[x_j]``) and prunes, in
exchange, the kept weight of least Wanda importance ``|W_k| ||x_k||`` among those whose removal
does not push ``delta`` further the same way, when the swap lowers ``|delta|``. The sparsity of
every row is unchanged. Put it right after ``wanda``, ``magnitude`` or ``sparsegpt`` (unstructured).
"""

from typing import Literal

import torch
from pydantic import Field

from ..errors import PlanError
from ..formats import DenseWeight, SparseWeight, compact
from .base import Pass, PassConfig
from .registry import register


class DSnoTConfig(PassConfig):
    type: Literal["dsnot"] = "dsnot"
    cycles: int = Field(50, ge=1, le=1000, description="swap rounds at most")
    tolerance: float = Field(0.1, ge=0, description="stop a row when |delta| falls below this share of "
                             "its starting value")


def dsnot_refine(w, mask, mean, norm, cycles=50, tolerance=0.1):
    """-> refined keep-mask with the same count per row."""
    mask = mask.clone()
    contrib = w * mean.unsqueeze(0)                      # W_j E[x_j]
    importance = w.abs() * norm.unsqueeze(0)             # Wanda score
    delta = (contrib * ~mask).sum(1)                     # dense output - sparse output, expected
    start = delta.abs().clone()
    rows = torch.arange(w.shape[0])
    for _ in range(cycles):
        active = delta.abs() > tolerance * start
        if not active.any():
            break
        sign = torch.sign(delta).unsqueeze(1)
        grow_gain = torch.where(~mask, sign * contrib, torch.full_like(contrib, -float("inf")))
        grow = grow_gain.argmax(1)
        allowed = mask & (sign * contrib <= 0)
        prune_cost = torch.where(allowed, importance, torch.full_like(importance, float("inf")))
        prune = prune_cost.argmin(1)
        ok = active & torch.isfinite(prune_cost[rows, prune]) & (grow_gain[rows, grow] > 0)
        new_delta = delta - contrib[rows, grow] + contrib[rows, prune]
        ok &= new_delta.abs() < delta.abs()
        if not ok.any():
            break
        r = rows[ok]
        mask[r, grow[ok]] = True
        mask[r, prune[ok]] = False
        delta = torch.where(ok, new_delta, delta)
    return mask


@register
class DSnoT(Pass):
    name = "dsnot"
    stage = "prune"
    Config = DSnoTConfig
    needs = frozenset({"sq_sum", "x_sum"})

    def check_plan(self, passes):
        i = passes.index(self)
        prev = passes[i - 1] if i else None
        if prev is None or prev.stage != "prune" or prev.name == "dsnot" or getattr(prev.cfg, "pattern", None):
            raise PlanError("dsnot refines an unstructured mask: put it right after wanda, magnitude or sparsegpt",
                            "e.g. passes: [{type: wanda, sparsity: 0.6}, {type: dsnot}]")

    def compress_layer(self, name, module, stats, cfg):
        fmt = getattr(module, "fmt", None)
        origin = getattr(fmt, "dense_origin", None)
        if not isinstance(fmt, SparseWeight) or origin is None:
            raise PlanError(f"dsnot: layer {name} was not pruned by the pass before it", "target the same layers")
        mean = (stats.x_sum / stats.tokens).cpu()
        mask = dsnot_refine(origin, fmt.mask, mean, stats.input_norm().cpu(), cfg.cycles, cfg.tolerance)
        # weights that stay keep their (possibly reconstructed) values; revived ones come back as they were
        values = torch.where(fmt.mask, fmt.dequantize(), origin)
        new = SparseWeight(mask, DenseWeight(compact(values * mask, mask)), fmt.pattern)
        new.dense_origin = origin
        changed = int((mask != fmt.mask).sum()) // 2
        return new, {"format": new.describe(), "dsnot_swaps": changed}
