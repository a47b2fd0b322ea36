"""Running a model one decoder block at a time: the loop that calibration, the passes that look at a block's
output (``tune``, ``structured``) and evaluation all share.

The model stays where it was loaded (on the CPU, its weights usually memory-mapped views of the checkpoint
files); :func:`on_compute` brings one block to the compute device and dtype for the time it runs and then puts
its original tensors back, so a block's float copy lives only while it is used. Activations (the batches
:func:`capture_block_inputs` returns) live on the CPU; :func:`propagate` moves them through one block.
:func:`after_blocks` runs what follows the last block (final norm, head, any logit scaling) on hidden states
computed this way, through the model's own forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .residency import file_mappings, release_clean_pages, return_freed_heap

COMPUTE_DTYPE = torch.float32


def to_device(obj, device):
    """``obj`` (a tensor, or tuples / lists / dicts of them, as a block's keyword arguments are) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, batch: tuple, device) -> torch.Tensor:
    """The hidden states ``block`` outputs for one captured batch ``(hidden_states, kwargs)``."""
    hidden, kwargs = batch
    out = block(hidden.to(device, COMPUTE_DTYPE), **to_device(kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def _float_or_same(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@contextmanager
def on_compute(module: nn.Module, device, dtype=COMPUTE_DTYPE, skip: tuple[nn.Module, ...] = (),
               keep_changes: bool = False):
    """``module``'s float parameters and buffers on ``device`` in ``dtype`` while the context lasts (a copy only
    where device or dtype differ, the file pages it was made from handed back at once); afterwards the original
    tensors are put back, and the pages of every memory-mapped tensor of the module (compressed layers' codes
    included) handed back to the OS: what a block read from its files does not stay resident after its turn.
    Tensors of ``skip`` (and of modules inside them) are left alone. With ``keep_changes`` (a pass at work), a
    copied tensor whose values changed while the context lasted (a transform rescaling a norm, in place or by a new
    tensor) is kept, cast back to its own dtype and device, instead of the original."""
    skipped = {id(t) for s in skip for t in [*s.parameters(), *s.buffers()]}
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    maps = file_mappings()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen or id(t) in skipped:
            continue
        seen.add(id(t))
        data = t.data
        moved = data.to(device=device, dtype=dtype) if data.is_floating_point() else data.to(device)
        if moved is not data:
            originals.append((t, data))
            t.data = moved
            release_clean_pages([data], maps)
    tracked = _compressed_devices(module)
    for m in tracked:
        m._device, m.compute_dtype = torch.device(device), dtype
    try:
        yield module
    finally:
        for t, data in originals:
            now = t.data
            if keep_changes and not torch.equal(back := now.to(device=data.device, dtype=data.dtype), data):
                t.data = back
            else:
                t.data = data
        for m, (dev, dt) in tracked.items():
            m._device, m.compute_dtype = dev, dt
        del originals
        release_clean_pages([t.data for t in [*module.parameters(), *module.buffers()] if id(t) not in skipped]
                            + [t for m in _compressed_devices(module) for t in m.fmt.tensors().values()])
        return_freed_heap()


def _compressed_devices(module: nn.Module) -> dict:
    from .modules import CompressedLinear

    return {m: (m._device, m.compute_dtype) for m in module.modules() if isinstance(m, CompressedLinear)}


class _Captured(Exception):
    pass


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, chunk: int) -> list[tuple]:
    """Run the model up to the first block on ``tokens`` [n, seq], ``chunk`` sequences at a time, on the CPU;
    return [(hidden_states in the compute dtype, kwargs)] per chunk."""
    captured = []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        kwargs["use_cache"] = False
        captured.append((hidden.detach().to(COMPUTE_DTYPE), kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = input_device(model)
    try:
        for part in tokens.split(chunk):
            try:
                model(input_ids=part.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input embeddings are (token ids go there); the CPU when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get() if callable(get) else None, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


@torch.no_grad()
def propagate(block: nn.Module, inputs: list[tuple], device) -> list[tuple]:
    """Run the block on its inputs; its outputs (with the same kwargs) feed the next block.

    Each chunk is replaced by its outputs in place (kept where its input was), so only one copy of the
    activations is alive at a time. The heap is trimmed before every chunk: the freed temporaries of the pass
    that just ran, and of each chunk's attention and MLP, otherwise leave holes the next outputs do not fit."""
    from .modules import dequantized_weights

    with dequantized_weights(block):  # decode each compressed layer once, not once per chunk
        for k, (hidden, kwargs) in enumerate(inputs):
            return_freed_heap()
            out = run_block(block, (hidden, kwargs), device)
            inputs[k] = (out.detach().to(hidden.device), kwargs)
            del hidden, out
    return inputs


class _Replay(nn.Module):
    """Stands in for a decoder block: the last one returns the hidden states the block loop computed, the
    others pass their input through."""

    def __init__(self, source: list[torch.Tensor] | None, as_tuple: bool):
        super().__init__()
        self.source, self.as_tuple = source, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.source.pop(0).to(hidden_states.device) if self.source is not None else hidden_states
        return (out,) if self.as_tuple else out


@contextmanager
def after_blocks(blocks: nn.ModuleList, hidden: list[torch.Tensor], as_tuple: bool):
    """While the context lasts, a forward of the model on a chunk returns what follows the blocks applied to
    the next of ``hidden`` (in order): the blocks are replaced by stand-ins, and the model's own code runs
    the rest (final norm, head, logit scaling or soft-capping)."""
    originals = list(blocks)
    queue = list(hidden)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Replay(queue if i == len(originals) - 1 else None, as_tuple)
        yield
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


def returns_tuple(block: nn.Module, batch: tuple, device) -> bool:
    """Whether ``block`` returns a tuple (older transformers, GPT-2) rather than the hidden states."""
    hidden, kwargs = batch
    with torch.no_grad():
        out = block(hidden.to(device, COMPUTE_DTYPE), **to_device(kwargs, device))
    return isinstance(out, tuple)
