"""Resources checked before work: a run's memory, disk and GPU memory are estimated from the model's size
before it is loaded, and a run that cannot fit is refused with the numbers (``--ignore-resource-check`` runs it
anyway).

The estimate follows how a run holds the model: its files are memory-mapped and one decoder block at a time
is brought to float32 (``blocks.on_compute``), so memory is the process itself, a few float32 copies of one
block (the block, its compressed form decoded, a pass's work), the largest layer's Hessian and its factor, the
calibration activations (the blocks' inputs and the float model's), the head in float32 and a batch of logits
while evaluating; a pass that trains through the whole model (``peqa``) holds the whole model decoded in float32
for its backward, one sequence's activations and logits, and the teacher's top-k. Where the blocks cannot be
counted (a GGUF before its conversion) the whole model is counted in float32. Disk: the finished blocks staged
beside the output, and each written format (at most the float16 model each).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError

PROCESS = 1.0e9        # Python, torch, transformers and onnxruntime with nothing loaded
SOLVE_BLOCK_COPIES = 2  # float32 copies of one block alive while its layers are solved (the block, the scratch)
HESSIAN_COPIES = 3     # the widest Hessian: a float64 sum (two float32 sizes) while the float32 mean settles,
                       # then the solve's permuted copy and factor
MARGIN = 1.15          # on what the phases hold: allocator slack, resident pages of the memory-mapped files
WHOLE_MODEL = 4.5      # peak RSS / float32 model bytes where blocks are unknown
TUNE_MODEL_COPIES = 3  # whole-model training: the float32 weights decoded from the formats, the decode's saved
                       # intermediates for the backward, and (with adapters) the stored weights decoded once
TUNE_FLOATS_PER_TOKEN = 40  # per block and hidden channel: the activations one sequence keeps for the backward
TEACHER_BYTES_PER_TOKEN = 8  # per position and kept token: an int32 token id and a float32 log-prob
GB = 1e9


class ResourceError(CompressError):
    """The run would not fit in this machine's memory, disk or GPU memory."""


@dataclass
class Need:
    parameters: int
    memory: float
    disk: float
    gpu: float


@dataclass
class ModelSize:
    """What the estimate reads of a model, from its config alone."""

    parameters: int
    hidden: int | None = None
    block_parameters: int | None = None  # of one decoder block; None: unknown
    widest_input: int = 0                # the largest in_features of a block's linear layers
    head_parameters: int = 0
    vocab: int = 0


def estimate(size: ModelSize, recipe, calibrated: bool = True, teacher_top_k: int = 0) -> Need:
    """``teacher_top_k``: a pass trains through the whole model against a teacher keeping that many tokens per
    position (:attr:`Requirements.teacher_top_k`; 0: none does)."""
    outputs = int(recipe.export.checkpoint) + int(recipe.export.onnx is not None)
    disk = size.parameters * 2 * (outputs + 1)  # + the staged blocks
    activations = 0.0
    if size.hidden and calibrated:
        cal = recipe.calibration
        activations = 2 * cal.samples * cal.seq_len * size.hidden * 4  # the blocks' inputs and the float stream
    if size.block_parameters is None:
        memory = size.parameters * 4 * WHOLE_MODEL + activations
        return Need(size.parameters, memory, disk, size.parameters * 4 + activations)
    # the two phases that peak, never at once: solving a block's layers, and evaluating (one block at a time
    # through the model, then the head in float32 over a window's logits)
    ev = recipe.evaluate
    block = size.block_parameters * 4
    hessian = HESSIAN_COPIES * size.widest_input ** 2 * 4 if calibrated else 0
    solve = SOLVE_BLOCK_COPIES * block + hessian + activations
    evaluation = (block + size.head_parameters * 4 + ev.max_windows * ev.seq_len * (size.hidden or 0) * 4 +
                  3 * 2 * ev.seq_len * size.vocab * 4)
    tuning = 0.0
    if teacher_top_k and calibrated:
        cal, blocks = recipe.calibration, max(1, (size.parameters - size.head_parameters) // size.block_parameters)
        tuning = (TUNE_MODEL_COPIES * size.parameters * 4 + activations +
                  TUNE_FLOATS_PER_TOKEN * cal.seq_len * (size.hidden or 0) * blocks * 4 +
                  4 * cal.seq_len * size.vocab * 4 +
                  cal.samples * cal.seq_len * teacher_top_k * TEACHER_BYTES_PER_TOKEN)
    phases = MARGIN * max(solve, evaluation, tuning)
    return Need(size.parameters, PROCESS + phases, disk, phases)


def model_size(spec: str) -> ModelSize | None:
    """The size of MODEL from its files without loading the weights; None when unknown (a hub model that is
    not cached)."""
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


def _from_config(folder: Path) -> ModelSize | None:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families import find_blocks

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _, blocks = find_blocks(model)
    except Exception:  # noqa: BLE001 - a model the loader will refuse with its own message
        return None
    head = model.get_output_embeddings()
    return ModelSize(parameters=sum(p.numel() for p in model.parameters()),
                     hidden=getattr(config, "hidden_size", None),
                     block_parameters=sum(p.numel() for p in blocks[0].parameters()),
                     widest_input=max(m.in_features for m in blocks[0].modules() if isinstance(m, nn.Linear)),
                     head_parameters=head.weight.numel() if head is not None else 0,
                     vocab=getattr(config, "vocab_size", 0) or 0)


def _from_gguf(path: Path) -> ModelSize:
    """A rough count from the file size: GGUF weights take 4-8 bits each; assume 4.5 (over-counting is safe)."""
    return ModelSize(int(path.stat().st_size * 8 / 4.5))


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


def check_resources(spec: str, recipe, out_dir: Path, device, calibrated: bool = True,
                    teacher_top_k: int = 0) -> Need | None:
    """Refuse a run that cannot fit, with the numbers; returns the estimate (None when the size is unknown).
    ``calibrated``: whether a pass reads calibration data (its activations then count); ``teacher_top_k``: the largest
    teacher a pass that trains through the whole model keeps (0: none does)."""
    size = model_size(spec)
    if size is None:
        return None
    need = estimate(size, recipe, calibrated, teacher_top_k)
    hint = "free some, choose a smaller model, or pass --ignore-resource-check to try anyway"
    have = available_memory()
    if need.memory > have:
        how = "the whole model trained in float32" if teacher_top_k else "one block at a time in float32"
        raise ResourceError(f"not enough memory: this run needs about {need.memory / GB:.1f} GB "
                            f"({need.parameters / 1e9:.2f}B parameters, {how}), {have / GB:.1f} GB is available", hint)
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

