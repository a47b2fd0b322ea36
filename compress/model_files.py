"""Model files are untrusted input: checks that run before anything is loaded or allocated.

- Pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``) can run code when read: a folder holding only those is
  refused unless the user passes ``--allow-pickle``; safetensors are preferred whenever both exist.
- A safetensors header is read alone (8 bytes of length, then its JSON) and must describe a file of exactly
  the size on disk: a header that claims more than the file holds, or offsets that overlap or run past its end,
  is refused before any tensor is mapped.
- A GGUF header's counts must fit in the file before transformers parses it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import CompressError, ModelError

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER = 100 << 20  # safetensors caps its own header at 100 MB
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_model_folder(folder: Path, allow_pickle: bool) -> bool:
    """Refuse what must not be loaded; returns whether the folder's weights are safetensors. Every shard a
    ``model.safetensors.index.json`` names must be there."""
    safetensors = sorted(folder.glob("*.safetensors"))
    indexed_shards(folder)
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name]
    if not safetensors and pickles and not allow_pickle:
        raise ModelError(f"{folder} holds only pickle weights ({pickles[0].name}), which can run code when read",
                         "convert them to safetensors, or pass --allow-pickle if you trust their source")
    for path in safetensors:
        check_safetensors_header(path)
    return bool(safetensors)


def indexed_shards(folder: Path, error: type[CompressError] = ModelError) -> list[str] | None:
    """The shard files ``model.safetensors.index.json`` names, each checked to be there (else ``error``);
    None when the folder has no index."""
    index = folder / INDEX
    if not index.is_file():
        return None
    try:
        named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise error(f"{index} is damaged (it has no weight_map)", "copy or download the model again") from None
    for name in named:
        if not isinstance(name, str) or "/" in name or not (folder / name).is_file():
            raise error(f"{folder}: shard {name} named in {INDEX} is missing",
                        "copy or download every shard of the model")
    return named


def check_safetensors_header(path: Path) -> None:
    read_safetensors_header(path)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header, checked against the file's size, and where its data starts."""
    size = path.stat().st_size
    bad = f"{path}: not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{bad} (shorter than its header)", "the file is truncated; download it again")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER):
            raise ModelError(f"{bad} (its header claims {length:,} bytes, the file has {size:,})",
                             "the file is damaged or not safetensors")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{bad} (its header is not JSON)", "the file is damaged") from None
    if not isinstance(header, dict):
        raise ModelError(f"{bad} (its header is not a mapping)", "the file is damaged")
    data = size - 8 - length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            expected = numel * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{bad} (tensor {name!r} is described wrongly)", "the file is damaged") from None
        if not 0 <= start <= end <= data or end - start != expected:
            raise ModelError(f"{bad} (tensor {name!r} claims bytes {start}..{end} of {data:,})",
                             "the file is truncated or damaged; download it again")
        spans.append((start, end))
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        raise ModelError(f"{bad} (tensors overlap)", "the file is damaged")
    return header, 8 + length


def check_gguf_header(path: Path) -> None:
    """GGUF: magic, version, and tensor / key-value counts that the file can hold."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file", "pass a .gguf model file")
    version, tensors, kvs = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3) or tensors > size // 32 or kvs > size // 16:
        raise ModelError(f"{path}: GGUF header claims {tensors:,} tensors and {kvs:,} keys in {size:,} bytes "
                         f"(version {version})", "the file is damaged or truncated")
