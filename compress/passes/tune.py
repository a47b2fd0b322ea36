"""Block-wise tuning of quantization scales (and norm gains) against the float model.

After a block's layers are quantized (RTN, GPTQ), their codes stay fixed and what remains free is
tuned by Adam so that the block's output on this model's own calibration inputs matches the float
model's output on the float model's inputs: every group scale of the quantized layers (as a factor
``exp(t)`` on the stored scale) and the gains of the block's norms. This is block-wise
reconstruction with the step sizes as the only quantizer parameters, the "Block-AP" stage of
"EfficientQAT: Efficient Quantization-Aware Training for Large Language Models" (Chen et al., 2024)
with codes and float weights frozen, plus the norm gains of "Norm Tweaking: High-performance Low-bit
Quantization of Large Language Models" (Li et al., 2024). Errors made upstream are compensated too,
since the target is the float model's activation, not the block's own float output.

The last calibration batch is held out: the tuned values are kept only when they lower its error.
Put the pass after the quantizing pass it tunes. Each epoch costs about three calibration forwards
of the block (measured effects: RESULTS.md).
"""

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from ..blocks import run_block
from ..families import norm_modules
from ..modules import CompressedLinear
from .base import Pass, PassConfig, Requirements
from .registry import register
from .trainable_grid import TrainableWeight, refuse_k_quants_before, trainable_grids


class TuneConfig(PassConfig):
    type: Literal["tune"] = "tune"
    epochs: int = Field(2, ge=1, le=100, description="passes over the calibration batches per block")
    lr: float = Field(2e-3, gt=0, le=0.1, description="Adam step size (of log-scales and relative norm gains)")
    norms: bool = Field(True, description="also tune the gains of the block's norms")


@register
class Tune(Pass):
    name = "tune"
    stage = "quantize"
    Config = TuneConfig

    def requirements(self):
        return Requirements(block_io=True, float_outputs=True)

    def check_plan(self, passes):
        self.check_follows_a_quantizer(passes, "put `type: tune` after an rtn or gptq pass")
        refuse_k_quants_before(self, passes)

    def apply(self, work, replace):
        grids = trainable_grids(work.layers, work.device)
        tuned = list(grids.values())
        if not tuned or work.float_outputs is None or len(work.inputs) < 2:
            return
        gains = [m.weight for m in norm_modules(work.block)] if self.cfg.norms else []
        originals = [g.detach().clone() for g in gains]
        values = [p for t in tuned for p in t.value_parameters()]  # code book entries
        params = [t.log_factor for t in tuned] + values + gains
        for p in params:
            p.requires_grad_(True)
        train, held = list(range(len(work.inputs) - 1)), len(work.inputs) - 1
        optimizer = torch.optim.Adam([{"params": [t.log_factor for t in tuned] + values},
                                      {"params": gains, "lr": self.cfg.lr * float(
                                          torch.cat([g.detach().abs().flatten() for g in gains]).mean())
                                       if gains else self.cfg.lr}], lr=self.cfg.lr)
        with torch.no_grad():
            before = float(block_loss(work, tuned, held))
        with torch.enable_grad():
            for _ in range(self.cfg.epochs):
                for k in train:
                    optimizer.zero_grad(set_to_none=True)
                    block_loss(work, tuned, k).backward()
                    optimizer.step()
        with torch.no_grad():
            after = float(block_loss(work, tuned, held))
        for p in params:
            p.requires_grad_(False)
        keep = after < before
        if not keep:
            with torch.no_grad():
                for g, o in zip(gains, originals, strict=True):
                    g.copy_(o)
        for name, t in grids.items():
            t.uninstall()
            replace(name, CompressedLinear.from_module(t.modules[0], t.result() if keep else t.fmt))
            work.notes[name] = {"tuned": keep, "block_error_before": before, "block_error_after": after}


def block_loss(work, weights: Sequence[TrainableWeight], k: int) -> torch.Tensor:
    """The squared error of the block's output on calibration batch ``k`` against the float model's, relative to
    the latter, with ``weights`` installed in their modules."""
    for t in weights:
        t.install()
    out = run_block(work.block, work.inputs[k], work.device)
    target = work.float_outputs[k][0].to(work.device)
    return ((out - target) ** 2).mean() / (target ** 2).mean()
