"""Resources checked before work: a run's memory, disk and GPU memory are estimated from the model's size
before it is loaded, and a run that cannot fit is refused with the numbers (``--ignore-resource-check`` runs it
anyway).

The estimate follows how a run holds the model today: the whole float model in float32, plus the
compression's working set (a block's statistics and copies, the evaluation's batches), plus the calibration
activations of one block; outputs are at most the float16 model per written format, staged beside the output
folder. The factors are upper bounds of what ``bench/quantize.py`` measured on SmolLM2 (peak RSS between 1.8x
and 4.1x the float32 model, mixed precision highest).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError

WORKING_SET = 4.5      # peak RSS / float32 model bytes, upper bound of the measured recipes
GB = 1e9


class ResourceError(CompressError):
    """The run would not fit in this machine's memory, disk or GPU memory."""


@dataclass
class Need:
    parameters: int
    memory: float
    disk: float
    gpu: float


def estimate(parameters: int, recipe, hidden_size: int | None, calibrated: bool = True) -> Need:
    activations = 0.0
    if hidden_size and calibrated:
        cal = recipe.calibration
        activations = 2 * cal.samples * cal.seq_len * hidden_size * 4  # the block's inputs and the float stream
    outputs = int(recipe.export.checkpoint) + int(recipe.export.onnx is not None)
    return Need(parameters, parameters * 4 * WORKING_SET + activations, parameters * 2 * outputs,
                parameters * 4 + activations)


def model_size(spec: str) -> tuple[int, int | None] | None:
    """(parameters, hidden size) of MODEL from its files without loading the weights; None when unknown
    (a hub model that is not cached)."""
    from .models import ALIASES, cache_dir, check_spec

    kind = check_spec(spec)
    if kind == "alias":
        folder = cache_dir() / "models" / spec
        if not (folder / "config.json").is_file():
            from .models import packaged_gguf

            return _from_gguf(packaged_gguf(ALIASES[spec][0]))
        return _from_config(folder)
    if kind == "local":
        return _from_config(Path(spec).expanduser())
    if kind == "gguf":
        return _from_gguf(Path(spec).expanduser())
    return None


def _from_config(folder: Path) -> tuple[int, int | None] | None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - a model the loader will refuse with its own message
        return None
    return sum(p.numel() for p in model.parameters()), getattr(config, "hidden_size", None)


def _from_gguf(path: Path) -> tuple[int, int | None]:
    """A rough count from the file size: GGUF weights take 4-8 bits each; assume 4.5 (over-counting is safe)."""
    return int(path.stat().st_size * 8 / 4.5), None


def available_memory() -> float:
    """Bytes the system can give without swapping (Linux MemAvailable); inf where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def free_disk(folder: Path) -> float:
    folder = folder.resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def free_gpu_memory(device) -> float:
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return float(free)


def check_resources(spec: str, recipe, out_dir: Path, device, calibrated: bool = True) -> Need | None:
    """Refuse a run that cannot fit, with the numbers; returns the estimate (None when the size is unknown).
    ``calibrated``: whether a pass reads calibration data (its activations then count)."""
    size = model_size(spec)
    if size is None:
        return None
    need = estimate(size[0], recipe, size[1], calibrated)
    hint = "free some, choose a smaller model, or pass --ignore-resource-check to try anyway"
    have = available_memory()
    if need.memory > have:
        raise ResourceError(f"not enough memory: this run needs about {need.memory / GB:.1f} GB "
                            f"({need.parameters / 1e9:.2f}B parameters held in float32 while compressing), "
                            f"{have / GB:.1f} GB is available", hint)
    disk = free_disk(out_dir.parent)
    if need.disk > disk:
        raise ResourceError(f"not enough disk for {out_dir}: the outputs take up to {need.disk / GB:.1f} GB, "
                            f"{disk / GB:.1f} GB is free", hint)
    if str(device).startswith("cuda"):
        gpu = free_gpu_memory(device)
        if need.gpu > gpu:
            raise ResourceError(f"not enough GPU memory: the model and its activations take about "
                                f"{need.gpu / GB:.1f} GB, {gpu / GB:.1f} GB is free on {device}", hint)
    return need

