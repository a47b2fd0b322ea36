"""Whether a pass's training steps run under bfloat16 autocast.

bfloat16 cuts the cost of a forward and backward only where the hardware multiplies bfloat16 natively: CUDA GPUs
that support it, CPUs with AMX or AVX512-BF16. Elsewhere (an AVX2-only CPU) torch emulates it and the same steps run
many times slower than in float32. ``"auto"`` (the training passes' default) therefore measures it once per process
and device type: bfloat16 is used when a small matmul under bfloat16 autocast takes well under
its float32 time.
"""

from __future__ import annotations

import functools
import time
from contextlib import AbstractContextManager
from typing import Literal

import torch

Bfloat16Setting = bool | Literal["auto"]
FASTER = 0.8  # bfloat16 counts as fast when it takes under this share of float32's time


def uses_bfloat16(setting: Bfloat16Setting, device) -> bool:
    """``setting`` resolved on ``device``: True/False as given, ``"auto"`` by :func:`bfloat16_is_fast`."""
    return setting if isinstance(setting, bool) else bfloat16_is_fast(torch.device(device).type)


def bfloat16_autocast(setting: Bfloat16Setting, device) -> AbstractContextManager:
    """The autocast context for a training step on ``device`` (a no-op when bfloat16 is not used)."""
    kind = torch.device(device).type
    return torch.autocast(kind, torch.bfloat16, enabled=uses_bfloat16(setting, device))


@functools.cache
def bfloat16_is_fast(device_type: str) -> bool:
    """Whether bfloat16 autocast speeds up training on ``device_type`` (measured once per process on a CPU)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return _seconds(True) < FASTER * _seconds(False)


def _seconds(bfloat16: bool, tokens: int = 128, width: int = 512, reps: int = 3) -> float:
    """The best of ``reps`` timings of one ``[tokens, width] @ [width, width]`` matmul under (or without) bfloat16
    autocast, the weight cast as autocast casts a layer's."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator)
    w = torch.randn(width, width, generator=generator)
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bfloat16):
        for _ in range(reps + 1):  # the first warms up
            start = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - start)
    return best
