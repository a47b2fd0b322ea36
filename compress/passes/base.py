"""What every pass shares: a pydantic config with layer targeting, and the per-layer loop.

Targeting follows coremltools.optimize: a pass applies to the linear layers whose full module
name matches one of ``targets`` (fnmatch globs) and none of ``exclude``; ``overrides`` maps a
glob to option values that replace the pass's own for the layers it matches (first match wins),
so one pass can say "4 bits everywhere, 8 bits for the down projections".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..formats import WeightFormat
from ..modules import CompressedLinear

STAGES = ("transform", "prune", "cluster", "quantize")  # the order passes must come in


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="name of the pass (see `compress passes`)")
    targets: list[str] = Field(default=["*"], description="globs of linear layer names to compress")
    exclude: list[str] = Field(default=[], description="globs of layer names to leave alone")
    overrides: dict[str, dict[str, Any]] = Field(
        default={}, description="glob -> options replacing this pass's options for matching layers")

    def applies_to(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.targets) and not any(
            fnmatchcase(name, p) for p in self.exclude)

    def for_layer(self, name: str) -> PassConfig:
        for pattern, values in self.overrides.items():
            if fnmatchcase(name, pattern):
                return self.model_validate({**self.model_dump(), **values, "overrides": {}})
        return self


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's inputs, accumulated over tokens."""

    tokens: int = 0
    hessian: torch.Tensor | None = None  # sum of x x^T over tokens  [in, in]
    sq_sum: torch.Tensor | None = None   # sum of x^2 per input channel [in]
    x_sum: torch.Tensor | None = None    # sum of x per input channel [in]
    cross: torch.Tensor | None = None    # sum of x_float x^T: float model's input vs this one's [in, in]

    def mean_hessian(self) -> torch.Tensor:
        return self.hessian / max(self.tokens, 1)

    def mean_cross(self) -> torch.Tensor | None:
        return None if self.cross is None else self.cross / max(self.tokens, 1)

    def input_norm(self) -> torch.Tensor:
        """L2 norm of each input channel over the calibration tokens (Wanda's ||X_j||)."""
        sq = self.sq_sum if self.sq_sum is not None else torch.diagonal(self.hessian)
        return sq.clamp_min(0).sqrt()


@dataclass
class BlockWork:
    """What a pass sees of one decoder block: its targeted layers and their statistics."""

    index: int
    block: nn.Module
    prefix: str                                # full name of the block, e.g. "model.layers.3"
    model_type: str                            # config.model_type, for family adapters
    layers: dict[str, nn.Module]               # full name -> Linear / CompressedLinear
    stats: dict[str, LayerStats] = field(default_factory=dict)
    inputs: list | None = None                 # [(hidden_states, kwargs)] the block reads
    float_outputs: list | None = None          # the float model's outputs of this block, batch by batch
    device: torch.device | str = "cpu"
    notes: dict[str, dict] = field(default_factory=dict)  # per layer, what the pass reports


def current_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight a layer computes with now, whatever its format."""
    if isinstance(module, CompressedLinear):
        return module.fmt.dequantize()
    return module.weight.detach().float().cpu()


def current_mask(module: nn.Module) -> torch.Tensor | None:
    return module.fmt.mask if isinstance(module, CompressedLinear) else None


class Pass:
    """A compression pass. Subclasses set ``name``, ``stage``, ``Config`` and a docstring naming
    their paper, and implement :meth:`compress_layer` (or :meth:`apply` for whole-block work)."""

    name: ClassVar[str]
    stage: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    needs: ClassVar[frozenset[str]] = frozenset()  # subset of {"hessian", "sq_sum", "x_sum", "cross"}
    needs_global_plan: bool = False  # wants a model-wide look before compressing (see pipeline)
    plan_needs: ClassVar[frozenset[str]] = frozenset({"hessian"})  # statistics of that look
    plan_uses_fisher: ClassVar[bool] = False
    plan_samples: int = 16  # calibration sequences of that look
    preserves_stats: ClassVar[bool] = False  # the block's statistics stay valid after this pass
    needs_block_io: ClassVar[bool] = False  # wants the block's calibration inputs (BlockWork.inputs)
    needs_float_outputs: ClassVar[bool] = False  # wants the float model's block outputs (BlockWork.float_outputs)

    def __init__(self, cfg: PassConfig):
        self.cfg = cfg

    def check_plan(self, passes: list[Pass]) -> None:
        """Raise PlanError when this pass cannot run in this plan (called before any compute)."""

    def prepare(self, model) -> None:
        """Look at the whole model once before the first block (e.g. to turn a model-wide target
        into per-block settings)."""

    def finalize(self, model) -> dict | None:
        """Model-wide changes after the last block (e.g. dropping layers, updating the config);
        returns what the report shows, with ``kept_blocks`` {old: new index} when blocks moved."""
        return None

    def apply(self, work: BlockWork, replace) -> None:
        """Compress the block's layers; ``replace(name, new_module)`` swaps a layer in."""
        for name, module in work.layers.items():
            cfg = self.cfg.for_layer(name)
            fmt, note = self.compress_layer(name, module, work.stats.get(name), cfg)
            replace(name, CompressedLinear.from_module(module, fmt))
            work.notes[name] = note

    def compress_layer(self, name, module, stats: LayerStats | None, cfg) -> tuple[WeightFormat, dict]:
        raise NotImplementedError

