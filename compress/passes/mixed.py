"""Mixed precision under a bits-per-weight budget, shared by the quantizing passes.

Given ``target_bits_per_weight``, every targeted layer gets one of the candidate formats (bits,
group size) so that the compressed layers together store at most the target bits per weight,
with the least total sensitivity. A layer's sensitivity to a candidate is the loss increase its
round-to-nearest version would cause, ``sum_c F_c (D H D^T)_cc``: ``D`` the weight change, ``H`` the
layer's input Hessian from calibration, ``F`` the Fisher of its output channels (see
``compress.sensitivity``): a Kronecker-factored second-order estimate in the line of HAWQ-V2
(Dong et al., 2020). Output error alone (``F = 1``) was measured to misallocate: it starves
gate/up projections, whose errors the loss feels more than their output size suggests.
Sizes are exact: the bytes each format would really store.

Allocation is a multiple-choice knapsack solved through its Lagrangian (bisect a price per byte;
each layer takes argmin error + price * bytes), then any budget left is spent greedily on the
upgrades with the best error reduction per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..formats import QuantizedWeight
from ..quant import QuantSpec, fake_quantize


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = Field(ge=2, le=8)
    group_size: int | None = Field(ge=1)


DEFAULT_CANDIDATES = [Candidate(bits=b, group_size=g) for b, g in
                      [(2, 32), (2, 64), (3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128), (5, 128), (6, 128),
                       (8, 128)]]


@dataclass
class LayerOptions:
    name: str
    numel: int
    specs: list[QuantSpec]
    errors: list[float]
    nbytes: list[int]


def score_layer(name: str, w: torch.Tensor, h: torch.Tensor, specs: list[QuantSpec],
                fisher: torch.Tensor | None = None) -> LayerOptions:
    """Estimated loss increase of each spec: ``sum_c F_c (D H D^T)_cc`` (``F`` = 1 without Fisher)."""
    errors = []
    f = fisher.unsqueeze(1) if fisher is not None else 1.0
    for spec in specs:
        d = fake_quantize(w, spec) - w
        errors.append(float((f * (d @ h) * d).sum()))
    return LayerOptions(name, w.numel(), specs, errors, [QuantizedWeight.stored_bytes(w.shape, s) for s in specs])


def allocate(layers: list[LayerOptions], target_bits_per_weight: float) -> dict[str, int]:
    """Index of the chosen spec per layer, with total bits <= target * total weights."""
    budget = target_bits_per_weight * sum(x.numel for x in layers) / 8
    smallest = sum(min(x.nbytes) for x in layers)
    if smallest > budget:
        raise ValueError(f"target {target_bits_per_weight} bits/weight is below the smallest candidate "
                         f"({8 * smallest / sum(x.numel for x in layers):.3f})")

    def choose(price):
        return {x.name: min(range(len(x.specs)), key=lambda i: x.errors[i] + price * x.nbytes[i]) for x in layers}

    def used(choice):
        return sum(x.nbytes[choice[x.name]] for x in layers)

    lo, hi = 0.0, 1.0
    while used(choose(hi)) > budget:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(choose(mid)) > budget else (lo, mid)
    choice = choose(hi)
    left = budget - used(choice)
    while True:  # spend what is left on the best error reduction per byte
        best = None
        for x in layers:
            i = choice[x.name]
            for j in range(len(x.specs)):
                extra = x.nbytes[j] - x.nbytes[i]
                gain = x.errors[i] - x.errors[j]
                if 0 < extra <= left and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, x.name, j, extra)
        if best is None:
            return choice
        _, name, j, extra = best
        choice[name] = j
        left -= extra
