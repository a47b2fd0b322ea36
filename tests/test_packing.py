import pytest
import torch

from compress.packing import pack_rows, packed_row_bytes, unpack_rows


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 130), (192, 577), (1536, 576)])
def test_pack_round_trip_every_width_and_odd_shape(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack_rows(packed, bits, shape[1]), codes)


def test_three_bit_codes_take_three_bits():
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    assert pack_rows(codes, 3).numel() == 4 * 64 * 3 // 8


def test_bit_layout_is_little_endian_stream():
    # codes 1..4 at 3 bits: stream 100 010 110 001 (LSB first) -> bytes 0b11010001, 0b00001000
    packed = pack_rows(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 3)
    assert packed.tolist() == [[0b11010001, 0b00001000]]


def test_codes_out_of_range_are_rejected():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(2, 2, dtype=torch.uint8), 0)
