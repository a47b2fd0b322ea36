"""NormalFloat-4 weights in onnxruntime's bitsandbytes kernel, ``com.microsoft::MatMulBnb4``.

The kernel's NF4 code book is QLoRA's (Dettmers et al., 2023), the one ``compress.quant`` builds (equal to
float32 rounding), and it scales each block of consecutive weights of a row by its absmax: exactly our ``nf``
grid with a group size that is a power of two of at least 16 dividing the row. The file keeps 4 bits per
weight plus a float32 absmax per block; the session keeps the same bytes and decodes a layer's weight on every
call (slower than MatMulNBits, never folded to float32 in memory).
"""

from __future__ import annotations

import torch

from .onnx_ops import MS_DOMAIN

NF4 = 1  # MatMulBnb4's quant_type for NormalFloat (0: its own FP4, not E2M1)


def nf4_matmul(lowering, x: str, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
               name: str) -> tuple[str, str] | None:
    """(description, ``x @ W.T``) for ``W = nf4[codes] * scales`` (codes uint8 ``[out, in]``, scales ``[out, groups]``),
    or None when the group size is not a block the kernel reads."""
    rows, cols = codes.shape
    if group_size < 16 or group_size & (group_size - 1) or cols % group_size:
        return None
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = (flat[0::2] << 4) | flat[1::2]  # first weight in the high nibble
    g = lowering.g
    y = g.op("MatMulBnb4", x, g.tensor(f"{name}.nf4_codes", packed.numpy()),
             g.tensor(f"{name}.absmax", scales.float().reshape(-1).numpy()), domain=MS_DOMAIN, K=cols, N=rows,
             block_size=group_size, quant_type=NF4)
    return f"MatMulBnb4 NF4 block {group_size}", y
