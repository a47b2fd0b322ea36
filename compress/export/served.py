"""What every export for a serving engine shares: reading a compressed checkpoint layer by layer, the files besides
the weights (config, generation config, tokenizer), and the check that the engine's own reader computes what our
model computes.

The writers of each target (``compressed_tensors``, ...) own their bytes and config; they see a checkpoint as
:class:`CheckpointLayers`: each compressed layer's format, and every other tensor as stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import META, read_layers, verify_hashes
from ..errors import CheckpointError, ExportError, ExportMismatch
from ..formats.base import IntegerGrid, NotAnIntegerGrid, WeightFormat
from ..kquants import ktype
from ..modules import ONLINE_ROTATION
from ..shards import open_weights, write_shards


@dataclass
class CheckpointLayers:
    """A compressed checkpoint as the serving exports read it (tensors stay memory-mapped)."""

    path: Path
    layers: dict[str, WeightFormat]         # compressed layer -> its format
    biases: dict[str, torch.Tensor]         # compressed layer -> its bias (when it has one)
    tensors: dict[str, torch.Tensor]        # every other tensor, in the checkpoint's dense dtype
    aliases: dict[str, str]                 # tied tensor -> the tensor it is stored as
    dense_dtype: str
    config: dict                            # config.json


def read_checkpoint(path: Path, verify: bool = True) -> CheckpointLayers:
    """``path``'s layers and tensors; with ``verify`` the recorded hashes and every layer's layout are checked."""
    path = Path(path)
    if not (path / META).is_file() or not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a compressed checkpoint ({META} or config.json is missing)",
                              "pass the output folder of `compress run`")
    try:
        meta = json.loads((path / META).read_text())
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: damaged metadata ({e})", "re-run `compress run`") from None
    tensors = open_weights(path)
    if verify:
        verify_hashes(path, meta, tensors)
    layers, biases = read_layers(path, meta, tensors, verify)
    return CheckpointLayers(path, layers, biases, tensors, meta["aliases"], meta["dense_dtype"], config)


def written_specs(passes, target: str, recipe_key: str, holds_embeddings: bool = True, holds_k_quants: bool = False):
    """(pass, grid spec) for every grid the recipe's passes may store; one ExportError, before any compute, when a
    pass stores something that is not an integer grid, a k-quant grid (unless ``holds_k_quants``), or (unless
    ``holds_embeddings``) quantizes the token embedding."""
    for p in passes:
        if p.runtime_transforms():
            raise ExportError(f"{target} export: {p.name} transforms the input of {', '.join(p.runtime_transforms())} "
                              f"at run time, which {target} readers do not", f"drop export.{recipe_key}, or that "
                              "option of the pass (ONNX applies it)")
        if not holds_embeddings and "embedding" in p.ends_written():
            raise ExportError(f"{target} export: {p.name} quantizes the token embedding, which {target} readers "
                              "take only in float", f"set embedding: false (and head: false with tied embeddings) "
                              f"on that pass for export.{recipe_key}, or export GGUF / ONNX, which hold it")
        try:
            specs = p.written_grids()
        except NotAnIntegerGrid as e:
            raise ExportError(f"{target} export: {e}", f"drop export.{recipe_key} or that pass (ONNX holds every "
                              "format)") from None
        for spec in specs:
            if ktype(spec.grid) is not None and not holds_k_quants:
                raise ExportError(f"{target} export: {p.name} writes llama.cpp {spec.grid} super-blocks, whose group "
                                  "scales are integers times a float16 factor per 256 inputs: only GGUF holds them",
                                  f"drop export.{recipe_key}, or use grid: int for it")
            yield p, spec


def split_layers(ckpt: CheckpointLayers, target: str, holds: str, check=None, holds_embeddings: bool = True,
                 skip: set[str] | None = None) -> tuple[dict[str, IntegerGrid], dict[str, torch.Tensor]]:
    """The checkpoint's compressed layers as (layer -> integer grid, ``NAME.weight`` -> dense weight of a layer
    stored dense). A layer without an integer grid is refused naming it (``holds``: what the target holds), and a
    compressed token embedding unless ``holds_embeddings``; ``check(name, grid, shape)`` may refuse more. An output
    head tied to the token embedding is left out (the reader ties it again), and so are the layers in ``skip`` (the
    target writes their own bytes)."""
    if ckpt.config.get(ONLINE_ROTATION):
        layers = ", ".join(ckpt.config[ONLINE_ROTATION]["layers"])
        raise ExportError(f"{target} export: {ckpt.path}'s {layers} read their input through a Hadamard transform at "
                          f"run time, which {target} readers do not apply", "export it to ONNX, which applies it")
    grids: dict[str, IntegerGrid] = {}
    dense: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    linears = None if holds_embeddings else set(linear_names(ckpt.config))
    for name, fmt in ckpt.layers.items():
        if id(fmt) in seen or name in (skip or ()):
            continue
        seen.add(id(fmt))
        if linears is not None and name not in linears:
            raise refuse(target, name, "a quantized token embedding is read only in float", "drop the embeddings "
                         "pass for this export, or export GGUF / ONNX, which hold it")
        if fmt.kind == "dense":
            dense[f"{name}.weight"] = fmt.tensors()["weight"]
            continue
        try:
            grids[name] = fmt.integer_grid()
        except NotAnIntegerGrid as e:
            raise refuse(target, name, str(e), f"{target} holds {holds}; export this one to ONNX") from None
        if check is not None:
            check(name, grids[name], fmt.shape)
    return grids, dense


def with_other_tensors(ckpt: CheckpointLayers, tensors: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]):
    """``tensors`` plus the dense layers, every tensor no pass compressed, and the tied tensors a reader does not
    re-tie itself."""
    tensors.update(dense)
    tensors.update(ckpt.tensors)
    for alias, original in ckpt.aliases.items():
        if not tied_to_embeddings(ckpt, alias):
            tensors[alias] = ckpt.tensors[original]
    return tensors


def tied_to_embeddings(ckpt: CheckpointLayers, name: str) -> bool:
    """Whether tensor ``name`` is an alias the model re-ties itself at load (``tie_word_embeddings``)."""
    return name in ckpt.aliases and bool(ckpt.config.get("tie_word_embeddings", False)) and name.startswith("lm_head")


def write_safetensors_export(ckpt: CheckpointLayers, out_dir: Path, tensors: dict[str, torch.Tensor], config: dict,
                             max_shard_bytes: int) -> None:
    """A transformers-style folder: ``tensors`` in safetensors shards, then :func:`write_side_files`."""
    write_shards(tensors, out_dir, max_shard_bytes)
    write_side_files(ckpt, out_dir, config)


def write_side_files(ckpt: CheckpointLayers, out_dir: Path, config: dict) -> None:
    """config.json (as given), generation_config.json and the tokenizer files, next to the weights."""
    from transformers import AutoTokenizer

    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = ckpt.path / "generation_config.json"
    if generation.is_file():
        (out_dir / generation.name).write_bytes(generation.read_bytes())
    AutoTokenizer.from_pretrained(ckpt.path).save_pretrained(out_dir)


def linear_names(config: dict) -> list[str]:
    """Names of every linear layer of the model ``config`` describes (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@dataclass
class ServedTolerance:
    max_perplexity_diff: float = 0.002  # relative; the engine reads the very values we computed
    min_top1_agreement: float = 0.99
    max_logit_diff: float = 0.05


@torch.no_grad()
def compare_models(ours, theirs, windows: torch.Tensor, tol: ServedTolerance) -> dict:
    """Our compressed model and the engine's reading of the export on the same held-out windows: perplexities,
    top-1 agreement, max |logit difference|; ``passed`` and ``failures`` against ``tol``."""
    from ..modules import dequantized_weights

    nll = {"ours": 0.0, "theirs": 0.0}
    max_diff, agree, count = 0.0, 0, 0
    with dequantized_weights(ours):
        for row in windows:
            ids = row.reshape(1, -1)
            a = ours(input_ids=ids, use_cache=False).logits.float()[0]
            b = theirs(input_ids=ids, use_cache=False).logits.float()[0]
            max_diff = max(max_diff, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += a.shape[0]
            for key, logits in (("ours", a), ("theirs", b)):
                nll[key] += float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[0, 1:], reduction="sum"))
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    ppl = {k: math.exp(v / tokens) for k, v in nll.items()}
    result: dict[str, Any] = {
        "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "perplexity_ours": ppl["ours"],
        "perplexity_export": ppl["theirs"], "top1_agreement": agree / count, "max_logit_diff": max_diff,
        "tolerance": asdict(tol)}
    failures = []
    if abs(ppl["theirs"] / ppl["ours"] - 1) > tol.max_perplexity_diff:
        failures.append(f"perplexity {ppl['theirs']:.4f} vs ours {ppl['ours']:.4f}")
    if agree / count < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {agree / count:.4f} < {tol.min_top1_agreement}")
    if not np.isfinite(max_diff) or max_diff > tol.max_logit_diff:
        failures.append(f"max |logit diff| {max_diff:.3g} > {tol.max_logit_diff}")
    result["passed"] = not failures
    result["failures"] = "; ".join(failures)
    return result


def check_passed(target: str, validation: dict) -> None:
    if not validation["passed"]:
        raise ExportMismatch(f"{target} export read back by its engine differs from the compressed model: "
                             f"{validation['failures']}", "report it with the export.json; --no-validate keeps it")


def refuse(target: str, layer: str, why: str, hint: str) -> ExportError:
    return ExportError(f"{target} cannot hold layer {layer}: {why}", hint)

