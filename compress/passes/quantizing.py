"""Options and behaviour every weight-quantizing pass shares (RTN, GPTQ): the grid, and mixed
precision under a bits-per-weight target (see ``mixed``)."""

from typing import Literal

from pydantic import Field, model_validator

from ..errors import PlanError
from ..formats import SparseWeight
from ..formats.base import NotAnIntegerGrid
from ..kquants import KTYPES, ktype
from ..quant import CODEBOOKS, QuantSpec
from .base import ModelPlan, Pass, PassConfig, Requirements, current_weight
from .mixed import DEFAULT_CANDIDATES, Candidate, LayerOptions, allocate, score_layer


class QuantOptions(PassConfig):
    bits: int = Field(4, ge=2, le=8, description="bits per weight code (2-8)")
    group_size: int | None = Field(
        128, ge=1, description="inputs sharing one scale; null = one scale per output row")
    symmetric: bool = Field(False, description="symmetric grid (no stored zero point)")
    grid: Literal["int", "nf", "fp4", "gguf-q2_k", "gguf-q3_k", "gguf-q4_k", "gguf-q5_k", "gguf-q6_k"] = Field(
        "int", description="int: uniform; nf: NormalFloat (QLoRA); fp4: E2M1 (4 bits only); gguf-q2_k ... "
        "gguf-q6_k: llama.cpp's k-quant super-blocks (bits, group size and symmetry are the type's; a layer whose "
        "inputs are no multiple of 256 gets the 32-group grid llama.cpp falls back to)")
    clip_search: bool = Field(False, description="search a clipping range minimising the error")
    target_bits_per_weight: float | None = Field(
        None, gt=0, le=16, description="mixed precision: choose bits and group size per layer so the "
        "compressed layers store at most this many bits per weight (bits/group_size are then ignored)")
    candidates: list[Candidate] | None = Field(
        None, description="formats mixed precision chooses from; default: the standard formats of at "
        "least floor(target) bits (the second-order estimate is unreliable for much coarser ones)")
    sensitivity_samples: int = Field(16, ge=1, description="calibration sequences used to rank layers")

    @model_validator(mode="before")
    @classmethod
    def _k_quant_shape(cls, data):
        """A k-quant fixes bits, group size and symmetry: they are filled in, and refused when set otherwise."""
        kt = KTYPES.get(data.get("grid")) if isinstance(data, dict) else None
        if kt is None:
            return data
        implied = {"bits": kt.bits, "group_size": kt.sub_block, "symmetric": kt.symmetric}
        for key, value in implied.items():
            if data.get(key, value) != value:
                raise ValueError(f"grid '{data['grid']}' ({kt.name}) has {key} {value}, not {data[key]}: drop {key}")
        return {**data, **implied}

    @model_validator(mode="after")
    def _check(self):
        if self.grid == "fp4" and self.bits != 4:
            raise ValueError("grid 'fp4' (E2M1) needs bits: 4")
        if self.grid in CODEBOOKS and self.bits > 4:
            raise ValueError(f"grid '{self.grid}' supports 2-4 bits; use grid: int for more")
        if self.target_bits_per_weight is not None:
            if self.grid != "int":
                raise ValueError("target_bits_per_weight works with grid: int")
            floor = min(self._approx_bpw(c) for c in self.mixed_candidates())
            if self.target_bits_per_weight < floor:
                raise ValueError(f"target_bits_per_weight {self.target_bits_per_weight} is below the smallest "
                                 f"candidate format ({floor:.3f} bits/weight)")
        return self

    def with_options(self, values):
        """As for every pass; an override changing the grid to or from a k-quant does not inherit the bits, group
        size and symmetry the other grid implied."""
        values = {self.renamed.get(k, k): v for k, v in values.items()}
        grid = values.get("grid", self.grid)
        base = self.model_dump()
        if grid != self.grid and (ktype(grid) is not None or ktype(self.grid) is not None):
            base = {k: v for k, v in base.items() if k not in ("bits", "group_size", "symmetric")}
        return self.model_validate({**base, **values, "overrides": {}})

    def mixed_candidates(self) -> list[Candidate]:
        if self.candidates is not None:
            return self.candidates
        target = self.target_bits_per_weight
        assert target is not None, "candidates are chosen for a bits-per-weight target"
        least = max(2, min(int(target), 4))
        if min(self._approx_bpw(c) for c in DEFAULT_CANDIDATES if c.bits == least) > target:
            least = max(2, least - 1)  # nothing of floor(target) bits fits: allow one bit less
        return [c for c in DEFAULT_CANDIDATES if c.bits >= least]

    def _approx_bpw(self, c: Candidate) -> float:
        g = c.group_size or 4096
        return c.bits + 16 / g + (0 if self.symmetric else c.bits / g)

    def spec(self, bits=None, group_size=-1) -> QuantSpec:
        symmetric = self.symmetric or self.grid in CODEBOOKS
        gs = self.group_size if group_size == -1 else group_size
        return QuantSpec(bits or self.bits, gs, symmetric, self.grid, self.clip_search)


