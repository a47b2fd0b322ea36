"""End-to-end tuning of quantization scales (and zero points) against the float model's next-token distribution.

"Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit Integer Quantization" (PEQA; Kim et
al., 2023): once the weights are integer codes, only the per-group scales are trained, through the whole model, so
the result is the same integer-grid format with new scales (no adapter, no extra bytes). The objective here is not
the paper's task loss but distillation from the float model on the calibration text (KL of the float model's top-k
next-token distribution against the compressed model's, :mod:`compress.teacher`), as in the end-to-end stage of
"EfficientQAT" (Chen et al., 2024), which trains the same parameters. With ``zeros``, the zero points of
asymmetric grids train too, by straight-through rounding (they stay integers the format stores exactly).

Unlike ``tune`` (block by block, against each block's float output), the loss here sees every layer's error at
once as it reaches the logits, the output head's and the token embedding's tables included when they are integer
grids (a tied table trains once). The last ``held_out`` share of the calibration sequences is never trained on: the
tuned scales, rounded to float16 as stored, are kept only when they lower the KL there, and the epoch with the
lowest held-out KL is the one kept. The whole model runs forward and backward, so its activations for one
calibration sequence must fit in memory beside it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..blocks import input_device, on_compute
from ..families import norm_modules
from ..modules import dequantized_weights
from ..precision import Bfloat16Setting, bfloat16_autocast, uses_bfloat16
from ..teacher import Teacher, topk_kl
from .base import Pass, PassConfig, Requirements
from .registry import register
from .trainable_grid import TrainableWeight, refuse_k_quants_before, trainable_grids


class PeqaConfig(PassConfig):
    type: Literal["peqa"] = "peqa"
    epochs: int = Field(2, ge=1, le=50, description="passes over the training share of the calibration")
    lr: float = Field(1e-3, gt=0, le=0.1, description="Adam step size of the log-scales")
    zeros: bool = Field(False, description="also train the zero points of asymmetric grids (straight-through)")
    zero_lr: float = Field(0.02, gt=0, le=1, description="Adam step size of the zero points, in grid steps")
    batch: int = Field(4, ge=1, le=1024, description="calibration sequences per optimizer step")
    held_out: int = Field(8, ge=1, le=10_000, description="calibration sequences kept out of training, to judge")
    samples: int | None = Field(64, ge=1, description="calibration sequences trained on (the first ones); "
                                "null: all but the held-out ones")
    codebook_lr: float = Field(1e-3, gt=0, le=0.1, description="Adam step size of vector code book entries "
                               "(gptvq layers: their row scales train as the grids' scales do)")
    top_k: int = Field(64, ge=1, le=4096, description="the float model's most likely tokens kept per position")
    norms: bool = Field(False, description="also train every norm's gain, as its value times exp(t) per channel (float "
                        "parameters the checkpoint stores anyway: no extra bytes)")
    norm_lr: float = Field(1e-3, gt=0, le=0.1, description="Adam step size of the norm gains' log-factors")
    bfloat16: Bfloat16Setting = Field("auto", description="the training steps' forward and backward under bfloat16 "
                                      "autocast: true, false, or auto (where the device multiplies bfloat16 "
                                      "natively); the held-out KL that decides what is kept is measured in float32 "
                                      "either way")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the step sizes over the run: constant, or cosine (falling from each group's step "
        "size to zero at the last step, as in SGDR without restarts)")


@register
class Peqa(Pass):
    name = "peqa"
    stage = "quantize"
    Config = PeqaConfig

    def requirements(self) -> Requirements:
        return Requirements(teacher_top_k=self.cfg.top_k, min_samples=self.cfg.held_out + 1)

    def check_plan(self, passes):
        self.check_follows_a_quantizer(passes, f"put `type: {self.name}` after the rtn, gptq, gptvq or embeddings "
                                       "pass whose values it tunes")
        refuse_k_quants_before(self, passes)

    def apply(self, work, replace) -> None:
        """Nothing block by block: the tuning runs through the whole model once every block is compressed."""

    def adapter_rank(self) -> int:
        """The rank of the low-rank adapter merged into each integer grid's codes (0: scales only)."""
        return 0

    def adapter_lr(self) -> float:
        return 0.0

    def tune_model(self, model, teacher: Teacher | None, device) -> dict | None:
        cfg = self.cfg
        grids = trainable_grids({n: m for n, m in model.named_modules() if cfg.applies_to(n)}, device, cfg.zeros,
                                self.adapter_rank())
        if teacher is None or not grids:
            return None
        train, held = _split(len(teacher.tokens), cfg.held_out, cfg.samples)
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            # with norms, the gains it trains stay (cast back to the model's dtype) when the context ends
            with on_compute(model, device, keep_changes=cfg.norms):
                gains = [TrainableGain(m) for m in norm_modules(model)] if cfg.norms else []
                return self._train(model, grids, gains, teacher, train, held, device)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _train(self, model, grids: dict[str, TrainableWeight], gains: list[TrainableGain], teacher, train, held,
               device) -> dict:
        cfg = self.cfg
        before = _held_out_kl(model, teacher, held, device)
        groups = [{"params": [g.log_factor for g in grids.values()], "lr": cfg.lr}]
        if gains:
            groups.append({"params": [g.log_factor for g in gains], "lr": cfg.norm_lr})
        if zeros := [g.zero_shift for g in grids.values() if g.zero_shift is not None]:
            groups.append({"params": zeros, "lr": cfg.zero_lr})
        if books := [p for g in grids.values() for p in g.value_parameters()]:
            groups.append({"params": books, "lr": cfg.codebook_lr})
        if adapters := [p for g in grids.values() for p in g.adapter_parameters()]:
            groups.append({"params": adapters, "lr": self.adapter_lr()})
        optimizer = torch.optim.Adam(groups)
        steps = cfg.epochs * math.ceil(len(train) / cfg.batch)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _step_size_factor(cfg.schedule, steps))
        order = torch.Generator().manual_seed(0)
        best, best_kl, per_epoch = None, before, list[float]()
        for _ in range(cfg.epochs):
            self.before_epoch(model, grids, teacher, train, held, device, per_epoch[-1] if per_epoch else before)
            rows = train[torch.randperm(len(train), generator=order)]
            for step in rows.split(cfg.batch):
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    for g in grids.values():  # decoded once a step; each sequence's backward runs through it
                        g.install()
                    for gain in gains:
                        gain.install()
                    rows_of_step = step.tolist()
                    for n, i in enumerate(rows_of_step, 1):
                        with bfloat16_autocast(cfg.bfloat16, device):
                            loss = sequence_kl(model, teacher, [i], device) / len(step)
                        loss.backward(retain_graph=n < len(rows_of_step))
                optimizer.step()
                schedule.step()
            results = {name: g.result() for name, g in grids.items()}
            values = [gain.result() for gain in gains]
            for gain, value in zip(gains, values, strict=True):
                gain.put(value)
            kl = held_out_kl_with(model, grids, results, teacher, held, device)
            per_epoch.append(kl)
            if kl < best_kl:
                best, best_kl = (results, values), kl
        for name, g in grids.items():
            g.put(best[0][name] if best is not None else g.fmt)
        for i, gain in enumerate(gains):
            gain.put(best[1][i] if best is not None else gain.base)
        return {"held_out_kl_before": before, "held_out_kl_after": best_kl, "held_out_kl_per_epoch": per_epoch,
                "kept": best is not None, "tables": len(grids), "norms": len(gains), "held_out_sequences": len(held),
                "steps": steps, "bfloat16": uses_bfloat16(cfg.bfloat16, device), **self.epoch_report()}

    def before_epoch(self, model, grids, teacher, train, held, device, kl: float) -> None:
        """A step before each epoch's continuous ones (none here), from a state whose held-out KL is ``kl``."""

    def epoch_report(self) -> dict:
        return {}


