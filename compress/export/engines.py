"""``compress export --format TARGET`` for serving engines: one folder written atomically from a checkpoint by the
target's module, then read back by the target's own reader and compared with our model (``served``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..errors import ExportError, ExportMismatch, OutputError
from ..report.card import export_card
from ..report.model import Report
from ..shards import DEFAULT_MAX_SHARD
from ..staging import staged_folder
from . import compressed_tensors, gguf, gptq
from .runtime import EXPORT_META
from .served import ServedTolerance, check_passed, compare_models, read_checkpoint

WRITERS = {compressed_tensors.TARGET: compressed_tensors, gptq.TARGET: gptq, gguf.TARGET: gguf}
WEIGHT_FILES = ("*.safetensors", "*.gguf")  # what an export's size counts
RECIPE_KEYS = {w.RECIPE_KEY: target for target, w in WRITERS.items()}  # recipe export section -> target


def export_for_engine(path: Path, out_dir: Path, target: str, windows: torch.Tensor | None, force: bool = False,
                      verify: bool = True, engine: str | None = None, max_shard_bytes: int | None = None,
                      tolerance: ServedTolerance | None = None, source_label: str | None = None, log=print) -> dict:
    """Write checkpoint ``path`` as ``target`` into ``out_dir`` (atomically: nothing is left when a step fails) and,
    with ``windows``, read it back with the target's own reader and compare with our model on them."""
    if target not in WRITERS:
        raise ExportError(f"unknown export format '{target}'", f"use one of: onnx, {', '.join(WRITERS)}")
    writer = WRITERS[target]
    if out_dir.exists() and not force:
        raise OutputError(f"output folder {out_dir} already exists", "pass --force to replace it")
    t0 = time.perf_counter()
    ckpt = read_checkpoint(path, verify)
    info: dict = {"format": target, "source": source_label or str(path), "engine": engine, "layers": len(ckpt.layers),
                  "reader": writer.READER}
    with staged_folder(out_dir) as tmp:
        info |= writer.write(ckpt, tmp, engine, max_shard_bytes or DEFAULT_MAX_SHARD)
        info["size"] = {"file_bytes": sum(f.stat().st_size for pattern in WEIGHT_FILES for f in tmp.glob(pattern))}
        info["timing"] = {"write_seconds": time.perf_counter() - t0}
        if windows is not None:
            t = time.perf_counter()
            ours, _ = load_checkpoint(path, verify=False)
            try:
                theirs = writer.read_back(tmp)
            except (ValueError, OSError, RuntimeError, KeyError, IndexError) as e:  # the reader's own complaint
                raise ExportMismatch(f"{target} export cannot be read back by {writer.READER}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                     "report it with the checkpoint; --no-validate keeps it") from None
            info["validation"] = compare_models(ours, theirs, windows, tolerance or ServedTolerance())
            info["timing"]["validation_seconds"] = time.perf_counter() - t
            v = info["validation"]
            log(f"{target} read back by its engine: perplexity {v['perplexity_export']:.4f} vs ours "
                f"{v['perplexity_ours']:.4f}, top-1 agreement {v['top1_agreement']:.4f}, max |logit diff| "
                f"{v['max_logit_diff']:.2e}")
            check_passed(target, v)
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(export_card(info, _source_report(path), target))
    return info


def _source_report(path: Path) -> Report | None:
    """The report of the run that wrote checkpoint ``path`` (None when the folder has none, e.g. mid-run)."""
    return Report.load(path / "report.json") if (path / "report.json").is_file() else None
