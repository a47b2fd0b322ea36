"""The compressed checkpoint: what it holds, its exact size, writing it and reading it back.

Folder layout::

    model.safetensors   packed codes / tables / masks of compressed layers, plus every other
                        tensor (embeddings, norms, biases) in ``dense_dtype``
    compress.json       format of each compressed layer, tied-weight aliases, versions, and the SHA-256 of
                        every tensor in model.safetensors (checked when the checkpoint is read); a layer that
                        shares another's format (an output head tied to a compressed token embedding) is
                        recorded as ``{"kind": "tied", "to": NAME}`` and stored once
    config.json, generation_config.json, tokenizer files   as transformers writes them

The size the report gives is the byte count of exactly the tensors written here.

Reading verifies by default: every tensor's hash against the one recorded at save, and every compressed
layer's tensors against what its format's metadata declares (names, dtypes, shapes, value ranges). Any
mismatch is a one-line CheckpointError naming the layer (exit 2); ``verify=False`` skips both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import CheckpointError, ModelError
from .formats import format_from_saved
from .formats.base import LayoutError, WeightFormat
from .modules import FORMAT_MODULES, CompressedEmbedding, CompressedLinear, restore_input_rotations
from .shards import DEFAULT_MAX_SHARD, open_weights, write_shards

FORMAT_VERSION = 2  # 2: tensor hashes; palettes record their table dtype
WEIGHTS = "model.safetensors"
META = "compress.json"
TIED = "tied"  # a layer's meta kind: it shares the format of the layer named by "to"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CheckpointContent:
    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict]       # compressed layer name -> format meta
    aliases: dict[str, str]       # tied tensor name -> the name it is stored under

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def checkpoint_content(model: nn.Module, dense_dtype: str = "float16", prefix: str = "") -> CheckpointContent:
    """What the checkpoint stores of ``model`` (or of one block of it, its names under ``prefix``): each
    compressed layer's format tensors and meta, every other tensor in ``dense_dtype``, tied tensors once."""
    dtype = DTYPES[dense_dtype]
    lead = f"{prefix}." if prefix else ""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple, str] = {}
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, FORMAT_MODULES)}
    stored_as: dict[int, str] = {}
    for name, module in compressed.items():
        if id(module.fmt) in stored_as:
            layers[lead + name] = {"kind": TIED, "to": stored_as[id(module.fmt)]}
            continue
        stored_as[id(module.fmt)] = lead + name
        layers[lead + name] = module.fmt.meta()
        rotation = getattr(module, "input_rotation", None)
        if rotation is not None:  # a staged block's layer is rebuilt from this (a checkpoint: the model config too)
            layers[lead + name]["input_rotation"] = rotation.meta()
        for part, t in module.fmt.tensors().items():
            tensors[f"{lead}{name}.{part}"] = t.detach().cpu().contiguous()
    for key, t in model.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if owner in compressed and key.rpartition(".")[2] != "bias":
            continue
        ptr = (t.data_ptr(), t.shape, t.dtype)
        if ptr in by_ptr:
            aliases[lead + key] = lead + by_ptr[ptr]
            continue
        by_ptr[ptr] = key
        t = t.detach().cpu()
        tensors[lead + key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return CheckpointContent(tensors, layers, aliases)


def save_checkpoint(model, tokenizer, folder: Path, dense_dtype: str = "float16", extra: dict | None = None,
                    content: CheckpointContent | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD
                    ) -> CheckpointContent:
    """Write the checkpoint into ``folder`` (which the caller later renames into place), one tensor at a time,
    as shards of at most ``max_shard_bytes``."""
    content = content or checkpoint_content(model, dense_dtype)
    # One metadata key only: safetensors keeps metadata in a hash map, so several keys would be
    # written in a random order and two identical runs would differ in their header bytes.
    hashes = write_shards(content.tensors, folder, max_shard_bytes, metadata={"format": f"compress-{FORMAT_VERSION}"})
    meta = {"format_version": FORMAT_VERSION, "dense_dtype": dense_dtype, "layers": content.layers,
            "aliases": content.aliases, "tensor_sha256": hashes, **(extra or {})}
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return content


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def verify_hashes(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    recorded = meta.get("tensor_sha256")
    if not isinstance(recorded, dict) or set(recorded) != set(tensors):
        raise CheckpointError(f"{path}: {META} does not list the hash of every tensor in {WEIGHTS}",
                              "the checkpoint was changed; re-run `compress run`, or load it with --no-verify")
    for name, t in tensors.items():
        if tensor_hash(t) != recorded[name]:
            raise CheckpointError(f"{path}: tensor {name} does not match the hash recorded when it was saved",
                                  "the file was changed or damaged; re-run `compress run`, or load it with --no-verify")


def is_checkpoint(path) -> bool:
    return (Path(path) / META).is_file()


def load_checkpoint(path, device="cpu", dtype=torch.float32, verify: bool = True):
    """Read a compressed checkpoint -> (model, tokenizer). Compressed layers stay compressed. With ``verify``
    (the default) every tensor's hash and every layer's layout are checked first."""
    from transformers import AutoTokenizer

    from .models import quiet_transformers

    path = Path(path)
    for needed in (META, "config.json"):
        if not (path / needed).is_file():
            raise CheckpointError(f"{path} is not a compressed checkpoint: {needed} is missing",
                                  "pass the output folder of `compress run`")
    quiet_transformers()
    try:
        meta = json.loads((path / META).read_text())
        tensors = open_weights(path)
    except ModelError as e:
        raise CheckpointError(str(e.message), e.hint) from None
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupted checkpoint ({e})", "re-run `compress run`") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {version} is not supported",
                              f"this compress reads format {FORMAT_VERSION}; re-run `compress run`")
    layers, aliases = meta.get("layers"), meta.get("aliases")
    if not (isinstance(layers, dict) and all(isinstance(v, dict) for v in layers.values())
            and isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
        raise CheckpointError(f"{path}: {META} is damaged (layers or aliases are not what it writes)",
                              "re-run `compress run`")
    if verify:
        verify_hashes(path, meta, tensors)
    try:
        model = _build(path, meta, tensors, dtype, verify)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as e:  # names or shapes off
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the checkpoint does not fit its model ({first})",
                              "the checkpoint may be damaged; re-run `compress run`") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def read_layers(path: Path, meta: dict, tensors: dict[str, torch.Tensor], verify: bool
                ) -> tuple[dict[str, WeightFormat], dict[str, torch.Tensor]]:
    """Each compressed layer's format and bias, taken out of ``tensors`` (what stays is every other tensor); with
    ``verify`` each layer's tensors must be what its metadata declares (one-line CheckpointError)."""
    formats, biases = {}, {}
    tied = {n: m.get("to") for n, m in meta["layers"].items() if m.get("kind") == TIED}
    for name, layer_meta in meta["layers"].items():
        if name in tied:
            continue
        parts = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")}
        if "bias" in parts:
            biases[name] = parts.pop("bias")
        try:
            formats[name] = format_from_saved(layer_meta, parts, verify)
        except LayoutError as e:
            raise CheckpointError(f"{path}: layer {name}: {e}", "the checkpoint's metadata and tensors disagree; "
                                  "re-run `compress run`") from None
    for name, to in tied.items():
        if to not in formats:
            raise CheckpointError(f"{path}: layer {name} is tied to {to!r}, which the checkpoint does not store",
                                  "the checkpoint's metadata is damaged; re-run `compress run`")
        formats[name] = formats[to]
    return formats, biases


def _build(path: Path, meta: dict, tensors: dict[str, torch.Tensor], dtype, verify: bool) -> nn.Module:
    """The model of ``config.json`` with the checkpoint's compressed layers and tensors in place."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import prepare_for_compression

    config = AutoConfig.from_pretrained(path)
    model = prepare_for_compression(AutoModelForCausalLM.from_config(config, dtype=dtype))
    formats, biases = read_layers(path, meta, tensors, verify)
    for name, fmt in formats.items():
        bias = biases.get(name)
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            new: nn.Module = CompressedEmbedding(fmt, getattr(old, "embed_scale", None), dtype)
        else:
            new = CompressedLinear(fmt, bias.to(dtype) if bias is not None else None, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        del old
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    for alias, original in meta["aliases"].items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(original))
    # compressed layers got their bias above; tied tensors were re-linked
    missing = [k for k in missing if k not in meta["aliases"] and k.rpartition(".")[0] not in meta["layers"]]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", "the checkpoint may be corrupted")
    restore_input_rotations(model)
    return model


@torch.no_grad()
def round_to_storage(model: nn.Module, dense_dtype: str) -> None:
    """Round every uncompressed float tensor to the dtype it will be stored in, so the compressed
    model evaluated in the run is exactly the one a later ``load`` gives back."""
    dtype = DTYPES[dense_dtype]
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dtype != dtype:  # already stored (a staged block): nothing to round
            t.copy_(t.to(dtype).to(t.dtype))
