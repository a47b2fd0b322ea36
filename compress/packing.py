"""Dense bit packing of integer codes, row by row.

Layout (the contract kernels and exporters rely on): each output row of a code matrix
``codes[N, K]`` is packed on its own into ``ceil(K * bits / 8)`` bytes. Code ``k`` of a row
occupies bits ``[k*bits, (k+1)*bits)`` of the row's little-endian bit stream: bit ``j`` of the
stream is bit ``j % 8`` of byte ``j // 8``. A 3-bit code therefore costs 3 bits on disk; the
only waste is the padding to a whole byte at the end of each row.
"""

import torch


def packed_row_bytes(num_codes: int, bits: int) -> int:
    """Bytes one packed row of ``num_codes`` codes of ``bits`` bits takes."""
    return (num_codes * bits + 7) // 8


ROWS_AT_ONCE = 2048  # rows packed or unpacked together: the bit streams in between are 8 bytes per code


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes[N, K]`` (integers in ``[0, 2**bits)``) into uint8 ``[N, ceil(K*bits/8)]``."""
    if codes.dim() == 2 and codes.shape[0] > ROWS_AT_ONCE:
        return torch.cat([pack_rows(part, bits) for part in codes.split(ROWS_AT_ONCE)])
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = codes.to(torch.uint8)
    if codes.dim() != 2:
        raise ValueError("pack_rows expects a 2-D tensor")
    if bits == 8:
        return codes.contiguous()
    rows, k = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits)
    nbytes = packed_row_bytes(k, bits)
    pad = nbytes * 8 - k * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device)).to(torch.uint8)
    return (stream.reshape(rows, nbytes, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 ``[N, bytes]`` -> uint8 codes ``[N, num_codes]``."""
    if packed.shape[0] > ROWS_AT_ONCE and bits != 8:
        return torch.cat([unpack_rows(part, bits, num_codes) for part in packed.split(ROWS_AT_ONCE)])
    if bits == 8:
        return packed[:, :num_codes]
    rows = packed.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : num_codes * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (stream.reshape(rows, num_codes, bits) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_rows` as little-endian int32 words ``[N, ceil(K * bits / 32)]`` (zero padded): the packing of
    the GPTQ and compressed-tensors formats."""
    packed = pack_rows(codes, bits)
    pad = -packed.shape[1] % 4
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.contiguous().view(torch.int32)
