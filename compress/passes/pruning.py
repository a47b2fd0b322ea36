"""What the pruning passes share: options, exact per-row mask selection, the sparse result.

Sparsity is exact per output row: every row prunes ``round(in * sparsity)`` weights (or, for an
N:M pattern, keeps N of every M consecutive inputs), so the kept values form a regular matrix
and the stored size is known from the recipe alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..errors import PlanError
from ..formats import DenseWeight, SparseWeight, compact, nm_pattern
from ..formats.base import NotAnIntegerGrid
from .base import ModelPlan, Pass, PassConfig, current_weight


class PruneOptions(PassConfig):
    sparsity: float = Field(0.5, ge=0, lt=1, description="share of weights pruned in each row (unstructured)")
    pattern: str | None = Field(None, description='N:M semi-structured pattern ("2:4", "4:8": keep N of '
                                "every M inputs); overrides sparsity")
    layerwise: Literal["uniform", "owl"] = Field(
        "uniform", description="owl: spread the sparsity over blocks by their outlier ratio (OWL)")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL: band 2 x lambda wide of block sparsities")
    owl_m: float = Field(5.0, gt=1, description="OWL: outlier = score above M x the layer's mean score")
    owl_samples: int = Field(16, ge=1, description="OWL: calibration sequences used to measure outliers")

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

    @model_validator(mode="after")
    def _owl_is_unstructured(self):
        if self.layerwise == "owl" and self.pattern:
            raise ValueError("layerwise: owl needs unstructured sparsity (no pattern)")
        if self.layerwise == "owl" and not self.owl_lambda < self.sparsity < 1 - self.owl_lambda:
            raise ValueError(f"owl: sparsity must lie in (owl_lambda, 1 - owl_lambda) = "
                             f"({self.owl_lambda}, {1 - self.owl_lambda})")
        return self

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
    """Base of pruning passes. With ``layerwise: owl`` it first measures every block's outlier ratio
    ("Outlier Weighed Layerwise Sparsity (OWL)", Yin et al., 2023): the share of weights whose
    Wanda score exceeds ``owl_m`` times their layer's mean score. Blocks with more outliers keep
    more weights: the outlier ratios are min-max scaled onto a band 2 x lambda wide and re-centred
    so block sparsities average the target: the model-wide sparsity is unchanged."""

    stage = "prune"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.block_sparsity: dict[str, float] = {}

    def written_grids(self):
        if any(nm_pattern(c.pattern) is None for c in (self.cfg, *map(self.cfg.with_options,
                                                                         self.cfg.overrides.values()))):
            raise NotAnIntegerGrid(f"{self.name} prunes without an N:M pattern: no dense group layout")
        return []

    def owl_plan(self) -> ModelPlan | None:
        """With ``layerwise: owl``: a model-wide look at every layer's Wanda scores."""
        if self.cfg.layerwise != "owl":
            return None
        return ModelPlan(stats=frozenset({"sq_sum"}), samples=self.cfg.owl_samples)

    def score_layer(self, name, module, stats, fisher):
        """(outliers, weights) of the layer: Wanda scores above ``owl_m`` times their mean."""
        s = current_weight(module).abs() * stats.input_norm().cpu().unsqueeze(0)
        return int((s > self.cfg.owl_m * s.mean()).sum()), s.numel()

    def plan_model(self, scores) -> dict:
        blocks: dict[str, list[int]] = {}
        for name, (outliers, numel) in scores.items():
            acc = blocks.setdefault(name.rsplit(".", 2)[0], [0, 0])
            acc[0] += outliers
            acc[1] += numel
        ratio = torch.tensor([o / n for o, n in blocks.values()], dtype=torch.float64)
        spread = ratio.max() - ratio.min()
        lam = self.cfg.owl_lambda
        keep = (ratio - ratio.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratio)
        keep = keep - keep.mean() + (1 - self.cfg.sparsity)
        self.block_sparsity = {b: float(1 - k) for b, k in zip(blocks, keep, strict=True)}
        return {b: {"sparsity": round(s, 4), "outlier_ratio": float(r)}
                for (b, s), r in zip(self.block_sparsity.items(), ratio, strict=True)}

    def layer_sparsity(self, name: str, cfg) -> float:
        return self.block_sparsity.get(name.rsplit(".", 2)[0], cfg.sparsity)

    def sparse_result(self, w: torch.Tensor, mask: torch.Tensor, cfg, origin=None) -> tuple[SparseWeight, dict]:
        fmt = SparseWeight(mask, DenseWeight(compact(w * mask, mask)), cfg.pattern)
        fmt.dense_origin = origin if origin is not None else w  # for DSnoT, dropped after the block
        return fmt, {"format": fmt.describe(), "sparsity": 1 - mask.float().mean().item()}
