"""The finished blocks of a run, on disk, so that memory holds one block and a killed run can resume.

The stage is a hidden folder beside the output (``.NAME.partial``). When a block is finished, its stored form
(compressed layers' tensors, every other tensor in the dense dtype: exactly what the checkpoint will hold) is
written to ``blocks/NNNNN.safetensors`` and the block's tensors are replaced by memory-mapped views of that
file, so the block costs no memory until it is used again and the model the run evaluates and writes is
exactly the stored one. ``stage.json`` records, per finished block, the formats of its compressed layers,
the records the report shows, the passes' seconds and the state a pass keeps across blocks; it is
rewritten atomically after each block file, so a run killed at any moment leaves a consistent stage.

``--resume`` reuses a stage written by the same recipe on the same model (its key must match): finished
blocks are read back instead of compressed again, and the calibration activations are recomputed through
them, so the result has the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoint import checkpoint_content
from .errors import OutputError
from .formats import format_from_saved
from .modules import CompressedLinear, rotate_input, rotation_from_meta
from .residency import release_file_pages
from .shards import open_safetensors, write_file

STATE = "stage.json"


def stage_folder(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


class RunStage:
    """Finished blocks of one run (see the module's docstring). ``key`` identifies the run: a stage is
    resumed only by a run with the same key."""

    def __init__(self, folder: Path, key: dict, dense_dtype: str, resume: bool = False):
        self.folder, self.key, self.dense_dtype = folder, key, dense_dtype
        self.blocks: dict[int, dict] = {}
        state = self._read_state()
        if resume:
            if state is None:
                raise OutputError(f"nothing to resume: {folder} holds no finished block",
                                  "run again without --resume")
            if state.get("key") != key:
                changed = sorted(k for k in key if state.get("key", {}).get(k) != key[k])
                raise OutputError(f"cannot resume: the stage in {folder} was written by another run "
                                  f"({', '.join(changed)} differ)", "run again without --resume (it starts over)")
            self.blocks = {int(i): b for i, b in state["blocks"].items()}
        else:
            shutil.rmtree(folder, ignore_errors=True)
        (folder / "blocks").mkdir(parents=True, exist_ok=True)

    def _read_state(self) -> dict | None:
        try:
            state = json.loads((self.folder / STATE).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("blocks"), dict) else None

    def _file(self, index: int) -> Path:
        return self.folder / "blocks" / f"{index:05d}.safetensors"

    def finished(self, index: int) -> dict | None:
        """What :meth:`commit` recorded for block ``index`` (``records``, ``seconds``, ``pass_state``), or None."""
        return self.blocks.get(index)

    def commit(self, index: int, block: nn.Module, prefix: str, entry: dict) -> None:
        """Write the finished block (names under ``prefix``), record ``entry`` with it, and swap the block's
        tensors for views of the written file."""
        content = checkpoint_content(block, self.dense_dtype)
        if content.aliases:
            raise OutputError(f"block {prefix} shares tensors between its layers", "this model cannot be staged")
        tmp = self._file(index).with_suffix(".tmp")
        write_file(tmp, content.tensors)
        os.replace(tmp, self._file(index))  # a killed run never leaves half a block file
        self.blocks[index] = {**entry, "layers": content.layers}
        self._write_state()
        self.load(index, block)

    def load(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s stored tensors in place: compressed layers rebuilt from their formats, every
        other tensor a view of the block file; the block's previous tensors are released."""
        previous = [t.data for t in [*block.parameters(), *block.buffers()]]
        views = open_safetensors(self._file(index))
        for name, meta in self.blocks[index]["layers"].items():
            parts = {k[len(name) + 1:]: views.pop(k) for k in list(views) if k.startswith(name + ".")}
            bias = parts.pop("bias", None)
            layer = CompressedLinear(format_from_saved(meta, parts, verify=False), None)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
            if "input_rotation" in meta:
                rotate_input(layer, rotation_from_meta(meta["input_rotation"]))
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, layer)
        state = dict(block.named_parameters()) | dict(block.named_buffers())
        for name, t in views.items():
            state[name].data = t
        for m in block.modules():  # structured pruning stores narrower layers than the model was built with
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = m.weight.shape
        in_use = {t.data_ptr() for t in [*block.parameters(), *block.buffers()]}
        release_file_pages([t for t in previous if t.data_ptr() not in in_use])

    def _write_state(self) -> None:
        tmp = self.folder / f"{STATE}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "blocks": self.blocks}, indent=1, default=_plain) + "\n")
        os.replace(tmp, self.folder / STATE)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _plain(value):
    """JSON for what a pass's notes may hold besides plain values (tensors, numpy scalars)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
