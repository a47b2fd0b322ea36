"""The pages of replaced weights go back to the OS, and nothing reads garbage afterwards."""

import mmap
import sys

import pytest
import torch
from conftest import compress_copy

from compress.data import calibration_batches, evaluation_windows
from compress.families import find_blocks
from compress.models import resolve
from compress.pipeline import plan, run_passes
from compress.recipe import parse_recipe
from compress.residency import release_clean_pages, release_file_pages, resident_bytes

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


def test_clean_pages_leave_memory_and_changed_pages_stay(smol):
    model, _, _ = resolve("smollm2-135m")
    weight = model.model.layers[7].mlp.down_proj.weight.data
    from_file = weight.clone()
    weight[:288].mul_(2)  # the first half of the rows changed in place, the rest the file's bytes
    expected = weight.clone()
    assert release_clean_pages([weight]) > 0.45 * weight.numel() * 4
    assert 0.45 * weight.numel() * 4 < resident_bytes(weight) < 0.55 * weight.numel() * 4
    assert torch.equal(weight, expected) and torch.equal(weight[288:], from_file[288:])


def test_a_compression_run_gives_back_replaced_weights_and_weights_it_does_not_need_yet(smol):
    model, tok, _ = resolve("smollm2-135m")
    passes = [{"type": "gptq", "bits": 4, "group_size": 64, "targets": ["model.layers.0.*"]}]
    _, blocks = find_blocks(model)
    replaced = [m.weight.data for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    untouched = [m.weight.data for m in blocks[8].modules() if isinstance(m, torch.nn.Linear)]
    embeddings = model.get_input_embeddings().weight.data
    for w in replaced + untouched + [embeddings]:
        w.sum()  # make the pages resident, as an evaluation before compressing does
    calibration = calibration_batches("pydoc", tok, 2, 64, seed=0, heldout_spec="pydoc")
    run_passes(model, plan(parse_recipe({"passes": passes}).passes), calibration, "cpu")
    # reading the next block's first tensor may map up to 16 pages around it (the kernel's fault-around, 64 KB)
    assert all(resident_bytes(w) <= 16 * mmap.PAGESIZE for w in replaced + untouched)
    assert sum(map(resident_bytes, replaced + untouched)) < 0.01 * sum(w.numel() * 4 for w in replaced + untouched)
    assert resident_bytes(embeddings) < 0.01 * embeddings.numel() * 4
    same_on_the_heap = compress_copy(smol[0], passes, calibration)
    x = evaluation_windows("pydoc", tok, 128, 1, "pydoc")
    assert torch.equal(model(x).logits, same_on_the_heap(x).logits)