class TrainableGain:
    """A norm's gain vector trained as ``base * exp(t)`` per channel: each channel keeps its sign, and the step size
    is relative, as the scales' (gains range over two orders of magnitude within one model)."""

    def __init__(self, norm: nn.Module):
        self.norm, self.param = norm, norm.get_parameter("weight")
        self.base = self.param.detach().clone()
        self.log_factor = nn.Parameter(torch.zeros_like(self.base, dtype=torch.float32))

    def install(self) -> None:
        """The norm's forward reads ``base * exp(t)`` (a tensor of the graph) for the next step."""
        # a plain tensor where the parameter was (nn.Module's setattr takes parameters only); put() restores it
        self.norm._parameters["weight"] = (self.base * self.log_factor.exp()).to(self.base.dtype)  # type: ignore[assignment]

    def result(self) -> torch.Tensor:
        return (self.base * self.log_factor.detach().exp()).to(self.base.dtype)

    def put(self, value: torch.Tensor) -> None:
        """The norm's own parameter back in place, holding ``value``."""
        with torch.no_grad():
            self.param.copy_(value)
        self.norm._parameters["weight"] = self.param


def _step_size_factor(schedule: str, steps: int):
    """The factor of each group's step size after ``step`` optimizer steps: 1 (constant), or a cosine from 1 down to
    0 at ``steps`` (Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", 2017, one cycle)."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _split(n: int, held_out: int, samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out sequence indices: the last ``held_out`` are held out, the first ``samples`` of the
    others (all of them when None) train."""
    return torch.arange(min(n - held_out, samples or n)), torch.arange(n - held_out, n)


