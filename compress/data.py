"""Calibration and evaluation text -> token batches.

Dataset specs:
- ``pydoc``: the built-in offline corpus, the English text of Python's reference manual shipped
  with every CPython (``pydoc_data.topics``);
- a local ``.txt`` file, ``.jsonl`` file (a ``text`` field per line) or a folder of those;
- a Hugging Face dataset ``NAME[:CONFIG[:SPLIT]]`` (``text`` column), e.g.
  ``wikitext:wikitext-2-raw-v1:train``; ``hf:NAME...`` forces the hub reading.

When calibration and evaluation name the same dataset, calibration draws from the first 85% of
the text and evaluation from the held-out last 15%, so the model is never scored on text it was
calibrated on. Sampling is seeded and deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import DataError

HELDOUT_FRACTION = 0.15
BUILTIN = ("pydoc", "builtin")


@dataclass(frozen=True)
class TextSource:
    spec: str
    kind: str   # "builtin" | "file" | "folder" | "hub"


def resolve_source(spec: str) -> TextSource:
    """Check a dataset spec without reading it all (used before any model is loaded)."""
    if spec in BUILTIN:
        return TextSource(spec, "builtin")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl", ".md"):
            raise DataError(f"unsupported dataset file type: {spec}", "use a .txt or .jsonl file")
        return TextSource(str(path), "file")
    if path.is_dir():
        return TextSource(str(path), "folder")
    if spec.startswith("hf:"):
        return TextSource(spec[3:], "hub")
    if spec.startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".json", ".md"):
        raise DataError(f"dataset file not found: {spec}",
                        "pass an existing .txt/.jsonl file or folder, 'pydoc', or a hub dataset")
    return TextSource(spec, "hub")


@lru_cache(maxsize=8)
def read_text(source: TextSource) -> str:
    if source.kind == "builtin":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    if source.kind == "file":
        return _read_file(Path(source.spec))
    if source.kind == "folder":
        files = sorted(p for p in Path(source.spec).rglob("*") if p.suffix in (".txt", ".jsonl", ".md"))
        if not files:
            raise DataError(f"no .txt or .jsonl files in {source.spec}", "put text files in the folder")
        return "\n\n".join(_read_file(p) for p in files)
    return _read_hub(source.spec)


def _read_file(path: Path) -> str:
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: each line must be a JSON object with a 'text' field",
                            'e.g. {"text": "..."}') from None
    return "\n\n".join(texts)


def _read_hub(spec: str) -> str:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many kinds; all mean "cannot get it"
        raise DataError(f"cannot load dataset '{spec}': {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        "offline? use 'pydoc' or a local .txt/.jsonl file") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[column] if isinstance(t, str) and t.strip())


def token_stream(spec: str, tokenizer, part: str) -> torch.Tensor:
    """All tokens of the ``part`` ("train", "heldout" or "all") of a dataset, as a 1-D tensor."""
    text = read_text(resolve_source(spec))
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    text = {"train": text[:cut], "heldout": text[cut:], "all": text}[part]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def calibration_batches(spec: str, tokenizer, samples: int, seq_len: int, seed: int,
                        heldout_spec: str | None = None) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens, [samples, seq_len], seeded."""
    part = "train" if heldout_spec == spec else "all"
    ids = token_stream(spec, tokenizer, part)
    if ids.numel() < seq_len + 1:
        raise DataError(f"calibration text '{spec}' has {ids.numel()} tokens, fewer than seq_len={seq_len}",
                        "use more text or a smaller calibration.seq_len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def evaluation_windows(spec: str, tokenizer, seq_len: int, max_windows: int,
                       calibration_spec: str | None = None) -> torch.Tensor:
    """Non-overlapping windows of held-out text, [windows, seq_len]."""
    part = "heldout" if calibration_spec == spec else "all"
    ids = token_stream(spec, tokenizer, part)
    n = min(ids.numel() // seq_len, max_windows)
    if n < 1:
        raise DataError(f"evaluation text '{spec}' has {ids.numel()} tokens, fewer than seq_len={seq_len}",
                        "use more text or a smaller evaluate.seq_len")
    return ids[: n * seq_len].reshape(n, seq_len)
