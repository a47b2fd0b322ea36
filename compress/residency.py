"""Give back the memory pages of weights the model no longer uses.

Transformers maps a safetensors checkpoint into memory (one private file mapping per file) and the
model's float weights are views of it: a page becomes resident when a pass first reads it, and an
in-place change (AWQ's folded scales) turns it into a private anonymous copy. When a pass replaces a
layer with its compressed form, the old weight's pages stay resident for the life of the mapping,
that is of the whole model: on SmolLM2-135M every block's float weights, 425 MB, pile up during a
GPTQ run. :func:`release_file_pages` hands such pages back (``madvise(MADV_DONTNEED)``); a later
read would fault them in again from the file, so nothing can read garbage.

Only ranges inside a file mapping are touched: the heap (a model loaded from GGUF, or weights a pass
rewrote into fresh tensors) is left to the allocator. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from functools import cache

import torch

MADV_DONTNEED = 4


@cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every mapping of this process backed by a regular file."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":  # inode 0: anonymous
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def release_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drop the resident pages that lie wholly inside ``tensors`` (CPU tensors that are views of a
    file mapping and that nothing will read again). Returns the bytes handed back."""
    madvise = _madvise()
    if madvise is None:
        return 0
    maps = file_mappings()
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not t.is_contiguous() or not any(a <= start and end <= b for a, b in maps):
            continue
        lo, hi = -(-start // page) * page, end // page * page  # whole pages only
        if hi > lo and madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            released += hi - lo
    return released


def resident_bytes(t: torch.Tensor) -> int:
    """Bytes of the whole pages inside CPU tensor ``t`` that are in this process's memory now
    (``/proc/self/pagemap``, bit 63 of each page's entry); -1 where that cannot be read."""
    page = mmap.PAGESIZE
    start = t.data_ptr()
    lo, hi = -(-start // page), (start + t.numel() * t.element_size()) // page
    if hi <= lo:
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo * 8)
            entries = f.read((hi - lo) * 8)
    except OSError:
        return -1
    present = sum(int.from_bytes(entries[i:i + 8], "little") >> 63 for i in range(0, len(entries), 8))
    return present * page
