"""Recipe: the YAML file that says what to do to a model, parsed into typed pydantic objects.

Errors name the file and line, and suggest the closest known key. ``--set a.b.0.c=VALUE``
overrides a value (parsed as YAML) before validation.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .errors import RecipeError
from .export.genai import PREFILL_CHUNK
from .passes.registry import get_pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(Section):
    dataset: str = Field("pydoc", description="pydoc (built-in offline corpus), a .txt/.jsonl file or "
                         "folder, or a hub dataset NAME[:CONFIG[:SPLIT]]")
    samples: int = Field(128, ge=1, le=100_000, description="number of calibration sequences")
    seq_len: int = Field(512, ge=8, le=131_072, description="tokens per calibration sequence")


class EvaluateConfig(Section):
    dataset: str = Field("pydoc", description="evaluation text; when equal to the calibration "
                         "dataset, its held-out tail is used")
    seq_len: int = Field(512, ge=8, le=131_072, description="tokens per evaluation window")
    max_windows: int = Field(16, ge=1, description="non-overlapping windows evaluated at most")
    kl: bool = Field(True, description="measure KL divergence and top-1 agreement vs the base model")
    latency: bool = Field(False, description="measure PyTorch decode latency (ms per token, batch 1) of base "
                          "and compressed; on whenever a max_latency_ms budget is set")
    latency_tokens: int = Field(32, ge=1, le=4096, description="tokens generated when measuring latency")
    tasks: list[str] = Field(default=[], description="zero-shot tasks through lm-eval (optional extra "
                             "`compress-lm[lm-eval]`; needs its datasets), e.g. [hellaswag, arc_easy]")
    tasks_limit: int | None = Field(None, ge=1, description="lm-eval: examples per task at most")


class OnnxConfig(Section):
    weights: Literal["fast", "portable"] = Field(
        "fast", description="fast: com.microsoft MatMulNBits for 2/4/8-bit integer grids; portable: standard "
        "blocked DequantizeLinear only. Other formats are decoded in-graph either way")
    int8_activations: bool = Field(False, description="int8 activations (accuracy_level 4): 2- to 4-bit grids in "
                                   "our GridMatMul where its library is built, else MatMulNBits: faster on CPU, "
                                   "logits drift more (the validation's defaults loosen with it)")
    custom_ops: bool = Field(True, description="fast: our operators (compress/ortops) where their library is built, "
                             "for what onnxruntime's kernels cannot read or hold as stored; false: onnxruntime's "
                             "kernels only (every execution provider that has them; palettes, code books, NF and "
                             "k-quant grids then decode to float32 at load)")
    prefill_chunk: int = Field(PREFILL_CHUNK, ge=0, le=65536, description="prompt tokens a prefill run takes in "
                               "`compress generate` and onnxruntime-genai (chunked prefill: memory bounded by the "
                               "chunk; 0: the whole prompt at once)")
    validation: bool = Field(True, description="compare onnxruntime with PyTorch after the export")
    windows: int = Field(2, ge=1, le=64, description="held-out windows the validation reads")
    seq_len: int = Field(256, ge=16, le=8192, description="tokens per validation window")
    max_logit_diff: float | None = Field(None, gt=0, description="max |logit difference| allowed (default 0.05; "
                                         "5.0 with int8_activations)")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="min share of equal argmax tokens "
                                             "(default 0.995; 0.9 with int8_activations)")
    max_perplexity_diff: float | None = Field(None, ge=0, description="max relative perplexity difference "
                                              "(default 0.002; 0.05 with int8_activations)")


SERVED_KEYS = ("compressed_tensors", "gptq", "gguf")  # the `export` sections of serving engines


class ServedExport(Section):
    """A serving engine's export (compressed-tensors, GPTQ) written from the checkpoint into OUT/<format>."""

    target: Literal["vllm"] | None = Field(None, description="vllm: refuse, before any compute where the passes "
                                           "tell, what vLLM's kernels or loaders do not take")
    validation: bool = Field(True, description="read the export back with the format's reader and compare with "
                             "the compressed model")
    windows: int = Field(2, ge=1, le=64, description="held-out windows the validation reads")
    seq_len: int = Field(256, ge=16, le=8192, description="tokens per validation window")
    max_perplexity_diff: float = Field(0.002, ge=0, description="max relative perplexity difference")


