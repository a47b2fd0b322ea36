"""The pages of replaced weights go back to the OS, and nothing reads garbage afterwards."""

import mmap
import sys

import pytest
import torch
from conftest import FIRST_BLOCKS, compress_copy

from compress.data import evaluation_windows
from compress.models import resolve
from compress.pipeline import find_blocks, plan, run_passes
from compress.recipe import parse_recipe
from compress.residency import release_file_pages, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise are Linux's")


def test_released_pages_leave_memory_and_read_back_from_the_checkpoint(smol):
    model, _, _ = resolve("smollm2-135m")  # its own mapping of the checkpoint, not the shared fixture's
    weight = model.model.layers[5].mlp.up_proj.weight.data
    from_file = weight.clone()
    weight.mul_(2)  # an in-place change, as AWQ's folding makes: private copies of the pages
    assert resident_bytes(weight) > 0.9 * weight.numel() * 4
    released = release_file_pages([weight])
    assert released > 0.9 * weight.numel() * 4
    assert resident_bytes(weight) == 0
    # a late read faults the file's pages back in; only the partial pages at the two ends keep the change
    kept_change = weight != from_file
    assert kept_change.sum() < 2 * mmap.PAGESIZE / 4
    assert torch.equal(weight[kept_change], 2 * from_file[kept_change])
    heap = from_file.clone()
    assert release_file_pages([heap]) == 0 and torch.equal(heap, from_file)


def test_a_compression_run_gives_back_the_float_weights_it_replaced(smol):
    model, _, _ = resolve("smollm2-135m")
    passes = [{"type": "rtn", "bits": 4, "group_size": 64, "targets": FIRST_BLOCKS}]
    _, blocks = find_blocks(model)
    replaced = [m.weight.data for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    kept = [m.weight.data for m in blocks[8].modules() if isinstance(m, torch.nn.Linear)]
    for w in replaced + kept:
        w.sum()  # make the pages resident, as a forward would
    run_passes(model, plan(parse_recipe({"passes": passes}).passes), None, "cpu")
    assert sum(map(resident_bytes, replaced)) == 0
    assert sum(map(resident_bytes, kept)) > 0.9 * sum(w.numel() * 4 for w in kept)
    same_on_the_heap = compress_copy(smol[0], passes, None)
    x = evaluation_windows("pydoc", smol[1], 128, 1, "pydoc")
    assert torch.equal(model(x).logits, same_on_the_heap(x).logits)
