"""Activation-aware weight scaling: "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration" (Lin et al., 2023).

Salient input channels (large activations) lose less to rounding when their weights are scaled up
before quantization. For each group of linear layers reading the same input, AWQ searches a
per-channel scale ``s = a^alpha`` (``a`` the channel's activation magnitude, ``alpha`` on a grid)
minimising the output error of the *quantized* layers, multiplies their weights by ``s`` and folds
``1/s`` into the module producing the input (a norm or a linear layer), so the float model is
unchanged. The error is the exact layer output error ``tr(D H D^T)`` from the calibration Hessian
(``D`` the change of the effective weights), and ``a`` is the channel's RMS, ``sqrt(H_jj)``.

It is a transform pass: put it before the quantization pass (RTN or GPTQ) it prepares for; it
takes that pass's bits / group size / grid for its search unless given its own.
"""

from typing import Literal

import torch
from pydantic import Field

from ..errors import PlanError
from ..families import consumer_channels, family, scaling_groups
from ..kquants import ktype
from ..quant import QuantSpec, fake_quantize
from .base import Pass, PassConfig, Requirements
from .registry import register


class AWQConfig(PassConfig):
    type: Literal["awq"] = "awq"
    grid_points: int = Field(20, ge=2, le=100, description="alpha values tried in [0, 1)")
    search_bits: int | None = Field(None, ge=2, le=8, description="bits of the quantization the scale search "
                                    "simulates (default: the next quantizing pass's)")
    search_group_size: int | None = Field(None, ge=1, description="inputs per scale of the quantization the search "
                                          "simulates (default: the next quantizing pass's)")

    renamed = {"bits": "search_bits", "group_size": "search_group_size"}  # AWQ stores no codes: both are assumptions


def awq_search(weights: list[torch.Tensor], h: torch.Tensor, spec: QuantSpec, grid_points: int = 20,
               tied: torch.Tensor | None = None):
    """Best per-input-channel scale for weights sharing the input with Hessian ``h``.

    ``tied[j]`` (optional) is the producer channel input ``j`` comes from, when several inputs
    copy one producer channel (GQA values): they get one scale, from their pooled activation.
    Returns (scale [producer channels], alpha, relative error with scale, relative error without)."""
    w = torch.cat([x.float() for x in weights], 0)
    energy = torch.diagonal(h).clamp_min(0)
    if tied is not None:
        energy = energy.new_zeros(int(tied.max()) + 1).index_add_(0, tied, energy)
    act = energy.sqrt().clamp_min(1e-6)
    ref = ((w @ h) * w).sum().clamp_min(1e-12)

    def err(s):
        s = s[tied] if tied is not None else s
        d = fake_quantize(w * s, spec) / s - w
        return float(((d @ h) * d).sum() / ref)

    best = (err(torch.ones_like(act)), 0.0, torch.ones_like(act))
    plain = best[0]
    for i in range(1, grid_points):
        alpha = i / grid_points
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        e = err(s)
        if e < best[0]:
            best = (e, alpha, s)
    return best[2], best[1], best[0], plain


@register
class AWQ(Pass):
    name = "awq"
    stage = "transform"
    Config = AWQConfig

    def requirements(self):
        # it rescales the Hessians it changes, so the next pass reuses them
        return Requirements(stats=frozenset({"hessian"}), preserves_stats=True)

    def check_plan(self, passes):
        following = [p for p in passes[passes.index(self) + 1:] if p.stage == "quantize"]
        if not following and (self.cfg.search_bits is None or self.cfg.search_group_size is None):
            raise PlanError("awq needs a quantization pass after it (or its own search_bits and "
                            "search_group_size)",
                            "add e.g. `- type: gptq` after it")
        q = following[0].cfg if following else None
        bits = self.cfg.search_bits or q.bits
        group = self.cfg.search_group_size or getattr(q, "group_size", None)
        grid = getattr(q, "grid", "int")
        if ktype(grid) is not None:  # the type fixes bits, groups and symmetry
            self.spec = q.spec()
        else:
            self.spec = QuantSpec(bits, group, grid != "int" or getattr(q, "symmetric", False), grid)

    def apply(self, work, replace):
        model_type = work.model_type
        for producer, consumers, kind in scaling_groups(model_type, work.block):
            names = [f"{work.prefix}.{c}" for c in consumers]
            if not all(n in work.layers for n in names):
                continue
            mods = [work.layers[n] for n in names]
            h = work.stats[names[0]].mean_hessian().to(mods[0].weight.device)
            tied = consumer_channels(work.block, producer, mods)
            tied = tied.to(h.device) if tied is not None else None
            spec = self.spec.for_width(h.shape[0])
            s, alpha, e_scaled, e_plain = awq_search([m.weight.data for m in mods], h, spec, self.cfg.grid_points, tied)
            if alpha == 0.0:
                continue
            s = s.to(mods[0].weight.dtype)
            s_in = s[tied] if tied is not None else s  # the consumers' input channels
            for m in mods:
                m.weight.data.mul_(s_in)
            prod = work.block.get_submodule(producer)
            if kind == "norm":
                offset = family(model_type).norm_offset
                prod.weight.data.copy_((prod.weight.data + offset) / s - offset)
                if getattr(prod, "bias", None) is not None:
                    prod.bias.data.div_(s)
            else:
                prod.weight.data.div_(s.unsqueeze(1))
                if prod.bias is not None:
                    prod.bias.data.div_(s)
            _rescale_stats(work, names, s_in)
            for n in names:
                work.notes[n] = {"awq_alpha": alpha, "awq_error_before": e_plain, "awq_error_after": e_scaled}


def _rescale_stats(work, names, s):
    """The consumers now read ``x / s``: their Hessian becomes ``H / (s s^T)``."""
    s = s.float().to(work.stats[names[0]].hessian.device)
    for st in {id(work.stats[n]): work.stats[n] for n in names}.values():
        st.hessian.div_(s.unsqueeze(0) * s.unsqueeze(1))
