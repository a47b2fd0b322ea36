"""Safetensors shards, read as memory-mapped views and written one tensor at a time.

A model folder's weights are either one ``model.safetensors`` or several shards named by
``model.safetensors.index.json`` (the layout transformers writes). :func:`open_weights` maps every file and
returns its tensors as views of the mapping (a private, copy-on-write file mapping, as transformers
makes): nothing is read until a tensor is used, and :mod:`residency` can hand the pages back afterwards.
:func:`write_shards` streams tensors into shards of at most ``max_shard_bytes`` (a tensor larger than that
gets a shard of its own), hashing each as it is written and giving its pages back, so writing a model
never holds more than one tensor's bytes in memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError
from .model_files import INDEX, indexed_shards, read_safetensors_header
from .residency import file_mappings, release_clean_pages

SINGLE = "model.safetensors"
TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
                "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
                "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in TORCH_DTYPES.items()}
DEFAULT_MAX_SHARD = 5 * 10**9


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``: the shards its index names (each checked to exist), else
    ``model.safetensors``."""
    shards = indexed_shards(folder, CheckpointError)
    if shards is not None:
        return [folder / n for n in shards]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise CheckpointError(f"{folder} holds no {SINGLE} and no {INDEX}", "pass a folder written by compress or "
                          "transformers")


def open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, as views of a private mapping of it (checked first: a truncated
    file or a header that does not fit the file raises ``ModelError``)."""
    header, data_start = read_safetensors_header(path)
    if not any(k != "__metadata__" for k in header):
        return {}
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + start) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.view(info["shape"])
    return out


def open_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files (see :func:`weight_files`), as mapped views."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        tensors.update(open_safetensors(path))
    return tensors


def write_shards(tensors: Mapping[str, torch.Tensor], folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD,
                 metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``tensors`` (in their order; each shard holds consecutive ones) into ``folder`` as one
    ``model.safetensors`` or as numbered shards with an index. Returns each tensor's SHA-256."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = [SINGLE] if len(groups) == 1 else \
        [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    hashes: dict[str, str] = {}
    for file, names in zip(files, groups, strict=True):
        hashes.update(write_file(folder / file, {n: tensors[n] for n in names}, metadata or {}))
    if len(files) > 1:
        weight_map = {n: f for f, names in zip(files, groups, strict=True) for n in names}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=1) + "\n")
    return hashes


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, str]:
    """One safetensors file holding ``tensors``, written one tensor at a time; returns each tensor's SHA-256."""
    metadata = metadata or {}
    # widest elements first, so every tensor's offset is a multiple of its element size (views stay aligned)
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    hashes = {}
    maps = file_mappings()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().cpu().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
            f.write(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
            release_clean_pages([t], maps)
        f.flush()
        os.fsync(f.fileno())
    return hashes
