"""What the pruning passes share: options, exact per-row mask selection, the sparse result.

Sparsity is exact per output row: every row prunes ``round(in * sparsity)`` weights (or, for an
N:M pattern, keeps N of every M consecutive inputs), so the kept values form a regular matrix
and the stored size is known from the recipe alone.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..errors import PlanError
from ..formats import DenseWeight, SparseWeight, compact, nm_pattern
from .base import Pass, PassConfig


class PruneOptions(PassConfig):
    sparsity: float = Field(0.5, ge=0, lt=1, description="share of weights pruned in each row (unstructured)")
    pattern: str | None = Field(None, description='N:M semi-structured pattern ("2:4", "4:8": keep N of '
                                "every M inputs); overrides sparsity")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v):
        if v in (None, "unstructured"):
            return None
        try:
            n, m = (int(x) for x in v.split(":"))
        except ValueError:
            raise ValueError(f"pattern '{v}' must look like N:M, e.g. 2:4") from None
        if not 0 < n < m or m > 16:
            raise ValueError(f"pattern {v}: need 0 < N < M <= 16 (N weights kept of every M)")
        return v

    @field_validator("targets")
    @classmethod
    def _no_embeddings(cls, v):
        for pattern in v:
            if "embed" in pattern or "lm_head" in pattern:
                raise ValueError(f"cannot prune '{pattern}': pruning passes apply to the linear layers of "
                                 "decoder blocks, not to embeddings or the LM head")
        return v

    def effective_sparsity(self) -> float:
        nm = nm_pattern(self.pattern)
        return 1 - nm[0] / nm[1] if nm else self.sparsity


def prune_count(cols: int, sparsity: float) -> int:
    return int(round(cols * sparsity))


def select_mask(score: torch.Tensor, sparsity: float, pattern: str | None = None) -> torch.Tensor:
    """Keep-mask pruning the lowest ``score`` entries of each row (or of each group of M)."""
    rows, cols = score.shape
    nm = nm_pattern(pattern)
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(rows, cols)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    k = prune_count(cols, sparsity)
    if k:
        mask.scatter_(1, score.argsort(dim=1)[:, :k], False)
    return mask


def check_shape(name: str, cols: int, pattern: str | None):
    nm = nm_pattern(pattern)
    if nm is not None and cols % nm[1]:
        raise PlanError(f"layer {name} has {cols} inputs, not a multiple of {nm[1]} for pattern {pattern}",
                        f"exclude it: exclude: ['{name}']")


class PruningPass(Pass):
    stage = "prune"

    def sparse_result(self, w: torch.Tensor, mask: torch.Tensor, cfg) -> tuple[SparseWeight, dict]:
        w = w * mask
        fmt = SparseWeight(mask, DenseWeight(compact(w, mask)), cfg.pattern)
        return fmt, {"format": fmt.describe(), "sparsity": 1 - mask.float().mean().item()}
