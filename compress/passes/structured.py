"""Structured pruning that removes parameters: MLP channels, attention head groups, whole layers.

Channels and heads are ranked by calibration importance in the spirit of FLAP ("Fluctuation-based
Adaptive Structured Pruning for Large Language Models", An et al., 2024) and Wanda-sp: an input
channel ``j`` of the layer that reads it (``down_proj`` for MLP channels, ``o_proj`` for heads)
scores ``||X_j|| * ||W[:, j]||``, the size of its contribution to the block's output. Under
grouped-query attention a key/value head and the query heads sharing it go together.
Whole decoder layers are ranked by Block Influence, ``1 - cos(x_in, x_out)`` of the hidden
state over calibration tokens (ShortGPT, Men et al., 2024; Minitron, Muralidharan et al., 2024, also
prunes depth by it): the layers that change the residual stream least are removed.

Tensors shrink physically and the model config is updated (``intermediate_size``, head counts
with an explicit ``head_dim``, ``num_hidden_layers``), so the result loads with plain
``transformers``. Every block keeps the same width, because a transformers config holds one
width for all layers; ``target_parameters`` chooses that width for a model-wide parameter cut.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..blocks import run_block
from ..errors import PlanError
from ..families import family, supporting
from .base import Pass, PassConfig, Requirements
from .registry import register


class StructuredConfig(PassConfig):
    type: Literal["structured"] = "structured"
    mlp_sparsity: float = Field(0.0, ge=0, lt=1, description="share of MLP intermediate channels removed in "
                                "every block")
    attention_groups: int = Field(0, ge=0, description="key/value head groups removed in every block (each "
                                  "takes its query heads along)")
    drop_layers: int = Field(0, ge=0, description="whole decoder layers removed (lowest Block Influence)")
    target_parameters: float | None = Field(
        None, gt=0, lt=1, description="share of all parameters to remove; sets mlp_sparsity after the "
        "attention groups and dropped layers are counted")

    @model_validator(mode="after")
    def _something_to_do(self):
        if not (self.mlp_sparsity or self.attention_groups or self.drop_layers or self.target_parameters):
            raise ValueError("structured pruning needs mlp_sparsity, attention_groups, drop_layers or "
                             "target_parameters")
        return self


def channel_importance(w: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda-sp / FLAP importance of each input channel of ``w[out, in]``: ||X_j|| * ||W[:, j]||."""
    return input_sq_sum.clamp_min(0).sqrt() * w.float().norm(dim=0)