class ExportConfig(Section):
    checkpoint: bool = Field(True, description="write the compressed checkpoint (safetensors)")
    dense_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of tensors no pass compressed (embeddings, norms)")
    onnx: OnnxConfig | None = Field(None, description="also export ONNX into OUT/onnx (`onnx: {}` or "
                                    "`onnx: true` for the defaults), validated in onnxruntime")
    compressed_tensors: ServedExport | None = Field(
        None, description="also export compressed-tensors pack-quantized (vLLM, SGLang, transformers) into "
        "OUT/compressed-tensors (`compressed_tensors: {}` for the defaults), read back and compared")
    gptq: ServedExport | None = Field(
        None, description="also export the GPTQ format (transformers, vLLM, TGI, ExLlama) into OUT/gptq "
        "(`gptq: {}` for the defaults), read back and compared")

    gguf: ServedExport | None = Field(
        None, description="also export GGUF (llama.cpp, Ollama, LM Studio) into OUT/gguf/model.gguf (`gguf: {}` "
        "for the defaults), read back by transformers and compared")

    def served(self) -> dict[str, ServedExport]:
        """The serving exports asked for: recipe key -> its settings."""
        return {k: v for k in SERVED_KEYS if (v := getattr(self, k)) is not None}

    @model_validator(mode="before")
    @classmethod
    def _onnx_shorthand(cls, data):
        for key in ("onnx", *SERVED_KEYS):
            if isinstance(data, dict) and data.get(key) is True:
                data = {**data, key: {}}
            elif isinstance(data, dict) and data.get(key) is False:
                data = {**data, key: None}
        return data


class Budgets(Section):
    max_size_mb: float | None = Field(None, gt=0, description="checkpoint size (MB = 10^6 bytes)")
    max_bits_per_weight: float | None = Field(None, gt=0, description="over the compressed layers")
    max_ppl: float | None = Field(None, gt=0, description="perplexity of the compressed model")
    max_ppl_increase: float | None = Field(
        None, ge=0, description="relative perplexity increase vs base (0.1 = +10%)")
    max_kl_divergence: float | None = Field(None, ge=0, description="mean KL(base || compressed), nats")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="share of equal argmax tokens")
    min_compression_ratio: float | None = Field(None, gt=0, description="fp16 size / checkpoint size")
    max_latency_ms: float | None = Field(None, gt=0, description="PyTorch decode latency, ms per token")
    max_latency_increase: float | None = Field(None, ge=-1, description="relative latency change vs base")
    min_task_accuracy: float | None = Field(None, ge=0, le=1, description="mean lm-eval accuracy over tasks")


