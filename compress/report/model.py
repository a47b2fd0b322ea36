"""The typed report of a run: what ``report.json`` holds (schema version ``REPORT_SCHEMA_VERSION``), read and
written only through these models, so the runner, budgets, JUnit, the CLI summary, Markdown, HTML and compare
agree on one schema. ``Report.to_json()`` writes it; ``Report.load(path)`` reads and validates it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import OutputError

REPORT_SCHEMA_VERSION = 1


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quality(_Part):
    """Held-out quality of one model (base or compressed)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    latency_ms: float | None = None             # decode ms/token, when measured
    tasks: dict[str, float] | None = None       # lm-eval task accuracies, when asked

    def to_dict(self) -> dict:
        """What was measured (fields never set, such as an unmeasured latency, left out)."""
        return self.model_dump(mode="json", exclude_unset=True)


class ModelInfo(_Part):
    spec: str
    source: str
    path: str | None
    family: str
    blocks: int
    parameters: int
    parameters_after: int


class Size(_Part):
    base_fp16_bytes: int
    checkpoint_bytes: int
    model_bits_per_weight: float
    compressed_layers_bytes: int
    compressed_layers_params: int
    compressed_layers_bits_per_weight: float
    compression_ratio_vs_fp16: float
    checkpoint_file_bytes: int | None = None    # files on disk, when a checkpoint was written
    onnx_file_bytes: int | None = None


class PassTime(_Part):
    index: int
    type: str
    seconds: float


class Layer(BaseModel):
    """One linear layer: its format and exact bytes, plus what the passes noted (``awq_alpha``,
    ``output_error``, ``sparsity``, ... : extra fields, pass by pass)."""

    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    passes: list[str]
    format: str
    bytes: int
    bits_per_weight: float

    def note(self, key: str):
        """A field, or a pass's note on this layer; None when absent."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key)


class Timing(_Part):
    load_seconds: float
    compress_seconds: float
    evaluate_seconds: float
    calibration_capture_seconds: float
    total_seconds: float = 0.0


class BudgetCheck(_Part):
    name: str
    limit: float
    actual: float | None
    passed: bool
    kind: str  # "max" | "min"


class OnnxValidation(BaseModel):
    model_config = ConfigDict(extra="allow")

    windows: int
    seq_len: int
    decode_steps: int
    max_logit_diff: float
    decode_max_logit_diff: float
    top1_agreement: float
    perplexity_onnx: float
    perplexity_torch: float
    tolerance: dict[str, float]
    passed: bool


class OnnxReport(_Part):
    size: dict[str, int]                        # graph, data, file, genai_graph and linear_weight _bytes
    lowerings: dict[str, int]                   # how many layers got each lowering
    opset: int
    weights: str
    timing: dict[str, float]
    validation: OnnxValidation | None = None


class Report(_Part):
    schema_version: int = REPORT_SCHEMA_VERSION
    compress_version: str
    recipe: dict[str, Any]                      # the fully resolved recipe (Recipe.to_dict)
    recipe_hash: str
    model: ModelInfo
    device: str
    base: Quality
    compressed: Quality
    size: Size
    passes: list[PassTime]
    layers: list[Layer]
    allocation: dict[str, Any]
    timing: Timing
    peak_memory_mb: float
    versions: dict[str, str]
    budgets: list[BudgetCheck] = []
    budgets_passed: bool = True
    onnx: OnnxReport | None = None
    served: dict[str, dict[str, Any]] = {}      # serving exports (compressed-tensors, ...): their export.json
    workers: int = 1                            # torch.distributed workers of the run
    communication_bytes: dict[str, int] = {}    # what worker 0 sent, per collective kind (statistics, layers, ...)

    @property
    def name(self) -> str:
        return self.recipe["name"]

    def pass_options(self, index: int) -> dict[str, Any]:
        """The options of pass ``index`` as the recipe resolved them (``type`` left out)."""
        return {k: v for k, v in self.recipe["passes"][index].items() if k != "type"}

    def to_json(self) -> str:
        # fields a run did not measure (latency, tasks, ONNX file size) are left out, not written as null
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=1) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """A run's report.json, validated against this schema; a one-line OutputError otherwise."""
        path = Path(path)
        if not path.is_file():
            raise OutputError(f"{path.parent}: no report.json", "pass output folders of `compress run`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise OutputError(f"{path}: not valid JSON ({e.msg})", "re-run the recipe to rewrite it") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != REPORT_SCHEMA_VERSION:
            raise OutputError(f"{path}: report schema version {version}, this compress reads "
                              f"{REPORT_SCHEMA_VERSION}", "re-run the recipe with this version")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise OutputError(f"{path}: {where}: {first['msg']}", "re-run the recipe to rewrite it") from None
