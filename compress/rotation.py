"""Orthogonal matrices for incoherence processing: randomized Hadamard transforms, and random orthogonal matrices
where no Hadamard construction of the order is known here.

A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``) is built as a Kronecker product of Sylvester's
(orders 2^k) and Paley's first construction (orders ``p + 1`` for a prime ``p = 3 mod 4``: 12, 20, 44, 60, ...);
hidden sizes such as 576 = 12 x 12 x 4 or 3072 = 12 x 256 are covered. The randomized transform is
``H diag(signs) / sqrt(n)`` with random signs (QuIP#, "QuIP#: Even Better LLM Quantization with Hadamard Incoherence
and Lattice Codebooks", Tseng et al., 2024; QuaRot, Ashkboos et al., 2024).
"""

from __future__ import annotations

import torch


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _factors(n: int) -> list[int] | None:
    """Orders whose Hadamard matrices' Kronecker product has order ``n`` (powers of two and Paley orders), or None."""
    if n & (n - 1) == 0:
        return [n]
    for d in range(12, n + 1, 4):
        if n % d == 0 and _is_prime(d - 1) and (d - 1) % 4 == 3:
            rest = _factors(n // d)
            if rest is not None:
                return [d, *rest]
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (float64, entries +-1), or None when no construction here builds it."""
    factors = _factors(n)
    if factors is None:
        return None
    out = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        if f & (f - 1) == 0:
            h = torch.ones(1, 1, dtype=torch.float64)
            while h.shape[0] < f:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        else:
            h = _paley(f - 1)
        out = torch.kron(out, h)
    return out


def random_rotation(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """(an orthogonal ``n x n`` float64 matrix, what it is): a randomized Hadamard transform when a Hadamard matrix
    of order ``n`` is built here, else a random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return h * signs / n ** 0.5, "randomized Hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "random orthogonal"