class QuantizingPass(Pass):
    stage = "quantize"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.plan: dict[str, QuantSpec] = {}

    def mixed_precision_plan(self) -> ModelPlan | None:
        """With ``target_bits_per_weight``: Hessians and output Fisher of every layer, to rank them."""
        if self.cfg.target_bits_per_weight is None:
            return None
        return ModelPlan(stats=frozenset({"hessian"}), fisher=True, samples=self.cfg.sensitivity_samples)

    def requirements(self):
        return Requirements(model_plan=self.mixed_precision_plan(), layer_parallel=True)

    def configs(self) -> list:
        """The pass's options and each override's: every setting a layer may get."""
        return [self.cfg, *(self.cfg.with_options(v) for v in self.cfg.overrides.values())]

    def written_grids(self):
        specs = []
        for cfg in self.configs():
            if cfg.grid in CODEBOOKS:
                raise NotAnIntegerGrid(f"{self.name} stores codes of the {cfg.grid} code book")
            if cfg.target_bits_per_weight is not None:
                specs += [cfg.spec(c.bits, c.group_size) for c in cfg.mixed_candidates()]
            else:
                specs.append(cfg.spec())
        return specs

    def candidate_specs(self) -> list[QuantSpec]:
        return [self.cfg.spec(c.bits, c.group_size) for c in self.cfg.mixed_candidates()]

    def score_layer(self, name, module, stats, fisher) -> LayerOptions:
        h = stats.mean_hessian().cpu()
        return score_layer(name, current_weight(module), h, self.candidate_specs(), fisher)

    def plan_model(self, scores: dict[str, LayerOptions]) -> dict[str, dict]:
        scored = list(scores.values())
        choice = allocate(scored, self.cfg.target_bits_per_weight)
        self.plan = {x.name: x.specs[choice[x.name]] for x in scored}
        return {name: {"bits": s.bits, "group_size": s.group_size} for name, s in self.plan.items()}

    @staticmethod
    def keep_sparsity(module, values):
        """A pruned layer stays pruned: wrap the quantized kept values in the layer's mask."""
        fmt = getattr(module, "fmt", None)
        if isinstance(fmt, SparseWeight):
            return SparseWeight(fmt.mask, values, fmt.pattern)
        return values

    def layer_spec(self, name: str, cfg, in_features: int) -> QuantSpec:
        """The spec of one layer: the mixed-precision choice when planned, else the options. A k-quant grid on a
        layer whose inputs are no multiple of 256 becomes the grid llama.cpp falls back to for that type."""
        return (self.plan.get(name) or cfg.spec()).for_width(in_features)

    def check_k_quants_unpruned(self, passes) -> None:
        """k-quant super-blocks hold every weight of a row: refused after a pruning pass (before any compute)."""
        pruned = any(p.stage == "prune" for p in passes[:passes.index(self)])
        if pruned and any(ktype(cfg.grid) for cfg in self.configs()):
            raise PlanError(f"the {self.name} pass writes llama.cpp k-quant super-blocks, which hold every weight, "
                            "after a pruning pass", "drop the pruning pass or use grid: int")

    def check_plan(self, passes):
        self.check_k_quants_unpruned(passes)
