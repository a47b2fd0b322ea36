"""Weight clustering (palettization): every weight becomes an index into a small table of centroids.

The tables come from k-means over the weights (the coremltools palettization and eDKM line,
"eDKM: An Efficient and Accurate Train-time Weight Clustering for Large Language Models",
Cho et al., 2023), one table per tensor, per output channel, or per group of channels.

``sensitivity`` weights the k-means as in SqueezeLLM ("SqueezeLLM: Dense-and-Sparse Quantization",
Kim et al., 2023), whose weight of ``W_ij`` is the Fisher diagonal of the loss. We use its
Kronecker-factored form ``F_i * H_jj``: ``hessian`` takes ``H_jj``, the energy of input ``j`` over
the block's calibration inputs; ``fisher`` multiplies in ``F_i``, the output-gradient Fisher of
channel ``i`` from a backward sweep. With one table per channel ``F_i`` is a constant per table,
so ``hessian`` already gives SqueezeLLM's centroids and ``fisher`` matters for shared tables.

``outliers`` keeps that share of each layer's weights exactly in float16 in a sparse side matrix
(SqueezeLLM's dense-and-sparse decomposition), chosen by sensitivity x w^2 or by magnitude; they
are left out of the k-means. ``error_feedback`` assigns indices column by column and spreads each
column's error over the columns not yet assigned (the GPTQ / Optimal Brain Quantization sweep,
here with a non-uniform per-row grid). After pruning, only kept weights are clustered and the
mask keeps the zeros.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..errors import PlanError
from ..formats import OutlierWeight, PalettizedWeight, SparseWeight, compact, stored_table
from ..formats.base import NotAnIntegerGrid
from ..hessian import obq_sweep, output_error, prepare_inverse_hessian
from ..kmeans import nearest, weighted_kmeans
from .base import ModelPlan, Pass, PassConfig, Requirements, current_mask, current_weight
from .registry import register


class KMeansConfig(PassConfig):
    type: Literal["kmeans"] = "kmeans"
    bits: int = Field(4, ge=1, le=8, description="index bits: 2^bits centroids per table (1-8)")
    granularity: Literal["tensor", "channel", "group"] = Field(
        "channel", description="one table per tensor, per output channel, or per group of channels")
    channels_per_table: int = Field(16, ge=1, description="output channels sharing a table (granularity: group)")
    sensitivity: Literal["none", "hessian", "fisher"] = Field(
        "hessian", description="weight the k-means: none; hessian = input energy H_jj; fisher = H_jj x "
        "output-gradient Fisher (SqueezeLLM)")
    outliers: float = Field(0.0, ge=0, le=0.1, description="share of weights kept exactly in fp16 "
                            "(dense-and-sparse), e.g. 0.005 or '0.5%'")
    outliers_by: Literal["sensitivity", "magnitude"] = Field("sensitivity", description="how outliers are chosen")
    error_feedback: bool = Field(False, description="assign column by column, compensating the error "
                                 "GPTQ-style (needs full Hessians)")
    table_dtype: Literal["float16", "int8"] = Field("float16", description="storage of the look-up tables "
                                                    "(int8: one fp16 scale per table)")
    iterations: int = Field(100, ge=1, description="at most this many Lloyd iterations")
    damp: float = Field(0.01, gt=0, le=1, description="error feedback: Hessian dampening")
    block_size: int = Field(128, ge=1, description="error feedback: columns per lazy batch update")
    fisher_samples: int = Field(16, ge=1, description="sensitivity fisher: calibration sequences of the backward")

    renamed = {"group_size": "channels_per_table"}  # group_size means inputs per scale in quantizing passes

    @field_validator("outliers", mode="before")
    @classmethod
    def _percent(cls, v):
        if isinstance(v, str) and v.strip().endswith("%"):
            try:
                return float(v.strip()[:-1]) / 100
            except ValueError:
                raise ValueError(f"outliers '{v}' is not a percentage") from None
        return v

    def rows_per_table(self, rows: int) -> int:
        return {"tensor": rows, "channel": 1, "group": self.channels_per_table}[self.granularity]


def palettize(w: torch.Tensor, cfg: KMeansConfig, importance: torch.Tensor | None = None,
              hessian: torch.Tensor | None = None, mask: torch.Tensor | None = None, seed: int = 0):
    """Cluster ``w[out, in]``; -> PalettizedWeight, wrapped in OutlierWeight when outliers are kept.

    ``importance[out, in]`` weights the k-means (None: uniform); ``hessian[in, in]`` enables error
    feedback; with a keep-``mask`` only the kept weights are clustered (the result then describes
    the compacted kept values, as SparseWeight expects)."""
    rows = w.shape[0]
    kept = compact(w, mask) if mask is not None else w
    imp = torch.ones_like(w) if importance is None else importance.expand_as(w).float()
    imp_kept = compact(imp, mask) if mask is not None else imp
    outlier = _choose_outliers(kept, imp_kept, cfg) if cfg.outliers else None
    cluster_weight = imp_kept if outlier is None else imp_kept * ~outlier

    rpt = min(cfg.rows_per_table(rows), rows)
    tables = -(-rows // rpt)
    pad = tables * rpt - rows
    values = torch.cat([kept, kept.new_zeros(pad, kept.shape[1])]).reshape(tables, -1)
    weight = torch.cat([cluster_weight, cluster_weight.new_zeros(pad, kept.shape[1])]).reshape(tables, -1)
    centroids, _ = weighted_kmeans(values, 1 << cfg.bits, weight, cfg.iterations, seed)
    table = stored_table(centroids, cfg.table_dtype)  # codes are chosen against the stored values
    row_tables = table[torch.arange(rows) // rpt]

    if cfg.error_feedback and hessian is not None:
        codes, final = _assign_with_feedback(w, hessian, row_tables, cfg, mask, outlier)
    else:
        codes, final = nearest(kept, row_tables), kept
    fmt = PalettizedWeight.from_codes(codes, centroids, cfg.bits, rpt, cfg.table_dtype)
    return OutlierWeight.from_mask(fmt, final, outlier) if outlier is not None else fmt


def _choose_outliers(kept: torch.Tensor, importance: torch.Tensor, cfg: KMeansConfig) -> torch.Tensor:
    score = kept.abs() if cfg.outliers_by == "magnitude" else importance * kept.pow(2)
    count = int(round(cfg.outliers * kept.numel()))
    outlier = torch.zeros(kept.numel(), dtype=torch.bool)
    if count:
        outlier[score.flatten().topk(count).indices] = True
    return outlier.reshape(kept.shape)


def _assign_with_feedback(w, hessian, row_tables, cfg, mask, outlier):
    """Indices by the OBQ sweep in decreasing ``H_jj`` order -> (codes and final weights of the kept
    positions). Outliers take their compensated value exactly; pruned weights stay zero."""
    rows, cols = w.shape
    full_outlier = torch.zeros(rows, cols, dtype=torch.bool)
    if outlier is not None:
        if mask is not None:
            full_outlier[mask] = outlier.flatten()
        else:
            full_outlier = outlier
    perm = torch.argsort(torch.diagonal(hessian), descending=True)
    wp, hinv = prepare_inverse_hessian(w, hessian, cfg.damp, perm)
    keep = mask[:, perm] if mask is not None else None
    exact = full_outlier[:, perm]
    codes = torch.zeros(rows, cols, dtype=torch.long)
    final = torch.zeros(rows, cols)

    def round_column(j, rest):
        col = rest[:, 0]
        codes[:, j] = nearest(col.unsqueeze(1), row_tables).squeeze(1)
        value = torch.where(exact[:, j], col, row_tables.gather(1, codes[:, j:j + 1]).squeeze(1))
        if keep is not None:
            value = value * keep[:, j]
        final[:, j] = value
        return value

    obq_sweep(wp, hinv, round_column, cfg.block_size)
    inv = torch.argsort(perm)
    codes, final = codes[:, inv], final[:, inv]
    if mask is not None:
        return compact(codes, mask), compact(final, mask)
    return codes, final


@register
class KMeans(Pass):
    name = "kmeans"
    stage = "cluster"
    Config = KMeansConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fisher: dict[str, torch.Tensor] = {}

    def written_grids(self):
        raise NotAnIntegerGrid("kmeans stores palette indices into a code book, not an integer grid")

    def requirements(self):
        feedback = self.cfg.error_feedback or any(v.get("error_feedback") for v in self.cfg.overrides.values())
        plan = ModelPlan(stats=frozenset(), fisher=True, samples=self.cfg.fisher_samples) \
            if self.cfg.sensitivity == "fisher" else None
        return Requirements(stats=frozenset({"hessian" if feedback else "sq_sum"}), model_plan=plan,
                            layer_parallel=True)

    def score_layer(self, name, module, stats, fisher):
        """The Fisher of the layer's outputs (weights the sensitivity of every output channel)."""
        return fisher

    def plan_model(self, scores) -> dict:
        self.fisher = dict(scores)
        return {}

    def check_plan(self, passes):
        later = [p for p in passes[passes.index(self) + 1:] if p.writes_block_codes()]
        if later:
            raise PlanError(f"pass {later[0].name} cannot follow kmeans: clustered weights are already "
                            "table indices", "to quantize the look-up tables, set table_dtype: int8 on kmeans")

    def compress_layer(self, name, module, stats, cfg):
        w, mask = current_weight(module), current_mask(module)
        importance = None
        if cfg.sensitivity != "none":
            importance = stats.input_norm().cpu().pow(2).unsqueeze(0)
            if cfg.sensitivity == "fisher" and self.fisher.get(name) is not None:
                importance = self.fisher[name].unsqueeze(1) * importance
        hessian = stats.mean_hessian().cpu() if stats.hessian is not None else None
        seed = (torch.initial_seed() + zlib.crc32(name.encode())) % (1 << 63)
        values = palettize(w, cfg, importance, hessian, mask, seed)
        fmt = SparseWeight(mask, values, module.fmt.pattern) if mask is not None else values
        note = {"format": fmt.describe()}
        if hessian is not None:
            note["output_error"] = output_error(w, fmt.dequantize(), hessian)
        return fmt, note