def sequence_kl(model, teacher: Teacher, rows: list[int], device) -> torch.Tensor:
    part = teacher.rows(rows)
    logits = model(input_ids=part.tokens.to(input_device(model)), use_cache=False).logits
    return topk_kl(logits, part.indices.to(logits.device), part.logprobs.to(logits.device))


@torch.no_grad()
def _held_out_kl(model, teacher: Teacher, held: torch.Tensor, device) -> float:
    """The mean top-k KL over the held-out sequences, of the model as its formats store it."""
    with dequantized_weights(model):
        return sum(float(sequence_kl(model, teacher, [i], device)) for i in held.tolist()) / len(held)


def held_out_kl_with(model, grids: dict[str, TrainableWeight], results: dict, teacher, held, device) -> float:
    """:func:`_held_out_kl` with ``results`` (name -> format) in place of the grids' formats, put back after."""
    for name, g in grids.items():
        g.put(results[name])
    try:
        return _held_out_kl(model, teacher, held, device)
    finally:
        for g in grids.values():
            g.put(g.fmt)


class L4qConfig(PeqaConfig):
    type: Literal["l4q"] = "l4q"  # type: ignore[assignment]
    rank: int = Field(8, ge=1, le=256, description="rank of each layer's adapter")
    adapter_lr: float = Field(1e-3, gt=0, le=0.1, description="Adam step size of the adapters")


@register
class L4q(Peqa):
    """End-to-end quantization-aware tuning with low-rank adapters merged into the codes.

    "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models" (Jeon et al., 2024): each
    integer-grid layer computes with ``quantize(W + B A)`` (its stored weight plus a rank-``rank`` adapter, put back
    on the grid with trainable scales and zero points, straight-through rounding), so the adapter is trained for the
    grid it ends on and merges into the codes exactly; the scales train as in :class:`Peqa`, whose teacher, loop and
    held-out rule this pass shares. Layers on other grids (NF4, FP4) train their scales only.
    """

    name = "l4q"
    Config = L4qConfig

    def adapter_rank(self) -> int:
        return self.cfg.rank

    def adapter_lr(self) -> float:
        return self.cfg.adapter_lr