class Recipe(Section):
    name: str | None = Field(None, description="a name for the run; defaults to the file name")
    description: str = ""
    seed: int = Field(0, description="seed of calibration sampling and any randomized pass")
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[Any] = Field(default=[], description="ordered list of passes")
    _deprecations: list[str] = PrivateAttr(default_factory=list)  # old option names this recipe used
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    budgets: Budgets = Budgets()

    @model_validator(mode="after")
    def _passes_are_mappings(self):
        for i, p in enumerate(self.passes):
            if not isinstance(p, dict) or "type" not in p:
                raise ValueError(f"passes.{i} must be a mapping with a 'type' key")
        return self

    def digest(self) -> str:
        """Hash of the fully resolved recipe (defaults included)."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json", exclude={"passes"})
        d["passes"] = [p.model_dump(mode="json") for p in self.passes]
        return d


SECTIONS: dict[str, type[BaseModel]] = {"calibration": CalibrationConfig, "evaluate": EvaluateConfig,
                                         "export": ExportConfig, "budgets": Budgets}


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", "check the path; ready recipes are in recipes/")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})", "save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read it ({e.strerror or e})", "check the path and permissions") from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})",
                          "check indentation and colons") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections", "see recipes/w4-rtn.yaml")
    for item in overrides:
        _apply_override(raw, item)
        lines[tuple(_split_key(item.split("=", 1)[0]))] = "--set"
    raw.setdefault("name", path.stem)
    return parse_recipe(raw, str(path), lines)


def parse_recipe(raw: dict, source: str = "<recipe>", lines: dict | None = None) -> Recipe:
    lines = lines or {}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise _friendly(e, (), source, lines) from None
    configs = []
    for i, p in enumerate(recipe.passes):
        cls = _pass_class(p["type"], source, lines, i)
        try:
            cfg = cls.Config.model_validate(p)
            for _pattern, values in cfg.overrides.items():  # check overrides now, not mid-run
                cfg.with_options(values)
        except ValidationError as e:
            raise _friendly(e, ("passes", i), source, lines, cls.Config) from None
        configs.append(cfg)
        recipe._deprecations += _renamed_options(p, cls.Config.renamed, i, source, lines)
    recipe.passes = configs
    return recipe


def deprecations(recipe: Recipe) -> list[str]:
    """One line per old option name the recipe used (still read; the line names the new one)."""
    return list(recipe._deprecations)


def _renamed_options(raw: dict, renamed: dict[str, str], i: int, source: str, lines: dict) -> list[str]:
    found: list[tuple[tuple, str]] = [((k,), k) for k in raw if k in renamed]
    found += [(("overrides", pattern, k), k) for pattern, values in (raw.get("overrides") or {}).items()
              if isinstance(values, dict) for k in values if k in renamed]
    return [f"{_where(source, lines, ('passes', i, *loc))}passes.{i}.{'.'.join(map(str, loc))} is now "
            f"'{renamed[old]}' (the old name still works)" for loc, old in found]


def _pass_class(name, source, lines, i):
    try:
        return get_pass(name)
    except RecipeError as e:
        where = _where(source, lines, ("passes", i, "type"))
        raise RecipeError(f"{where}passes.{i}.type: {e.message}", e.hint) from None


def _friendly(err: ValidationError, prefix: tuple, source: str, lines: dict, model=None) -> RecipeError:
    first = err.errors()[0]
    loc = prefix + tuple(first["loc"])
    dotted = ".".join(str(p) for p in loc)
    where = _where(source, lines, loc)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], model)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(allowed))}"
        return RecipeError(f"{where}unknown key '{dotted}'", hint)
    msg = first["msg"].removeprefix("Value error, ")
    return RecipeError(f"{where}{dotted}: {msg}", "`compress passes` lists every option with its range")


def _allowed_keys(parent: tuple, model) -> list[str]:
    if len(parent) == 2 and parent[0] == "passes" and model is not None:
        return list(model.model_fields)
    if len(parent) == 1 and parent[0] in SECTIONS:
        return list(SECTIONS[parent[0]].model_fields)
    return list(Recipe.model_fields)


def _where(source: str, lines: dict, loc: tuple) -> str:
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    line = lines.get(loc)
    if line == "--set":
        return "--set: "
    return f"{source}:{line}: " if line else f"{source}: "


def _key_lines(node, path=()) -> dict:
    """Map each key path of a YAML document to the line it starts on (1-based)."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            p = path + (key.value,)
            out[p] = key.start_mark.line + 1
            out.update(_key_lines(value, p))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            out.update(_key_lines(item, path + (i,)))
    return out


def _split_key(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.strip().split(".")]


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r} must look like KEY=VALUE", "e.g. --set passes.0.bits=3")
    key, value = item.split("=", 1)
    parts = _split_key(key)
    node = raw
    try:
        for p in parts[:-1]:
            if isinstance(node, dict):
                node = node.setdefault(p, {})
            else:
                node = node[p]
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise RecipeError(f"--set {key}: the value is not valid YAML ({problem})",
                          "quote text values, e.g. --set 'name=\"my run\"'") from None
    except (IndexError, KeyError, TypeError):
        raise RecipeError(f"--set {key}: no such place in the recipe", "list indices start at 0") from None
