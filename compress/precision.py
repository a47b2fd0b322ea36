"""Whether a pass's training steps run under bfloat16 autocast.

bfloat16 cuts the cost of a forward and backward only where the hardware multiplies bfloat16 natively: CUDA GPUs
that support it, CPUs with AMX or AVX512-BF16. Elsewhere (an AVX2-only CPU) torch emulates it and the same steps run
many times slower than in float32. ``"auto"`` (the training passes' default) therefore reads an x86 CPU's feature
flags (as torch reports them) and elsewhere measures once per process: bfloat16 is used when a small bfloat16 matmul
takes well under its float32 time. On x86 the flags decide because a timing proved fragile: inside a long run's
process it once judged an AMX CPU slow, and float32 training followed.
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
    """Whether bfloat16 autocast speeds up training on ``device_type`` (once per process)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    native = _x86_bfloat16_instructions()
    if native is not None:
        return native
    bfloat16, float32 = _best_seconds()
    return bfloat16 < FASTER * float32


def _x86_bfloat16_instructions() -> bool | None:
    """On x86, whether the CPU has bfloat16 matrix or dot-product instructions (AMX-BF16, AVX512-BF16), as torch
    reads them; None elsewhere (ARM, other CPUs), where only a measurement tells."""
    capabilities: dict = getattr(torch.cpu, "get_capabilities", dict)()
    if capabilities.get("architecture") != "x86_64":
        return None
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def _best_seconds(tokens: int = 128, width: int = 512, rounds: int = 6) -> tuple[float, float]:
    """The best of ``rounds`` timings of one ``[tokens, width] @ [width, width]`` matmul in bfloat16 and in float32,
    alternated, into buffers made beforehand (the casts and the output's allocation are not timed)."""
    generator = torch.Generator().manual_seed(0)
    operands = {dtype: (torch.randn(tokens, width, generator=generator).to(dtype),
                        torch.randn(width, width, generator=generator).to(dtype),
                        torch.empty(tokens, width, dtype=dtype)) for dtype in (torch.bfloat16, torch.float32)}
    best = dict.fromkeys(operands, float("inf"))
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up
            for dtype, (x, w, out) in operands.items():
                start = time.perf_counter()
                torch.matmul(x, w, out=out)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16], best[torch.float32]
