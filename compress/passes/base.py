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
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import PlanError
from ..formats import WeightFormat
from ..formats.base import NotAnIntegerGrid
from ..modules import CompressedLinear, linear_weight
from ..quant import QuantSpec
from ..teacher import Teacher

STAGES = ("transform", "prune", "cluster", "quantize")  # the order passes must come in
# a "transform" keeps the float model's function (AWQ's scales, a rotation, which also turns the residual stream
# it reads and writes): the float stream passes a block once its transforms are in place


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="name of the pass (see `compress passes`)")
    targets: list[str] = Field(default=["*"], description="globs of linear layer names to compress")
    exclude: list[str] = Field(default=[], description="globs of layer names to leave alone")
    overrides: dict[str, dict[str, Any]] = Field(
        default={}, description="glob -> options replacing this pass's options for matching layers")

    # old option name -> its new name: the old spelling is still read (recipe.py notes it as deprecated)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _read_renamed_options(cls, data):
        if not isinstance(data, dict):
            return data
        for old, new in cls.renamed.items():
            if old in data:
                if new in data:
                    raise ValueError(f"'{old}' is the old name of '{new}': give '{new}' only")
                data = {(new if k == old else k): v for k, v in data.items()}
        return data

    def applies_to(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.targets) and not any(
            fnmatchcase(name, p) for p in self.exclude)

    def for_layer(self, name: str) -> PassConfig:
        for pattern, values in self.overrides.items():
            if fnmatchcase(name, pattern):
                return self.with_options(values)
        return self

    def with_options(self, values: dict[str, Any]) -> PassConfig:
        """This config with ``values`` replacing its options (old option names read as their new ones)."""
        values = {self.renamed.get(k, k): v for k, v in values.items()}
        return self.model_validate({**self.model_dump(), **values, "overrides": {}})


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's inputs over ``tokens`` tokens.

    While collected they are float64 sums (so a sum over several workers' shares rounds to the same float32
    values as one worker's sum in another order); :meth:`settle` then makes the matrices float32 means (the
    form every pass uses, held once: ``mean_hessian`` hands out the tensor itself, not a copy)."""

    tokens: int = 0
    hessian: torch.Tensor | None = None  # x x^T over tokens  [in, in] (a sum while collecting, then the mean)
    sq_sum: torch.Tensor | None = None   # sum of x^2 per input channel [in]
    x_sum: torch.Tensor | None = None    # sum of x per input channel [in]
    cross: torch.Tensor | None = None    # x_float x^T: float model's input vs this one's [in, in] (sum, then mean)

    def settle(self) -> None:
        """The collected float64 sums -> float32: the matrices as means over the tokens, the vectors as sums."""
        n = max(self.tokens, 1)
        if self.hessian is not None:
            self.hessian = self.hessian.div_(n).float()
        if self.cross is not None:
            self.cross = self.cross.div_(n).float()
        if self.sq_sum is not None:
            self.sq_sum = self.sq_sum.float()
        if self.x_sum is not None:
            self.x_sum = self.x_sum.float()

    def mean_hessian(self) -> torch.Tensor:
        """The mean of x x^T (this object's tensor: callers must not change it in place)."""
        assert self.hessian is not None, "the pass did not declare 'hessian' in its requirements"
        return self.hessian

    def mean_cross(self) -> torch.Tensor | None:
        return self.cross

    def input_norm(self) -> torch.Tensor:
        """L2 norm of each input channel over the calibration tokens (Wanda's ||X_j||)."""
        sq = self.sq_sum if self.sq_sum is not None else torch.diagonal(self.mean_hessian()) * max(self.tokens, 1)
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
    fused: Pass | None = None                  # the following pass this one was fused with by the planner
    finished: set[str] = field(default_factory=set)  # layers whose result includes the fused pass's work


def current_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight a layer computes with now, whatever its format."""
    if isinstance(module, CompressedLinear):
        return module.fmt.dequantize()
    return linear_weight(module).detach().float().cpu()


def input_width(module: nn.Module) -> int:
    """The number of inputs of a linear layer, whatever its format."""
    width = getattr(module, "in_features", None)
    return int(width) if width is not None else linear_weight(module).shape[1]


def current_mask(module: nn.Module) -> torch.Tensor | None:
    return module.fmt.mask if isinstance(module, CompressedLinear) else None


@dataclass(frozen=True)
class ModelPlan:
    """A model-wide look before the first block: a float sweep over ``samples`` calibration sequences that
    collects ``stats`` of every targeted layer (and the Fisher of their outputs when ``fisher``), for
    :meth:`Pass.score_layer` and :meth:`Pass.plan_model`."""

    stats: frozenset[str] = frozenset({"hessian"})
    fisher: bool = False
    samples: int = 16


@dataclass(frozen=True)
class Requirements:
    """What a pass needs from the pipeline, declared in one object (see :meth:`Pass.requirements`).

    ``stats``: statistics of the targeted layers' inputs, a subset of {"hessian", "sq_sum", "x_sum",
    "cross"} ("cross": against the float model's inputs of the same layers); ``block_io``: the block's
    calibration inputs (``BlockWork.inputs``); ``float_outputs``: the float model's outputs of the block
    (``BlockWork.float_outputs``); ``preserves_stats``: the block's statistics stay valid after this pass
    (the next pass reuses them); ``model_plan``: a model-wide look before the first block, or None;
    ``layer_parallel``: each layer's result depends only on that layer and its statistics (layers sharing an
    input may be solved together), so workers of a distributed run can solve different layers; ``head_inputs``:
    the statistics ("hessian") of the output head's inputs (the last compressed block's outputs through the final
    norm) over the calibration, handed to :meth:`Pass.compress_ends`; ``teacher_top_k``: when above 0, the float
    model's next-token distribution over the calibration (each position's ``teacher_top_k`` most likely tokens,
    :class:`~compress.teacher.Teacher`), handed to :meth:`Pass.tune_model`; ``min_samples``: the calibration
    sequences the pass needs at least (checked before any compute)."""

    stats: frozenset[str] = frozenset()
    block_io: bool = False
    float_outputs: bool = False
    preserves_stats: bool = False
    model_plan: ModelPlan | None = None
    layer_parallel: bool = False
    head_inputs: bool = False
    teacher_top_k: int = 0
    min_samples: int = 1

    @property
    def calibration(self) -> bool:
        """Whether the pass reads calibration data at all."""
        return bool(self.stats or self.block_io or self.model_plan or self.head_inputs or self.teacher_top_k)


class Pass:
    """A compression pass. Subclasses set ``name``, ``stage``, ``Config`` and a docstring naming
    their paper, declare what they need in :meth:`requirements`, and implement :meth:`compress_layer`
    (or :meth:`apply` for whole-block work). A pass never changes another pass: what two passes do
    together is decided by the planner (:meth:`fuses_with`)."""

    name: ClassVar[str]
    stage: ClassVar[str]
    Config: ClassVar[type[PassConfig]]

    def __init__(self, cfg: PassConfig):
        self.cfg: Any = cfg  # an instance of this pass's own Config (its options are the subclass's fields)

    def requirements(self) -> Requirements:
        """What this pass needs from the pipeline (none by default: a data-free pass)."""
        return Requirements()

    def check_plan(self, passes: list[Pass]) -> None:
        """Raise PlanError when this pass cannot run in this plan (called before any compute)."""

    def check_follows_a_quantizer(self, passes: list[Pass], hint: str) -> None:
        """For a pass that tunes what a quantizing (or vector-quantizing) pass wrote: raise PlanError unless one
        comes before it."""
        if not any((p.writes_block_codes() or p.ends_written()) and p is not self for p in passes[:passes.index(self)]):
            raise PlanError(f"the {self.name} pass has no quantizing pass before it", hint)

    def check_model(self, model) -> None:
        """Raise PlanError when this pass cannot run on ``model`` (called once it is loaded, before any compute)."""

    def written_grids(self) -> list[QuantSpec]:
        """Every integer grid this pass may store a layer's codes on (its own, its overrides', its candidates');
        raises NotAnIntegerGrid when it stores something else (a code book, unstructured sparsity): what a
        serving export checks before any compute. A pass that stores no codes (a transform) returns []."""
        return []

    def writes_block_codes(self) -> bool:
        """Whether this pass stores new codes on the blocks' layers (a quantizer or a clusterer; not a pass that
        tunes stored values, nor one that compresses only the tables outside the blocks)."""
        if self.stage not in ("cluster", "quantize"):
            return False
        try:
            grids = self.written_grids()
        except NotAnIntegerGrid:
            return True
        return bool(grids) and not self.ends_written()

    def ends_written(self) -> list[str]:
        """Which of the tables outside the blocks ("embedding", "head") this pass compresses (see
        :meth:`compress_ends`): what an export that cannot hold them checks before any compute."""
        return []

    def runtime_transforms(self) -> list[str]:
        """The layers (suffixes within a block) whose input this pass transforms at run time (a rotation the
        weights alone cannot carry): what an export whose reader cannot apply it checks before any compute."""
        return []

    def fuses_with(self, following: Pass) -> bool:
        """Whether this pass can also do ``following``'s work (the pass right after it) on the layers it
        compresses. The planner asks once, before any compute; when fused, :meth:`apply` receives
        ``work.fused`` and lists in ``work.finished`` the layers whose result already includes
        ``following``'s, and the pipeline does not hand those layers to ``following``."""
        return False

    def score_layer(self, name: str, module: nn.Module, stats: LayerStats, fisher: torch.Tensor | None):
        """With a model plan: this layer's entry of it (a value of this pass's own type)."""
        raise NotImplementedError

    def plan_model(self, scores: dict[str, Any]) -> dict:
        """With a model plan: decide per-layer settings from every targeted layer's score (layer name ->
        :meth:`score_layer`'s value); returns what the report shows of the decision."""
        raise NotImplementedError

    def prepare(self, model) -> None:
        """Look at the whole model once before the first block and before any calibration forward (e.g. to turn a
        model-wide target into per-block settings, or rotate the embeddings)."""

    def finalize(self, model) -> dict | None:
        """Model-wide changes after the last block (e.g. dropping layers, updating the config);
        returns what the report shows, with ``kept_blocks`` {old: new index} when blocks moved."""
        return None

    def compress_ends(self, model, head_stats: LayerStats | None) -> dict[str, dict]:
        """After the last block: compress what lies outside the blocks (the token embedding, the output head),
        replacing modules through ``model.set_input_embeddings`` / ``set_output_embeddings``; ``head_stats`` when
        :class:`Requirements` asked for ``head_inputs``. Returns what the report shows per module compressed (a
        tied pair under one name)."""
        return {}

    def tune_model(self, model, teacher: Teacher | None, device) -> dict | None:
        """After every other change (the blocks, the tables outside them, :meth:`finalize`): train what this pass
        tunes through the whole model against ``teacher`` (when :class:`Requirements` asked for
        ``teacher_top_k``); returns what the report shows."""
        return None

    def block_state(self, index: int) -> dict:
        """What this pass keeps from block ``index`` for later blocks or :meth:`finalize` (plain JSON values): a
        resumed run hands it back through :meth:`restore_block_state` instead of running the block again."""
        return {}

    def restore_block_state(self, index: int, state: dict) -> None:
        """Take back what :meth:`block_state` gave for a block a resumed run does not run again."""

    def apply(self, work: BlockWork, replace) -> None:
        """Compress the block's layers; ``replace(name, new_module)`` swaps a layer in."""
        for name, module in work.layers.items():
            cfg = self.cfg.for_layer(name)
            fmt, note = self.compress_layer(name, module, work.stats.get(name), cfg)
            replace(name, CompressedLinear.from_module(module, fmt))
            work.notes[name] = note

    def compress_layer(self, name, module, stats: LayerStats | None, cfg) -> tuple[WeightFormat, dict]:
        raise NotImplementedError

