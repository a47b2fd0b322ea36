"""Checkpoints cannot load wrong: every tensor's hash and every compressed layer's layout are checked when a
checkpoint is read (compress.load, eval, export, generate), on a real SmolLM2 checkpoint."""

import json
import shutil

import pytest
import torch
from conftest import cli

import compress
from compress.checkpoint import META, WEIGHTS, save_checkpoint
from compress.errors import CheckpointError

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def checkpoint(smol, rtn_first_block, tmp_path_factory):
    """4-bit RTN on the first block (data-free), saved as a checkpoint, with the logits it computes."""
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(rtn_first_block, smol[1], folder, "float16")
    tok = smol[1]
    loaded, _ = compress.load(folder)
    ids = tok("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    return folder, ids, logits


def damaged_copy(checkpoint, tmp_path, edit_meta=None, flip_byte_of=None):
    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint[0], folder)
    if edit_meta is not None:
        meta = json.loads((folder / META).read_text())
        edit_meta(meta)
        (folder / META).write_text(json.dumps(meta))
    if flip_byte_of is not None:
        raw = bytearray((folder / WEIGHTS).read_bytes())
        header = 8 + int.from_bytes(raw[:8], "little")
        start = json.loads(raw[8:header])[flip_byte_of]["data_offsets"][0]
        raw[header + start] ^= 0x10
        (folder / WEIGHTS).write_bytes(bytes(raw))
    return folder


def test_a_clean_checkpoint_is_verified_and_loads_exactly(checkpoint):
    folder, ids, logits = checkpoint
    meta = json.loads((folder / META).read_text())
    assert len(meta["tensor_sha256"]) > 200 and f"{LAYER}.codes" in meta["tensor_sha256"]
    model, _ = compress.load(folder)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_metadata_that_disagrees_with_the_tensors_is_refused_naming_the_layer(checkpoint, tmp_path):
    """The silent defect of issue 24: one layer's bits changed from 4 to 3 by hand."""
    folder = damaged_copy(checkpoint, tmp_path, edit_meta=lambda m: m["layers"][LAYER].update(bits=3))
    with pytest.raises(CheckpointError, match=f"layer {LAYER}: tensor codes is uint8 \\[1536, 288\\], its metadata "
                                              "says uint8 \\[1536, 216\\]"):
        compress.load(folder)
    result = cli("eval", folder, "--max-windows", 1, "--seq-len", 64)
    assert result.exit_code == 2 and f"layer {LAYER}" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("edit", [
    lambda m: m["layers"][LAYER].update(kind="palette"),           # another format
    lambda m: m["layers"][LAYER].pop("group_size"),                 # incomplete metadata
    lambda m: m["layers"][LAYER].update(group_size=0),              # impossible value
    lambda m: m["layers"][LAYER].update(shape=[1536, 577]),         # shape
])
def test_other_metadata_damage_is_refused(checkpoint, tmp_path, edit):
    with pytest.raises(CheckpointError, match=f"layer {LAYER}"):
        compress.load(damaged_copy(checkpoint, tmp_path, edit_meta=edit))


def test_a_changed_tensor_byte_fails_its_hash_and_no_verify_skips_the_check(checkpoint, tmp_path):
    folder = damaged_copy(checkpoint, tmp_path, flip_byte_of=f"{LAYER}.scales")
    with pytest.raises(CheckpointError, match=f"tensor {LAYER}.scales does not match the hash"):
        compress.load(folder)
    result = cli("eval", folder, "--max-windows", 1, "--seq-len", 64)
    assert result.exit_code == 2 and "does not match the hash" in result.stderr
    model, _ = compress.load(folder, verify=False)  # asked for: loads, computing with the changed scale
    with torch.no_grad():
        assert not torch.equal(model(input_ids=checkpoint[1]).logits, checkpoint[2])


def test_missing_hashes_are_refused(checkpoint, tmp_path):
    folder = damaged_copy(checkpoint, tmp_path, edit_meta=lambda m: m.pop("tensor_sha256"))
    with pytest.raises(CheckpointError, match="does not list the hash of every tensor"):
        compress.load(folder)
