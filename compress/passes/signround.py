"""Learned rounding and range clipping by signed gradient descent: SignRound.

"Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs" (Cheng et al., 2023), the
method of Intel's AutoRound. A weight ``w`` of a group with scale ``s`` and zero point ``z`` is stored as
``clamp(round(w / s + v) + z, 0, maxq)``: an offset ``v`` in [-0.5, 0.5] per weight chooses which way it rounds,
and two factors in [0, 1] per group clip the group's minimum and maximum, which set ``s`` and ``z``. They train
block by block so that the block's output on this model's own calibration inputs matches the float model's output
(the target ``tune`` uses), by signed gradient descent: each step moves every value by the step size times the sign
of its gradient, the step size falling linearly to zero; rounding passes the gradient straight through. Scales are
rounded to float16 in the forward as they are stored, so what trains is what the result stores.

It quantizes float weights, in place of ``rtn`` or ``gptq``, and starts from round-to-nearest. The last calibration
batch is held out: its error is measured ``checks`` times along the way, and the best state met (the start
included) is what is stored.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import PlanError
from ..formats import QuantizedWeight
from ..modules import CompressedLinear
from ..precision import Bfloat16Setting, bfloat16_autocast, uses_bfloat16
from ..quant import QuantSpec, decode, pad_to_groups
from .base import Requirements, current_weight, input_width
from .quantizing import QuantizingPass, QuantOptions
from .registry import register
from .trainable_grid import TrainableWeight
from .tune import block_loss


class SignRoundConfig(QuantOptions):
    type: Literal["signround"] = "signround"
    steps: int = Field(200, ge=1, le=10_000, description="signed-gradient steps per block")
    lr: float | None = Field(None, gt=0, le=1, description="the first step's size (in grid levels for the "
                             "rounding offsets, in range for the clipping factors); default 1 / steps")
    batch_size: int = Field(8, ge=1, le=1024, description="calibration sequences whose gradient one step follows")
    clip: bool = Field(True, description="also learn how much of each group's minimum and maximum the grid spans")
    bfloat16: Bfloat16Setting = Field("auto", description="the training steps' forward and backward under bfloat16 "
                                      "autocast: true, false, or auto (where the device multiplies bfloat16 "
                                      "natively; the held-out checks stay in the compute dtype)")
    checks: int = Field(10, ge=1, le=1000, description="times the held-out batch's error is measured; the best "
                        "state met is stored")

    @model_validator(mode="after")
    def _integer_grid(self):
        if self.grid != "int":
            raise ValueError("signround learns the rounding of an integer grid: use grid: int")
        if self.clip_search:
            raise ValueError("signround learns each group's clipping itself (option clip): drop clip_search")
        return self


def _round(x: torch.Tensor) -> torch.Tensor:
    """Rounding whose gradient passes straight through."""
    return x + (x.round() - x).detach()


class LearnedRounding(TrainableWeight):
    """One layer's float weight on an integer grid, its rounding offsets and clipping factors trainable."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, modules: list[CompressedLinear], device,
                 clip: bool):
        out, k = weight.shape
        self.shape, self.spec, self.modules = (out, k), spec, modules
        self.groups = pad_to_groups(weight.float(), spec.group_size or k).reshape(out, spec.groups(k), -1).to(device)
        self.lo, self.hi = self.groups.amin(-1), self.groups.amax(-1)
        self.offset = nn.Parameter(torch.zeros_like(self.groups))
        self.clip_lo = nn.Parameter(torch.ones_like(self.lo)) if clip else None
        self.clip_hi = nn.Parameter(torch.ones_like(self.hi)) if clip else None

    def rounding_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.offset, self.clip_lo, self.clip_hi) if p is not None]

    def keep_in_range(self) -> None:
        self.offset.data.clamp_(-0.5, 0.5)
        for p in (self.clip_lo, self.clip_hi):
            if p is not None:
                p.data.clamp_(0.0, 1.0)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's scale (float16 values) and zero point, differentiable in the clipping factors."""
        lo = self.lo if self.clip_lo is None else self.lo * self.clip_lo
        hi = self.hi if self.clip_hi is None else self.hi * self.clip_hi
        maxq = self.spec.maxq
        if self.spec.symmetric:
            scale = 2 * torch.maximum(lo.abs(), hi.abs()) / maxq
        else:
            scale = (hi.clamp_min(0) - lo.clamp_max(0)) / maxq
        scale = scale.clamp_min(1e-8)
        scale = scale + (scale.half().float() - scale).detach()
        if self.spec.symmetric:
            return scale, torch.full_like(scale, float((maxq + 1) // 2))
        return scale, _round(-lo.clamp_max(0) / scale).clamp(0, maxq)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = self.grid()
        codes = (_round(self.groups / scale.unsqueeze(-1) + self.offset) + zero.unsqueeze(-1)).clamp(0, self.spec.maxq)
        return codes, scale, zero

    def weight(self) -> torch.Tensor:
        out, k = self.shape
        return decode(*self.codes(), self.spec).reshape(out, -1)[:, :k]

    def result(self) -> QuantizedWeight:
        with torch.no_grad():
            codes, scale, zero = self.codes()
        out, k = self.shape
        codes = codes.reshape(out, -1)[:, :k].round().to(torch.uint8).cpu()
        return QuantizedWeight.from_codes(codes, scale.cpu(), zero.cpu(), self.spec)


@register
class SignRound(QuantizingPass):
    name = "signround"
    Config = SignRoundConfig

    def requirements(self):
        return Requirements(block_io=True, float_outputs=True, model_plan=self.mixed_precision_plan())

    def check_plan(self, passes):
        if any(p.stage == "prune" or p.writes_block_codes() for p in passes[:passes.index(self)]):
            raise PlanError("the signround pass rounds float weights, and a pass before it already pruned or "
                            "quantized them", "put `type: signround` first among the pruning and quantizing passes")

    def apply(self, work, replace):
        if work.float_outputs is None or not work.inputs or not work.layers:
            return
        weights: dict[str, LearnedRounding] = {}
        for name, module in work.layers.items():
            spec = self.layer_spec(name, self.cfg.for_layer(name), input_width(module))
            t = LearnedRounding(current_weight(module), spec, [], work.device, self.cfg.clip)
            t.modules.append(CompressedLinear.from_module(module, t.result()))  # round to nearest, until trained
            replace(name, t.modules[0])
            weights[name] = t
        held = len(work.inputs) - 1
        train = list(range(held)) or [held]  # a single batch trains and checks at once
        report = self._train(work, weights, train, held)
        for name, t in weights.items():
            t.uninstall()
            fmt = t.result()
            replace(name, CompressedLinear.from_module(t.modules[0], fmt))
            work.notes[name] = {"format": fmt.describe(), **report}

    def _train(self, work, weights: dict[str, LearnedRounding], train: list[int], held: int) -> dict:
        """Signed gradient descent on every layer's rounding at once; leaves the best state met in place."""
        steps, trained = self.cfg.steps, list(weights.values())
        params = [p for t in trained for p in t.rounding_parameters()]
        lr = self.cfg.lr or 1 / steps
        per_step = -(-self.cfg.batch_size // work.inputs[0][0].shape[0])  # batches whose gradient one step sums
        checks = {round(steps * (i + 1) / self.cfg.checks) for i in range(self.cfg.checks)}
        order = torch.Generator().manual_seed(work.index)
        queue: list[int] = []
        with torch.no_grad():
            start = best = float(block_loss(work, trained, held))
        best_step, best_state = 0, [p.detach().clone() for p in params]
        thawed = [p for p in work.block.parameters() if p.requires_grad]  # the block's own: no gradient wanted
        for p in thawed:
            p.requires_grad_(False)
        for step in range(1, steps + 1):
            with torch.enable_grad(), bfloat16_autocast(self.cfg.bfloat16, work.device):
                for _ in range(per_step):
                    if not queue:
                        queue = [train[i] for i in torch.randperm(len(train), generator=order).tolist()]
                    block_loss(work, trained, queue.pop()).float().backward()
            with torch.no_grad():
                rate = lr * (1 - (step - 1) / steps)
                for p in params:
                    if p.grad is not None:
                        p.sub_(rate * p.grad.sign())
                        p.grad = None
                for t in trained:
                    t.keep_in_range()
                if step in checks:
                    error = float(block_loss(work, trained, held))
                    if error < best:
                        best, best_step, best_state = error, step, [p.detach().clone() for p in params]
        for p in thawed:
            p.requires_grad_(True)
        with torch.no_grad():
            for p, kept in zip(params, best_state, strict=True):
                p.copy_(kept)
        return {"block_error_rtn": start, "block_error": best, "best_step": best_step,
                "bfloat16": uses_bfloat16(self.cfg.bfloat16, work.device)}
