"""Running one decoder block on captured calibration batches: the step the pipeline, its statistics and
the passes that look at a block's output (``tune``, ``structured``) all share."""

from __future__ import annotations

import torch
from torch import nn


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
    out = block(hidden.to(device), **to_device(kwargs, device))
    return out[0] if isinstance(out, tuple) else out