def _shrink(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    bias = linear.bias.detach()[rows] if linear.bias is not None and rows is not None else linear.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in their original order."""
    return score.topk(keep).indices.sort().values


@register
class Structured(Pass):
    name = "structured"
    stage = "prune"
    Config = StructuredConfig

    def requirements(self):
        return Requirements(stats=frozenset({"sq_sum"}), block_io=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.influence: dict[int, float] = {}
        self.widths: dict[int, int] = {}  # MLP width -> channels kept

    def check_plan(self, passes):
        before = passes[:passes.index(self)]
        if any(p.stage != "transform" for p in before):
            raise PlanError("structured pruning must come before other pruning, clustering and quantization "
                            "passes", "move it to the front of passes (after awq only)")
        if self.cfg.targets != ["*"] or self.cfg.exclude or self.cfg.overrides:
            raise PlanError("structured pruning applies to every block alike (one width in the config)",
                            "remove targets/exclude/overrides from the structured pass")

    def block_state(self, index: int) -> dict:
        return {"influence": self.influence[index]} if index in self.influence else {}

    def restore_block_state(self, index: int, state: dict) -> None:
        if "influence" in state:
            self.influence[index] = state["influence"]

    def apply(self, work, replace):
        if not family(work.model_type).structured_pruning:
            raise PlanError(f"structured pruning supports {', '.join(supporting('structured_pruning'))} blocks, "
                            f"not '{work.model_type}'",
                            "use an unstructured or N:M pruning pass for this family")
        block, cfg = work.block, self.cfg
        if cfg.drop_layers:
            self.influence[work.index] = block_influence(block, work.inputs, work.device)
        attn, mlp = block.self_attn, block.mlp
        p = work.prefix
        if self.mlp_keep(mlp.down_proj.in_features) < mlp.down_proj.in_features:
            score = channel_importance(mlp.down_proj.weight, work.stats[f"{p}.mlp.down_proj"].sq_sum.cpu())
            keep = keep_top(score.to(mlp.down_proj.weight.device), self.mlp_keep(mlp.down_proj.in_features))
            mlp.gate_proj, mlp.up_proj = _shrink(mlp.gate_proj, rows=keep), _shrink(mlp.up_proj, rows=keep)
            mlp.down_proj = _shrink(mlp.down_proj, cols=keep)
            work.notes[f"{p}.mlp.down_proj"] = {"kept_channels": len(keep)}
        if cfg.attention_groups:
            self._prune_groups(attn, work.stats[f"{p}.self_attn.o_proj"].sq_sum.cpu(), work, p)

    def _prune_groups(self, attn, o_sq_sum, work, p):
        hd, rep = attn.head_dim, attn.num_key_value_groups
        groups = attn.k_proj.out_features // hd
        if self.cfg.attention_groups >= groups:
            raise PlanError(f"attention_groups {self.cfg.attention_groups}: {work.prefix} has {groups} "
                            "key/value groups", f"remove at most {groups - 1}")
        score = channel_importance(attn.o_proj.weight, o_sq_sum).reshape(groups, rep * hd).sum(1)
        kept = keep_top(score, groups - self.cfg.attention_groups)
        kv = (kept.unsqueeze(1) * hd + torch.arange(hd)).flatten()
        q = (kept.unsqueeze(1) * rep * hd + torch.arange(rep * hd)).flatten()
        dev = attn.q_proj.weight.device
        attn.q_proj = _shrink(attn.q_proj, rows=q.to(dev))
        attn.k_proj, attn.v_proj = _shrink(attn.k_proj, rows=kv.to(dev)), _shrink(attn.v_proj, rows=kv.to(dev))
        attn.o_proj = _shrink(attn.o_proj, cols=q.to(dev))
        work.notes[f"{p}.self_attn.o_proj"] = {"kept_kv_groups": kept.tolist()}

    def mlp_keep(self, width: int) -> int:
        if width not in self.widths:
            self.widths[width] = width - int(round(width * self.cfg.mlp_sparsity))
        return self.widths[width]

    def prepare(self, model) -> None:
        """Turn ``target_parameters`` into an MLP width, given the other cuts (called before any block)."""
        cfg = self.cfg
        if cfg.target_parameters is None:
            return
        c = model.config
        hidden, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        hd = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
        rep = c.num_attention_heads // c.num_key_value_heads
        total = sum(p.numel() for p in model.parameters())
        attn_cut = cfg.attention_groups * hd * hidden * (2 * rep + 2) * (layers - cfg.drop_layers)
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        depth_cut = cfg.drop_layers * block
        need = cfg.target_parameters * total - attn_cut - depth_cut
        per_channel = 3 * hidden * (layers - cfg.drop_layers)
        remove = max(0, min(inter - 1, int(-(-need // per_channel))))
        self.widths[inter] = inter - remove

    def finalize(self, model) -> dict:
        """Update the config to the new widths and drop the least influential layers. Returns what
        the report shows, with ``kept_blocks`` {old block index: new block index}."""
        c = model.config
        layers = model.model.layers
        first = layers[0]
        c.intermediate_size = first.mlp.down_proj.in_features
        hd = first.self_attn.head_dim
        c.head_dim = hd
        c.num_key_value_heads = first.self_attn.k_proj.out_features // hd
        c.num_attention_heads = first.self_attn.q_proj.out_features // hd
        keep = list(range(len(layers)))
        if self.cfg.drop_layers:
            order = sorted(self.influence, key=lambda i: self.influence[i])
            dropped = set(order[:self.cfg.drop_layers])
            keep = [i for i in keep if i not in dropped]
            model.model.layers = nn.ModuleList([layers[i] for i in keep])
            for new, block in enumerate(model.model.layers):
                block.self_attn.layer_idx = new
            c.num_hidden_layers = len(keep)
            if getattr(c, "layer_types", None):
                c.layer_types = [c.layer_types[i] for i in keep]
        return {"kept_blocks": {old: new for new, old in enumerate(keep)},
                "dropped_layers": [i for i in range(len(layers)) if i not in keep],
                "block_influence": {i: round(v, 5) for i, v in sorted(self.influence.items())},
                "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads}


@torch.no_grad()
def block_influence(block: nn.Module, inputs: list, device) -> float:
    """ShortGPT's Block Influence: 1 - mean cosine similarity of the block's input and output states."""
    total, count = 0.0, 0
    for hidden, kwargs in inputs:
        x = hidden.to(device)
        y = run_block(block, (x, kwargs), device)
        cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        total += float((1 - cos).sum())
        count += cos.numel()
    return total / max(count, 1)
