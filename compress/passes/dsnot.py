"""DSnoT: "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs" (Zhang et al., 2023).

Refines the mask a pruning pass just chose, with no backpropagation: each cycle, every output row
revives one pruned weight and prunes one kept weight in exchange, when the swap lowers the row's
reconstruction error, so the sparsity of every row is unchanged.

Departure from the paper: DSnoT scores swaps by the *expected* output error
``sum_j delta_j E[x_j]`` (with a variance term for pruning). On SmolLM2, whose block inputs are
RMS-normed (small means, large variances), that criterion was measured to make the model worse
(KL 0.65 vs 0.58 for Wanda 60% alone). Here a swap is scored by the exact second-order error
``delta H delta^T`` (``delta`` = dense row - sparse row, ``H`` the calibration Hessian), kept up to
date with rank-one updates, so a cycle costs O(rows x inputs).

Put it right after ``wanda``, ``magnitude`` or ``sparsegpt`` (unstructured). Weights that stay
keep their values (SparseGPT's reconstruction included); revived weights come back as they were.
"""

from typing import Literal

import torch
from pydantic import Field

from ..errors import PlanError
from ..formats import DenseWeight, SparseWeight, compact
from .base import Pass, PassConfig, Requirements
from .registry import register


class DSnoTConfig(PassConfig):
    type: Literal["dsnot"] = "dsnot"
    cycles: int = Field(100, ge=1, le=10_000, description="swap rounds at most")


def dsnot_refine(origin, current, mask, h, cycles=100):
    """-> (refined keep-mask, values) with the same count per row.

    ``origin``: the dense weights; ``current``: the pruned layer's values (0 where pruned)."""
    mask = mask.clone()
    current = current.clone()
    diag = torch.diagonal(h).unsqueeze(0)
    g = (origin - current) @ h                    # (delta H) per row
    rows = torch.arange(origin.shape[0])
    inf = torch.tensor(float("inf"))
    for _ in range(cycles):
        grow = torch.where(~mask, -2 * origin * g + origin.pow(2) * diag, inf)  # error change on revival
        j = grow.argmin(1)
        a_j = origin[rows, j]
        g_after = g - a_j.unsqueeze(1) * h[j]
        prune = torch.where(mask, 2 * current * g_after + current.pow(2) * diag, inf)  # on pruning
        prune[rows, j] = inf
        k = prune.argmin(1)
        ok = grow[rows, j] + prune[rows, k] < 0
        if not ok.any():
            break
        r, j, k = rows[ok], j[ok], k[ok]
        b_k = current[r, k]
        g[r] = g_after[r] + b_k.unsqueeze(1) * h[k]
        mask[r, j], mask[r, k] = True, False
        current[r, j], current[r, k] = origin[r, j], 0.0
    return mask, current


@register
class DSnoT(Pass):
    name = "dsnot"
    stage = "prune"
    Config = DSnoTConfig

    def requirements(self):
        return Requirements(stats=frozenset({"hessian"}), layer_parallel=True)

    def check_plan(self, passes):
        i = passes.index(self)
        prev = passes[i - 1] if i else None
        if prev is None or prev.stage != "prune" or prev.name == "dsnot" or getattr(prev.cfg, "pattern", None):
            raise PlanError("dsnot refines an unstructured mask: put it right after wanda, magnitude or sparsegpt",
                            "e.g. passes: [{type: wanda, sparsity: 0.6}, {type: dsnot}]")

    def compress_layer(self, name, module, stats, cfg):
        fmt = getattr(module, "fmt", None)
        origin = fmt.dense_origin if isinstance(fmt, SparseWeight) else None
        if not isinstance(fmt, SparseWeight) or origin is None:
            raise PlanError(f"dsnot: layer {name} was not pruned by the pass before it", "target the same layers")
        h = stats.mean_hessian().cpu()
        mask, values = dsnot_refine(origin, fmt.dequantize(), fmt.mask, h, cfg.cycles)
        new = SparseWeight(mask, DenseWeight(compact(values, mask)), fmt.pattern)
        new.dense_origin = origin
        return new, {"format": new.describe(), "dsnot_swaps": int((mask != fmt.mask).sum()) // 2}
