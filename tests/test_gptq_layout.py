"""The GPTQ format's bytes, checked against the layout AutoGPTQ / GPTQModel document (``compress.export.gptq``):
small grids, no model."""

import pytest
import torch

from compress.export.gptq import decode_layer, layer_tensors
from compress.formats.base import IntegerGrid


def _grid(bits, rows=64, cols=128, group=32, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = cols // group
    zeros = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8) if symmetric else \
        torch.randint(1, 1 << bits, (rows, groups), generator=g, dtype=torch.uint8)
    return IntegerGrid(codes=torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8),
                       scales=(torch.rand(rows, groups, generator=g) / 8 + 1e-3).half(), zeros=zeros, bits=bits,
                       group_size=group, symmetric=symmetric)


def _ours(grid):
    g = torch.arange(grid.codes.shape[1]) // grid.group_size
    return (grid.codes.long() - grid.zeros.long()[:, g]).float() * grid.scales.float()[:, g]


def test_three_bit_values_straddle_words_as_documented():
    """3 bits: values 0-9 fill bits 0-29 of word 0, value 10 takes word 0's bits 30-31 and word 1's bit 0, value 21
    word 1's bit 31 and word 2's bits 0-1 (32 values in 3 words)."""
    grid = _grid(3, rows=32, cols=32)
    grid.codes.zero_()
    grid.codes[0, 10] = 0b101
    grid.codes[1, 21] = 0b011
    q = layer_tensors(grid, v2=False)["qweight"]  # [in * 3 / 32, out] = [3, 32]
    assert q.shape == (3, 32) and q.dtype == torch.int32
    w = q.to(torch.int64) & 0xFFFFFFFF
    assert w[0, 0] == 0b01 << 30 and w[1, 0] == 0b1 and w[2, 0] == 0
    assert w[0, 1] == 0 and w[1, 1] == 0b1 << 31 and w[2, 1] == 0b01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_decoded_weights_are_ours_bit_for_bit(bits, symmetric):
    grid = _grid(bits, symmetric=symmetric)
    t = layer_tensors(grid, v2=False)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (4, 64 * bits // 32)
    assert t["scales"].shape == (4, 64) and t["g_idx"].tolist() == [k // 32 for k in range(128)]
    got = decode_layer(t, {"bits": bits, "checkpoint_format": "gptq"}, (64, 128))
    assert torch.equal(got, _ours(grid))


def test_v1_zero_points_are_stored_minus_one_and_v2_as_they_are():
    grid = _grid(4, symmetric=True)
    assert (layer_tensors(grid, v2=False)["qzeros"] == 0x77777777).all()  # zero 8 stored as 7
    assert (layer_tensors(grid, v2=True)["qzeros"] == -0x77777778).all()  # 0x88888888 as int32
    grid.zeros[3, 1] = 0  # asymmetric group with zero 0: only v2 holds it
    got = decode_layer(layer_tensors(grid, v2=True), {"bits": 4, "checkpoint_format": "gptq_v2"}, (64, 128))
    assert torch.equal(got, _ours(grid))
