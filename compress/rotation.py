"""Orthogonal matrices for incoherence processing: randomized Hadamard transforms, and random orthogonal matrices
where no Hadamard construction of the order is known here.

A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``) is built as a Kronecker product of Sylvester's
(orders 2^k) and Paley's first construction (orders ``p + 1`` for a prime ``p = 3 mod 4``: 12, 20, 44, 60, ...);
hidden sizes such as 576 = 12 x 12 x 4 or 3072 = 12 x 256 are covered. The randomized transform is
``H diag(signs) / sqrt(n)`` with random signs (QuIP#, "QuIP#: Even Better LLM Quantization with Hadamard Incoherence
and Lattice Codebooks", Tseng et al., 2024; QuaRot, Ashkboos et al., 2024).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


@functools.lru_cache(maxsize=8)
def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard_factors(n: int) -> list[int] | None:
    """Orders whose Hadamard matrices' Kronecker product has order ``n`` (powers of two and Paley orders), or None."""
    if n & (n - 1) == 0:
        return [n]
    for d in range(12, n + 1, 4):
        if n % d == 0 and _is_prime(d - 1) and (d - 1) % 4 == 3:
            rest = hadamard_factors(n // d)
            if rest is not None:
                return [d, *rest]
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (float64, entries +-1), or None when no construction here builds it."""
    factors = hadamard_factors(n)
    return None if factors is None else _kron(factors)


def _kron(factors: list[int]) -> torch.Tensor:
    """The Kronecker product of the Hadamard matrices of orders ``factors`` (Sylvester's or Paley's)."""
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


MAX_DENSE_FACTOR = 256  # the largest Paley factor the online transform multiplies densely


@dataclass(frozen=True)
class OnlineHadamard:
    """A randomized Hadamard transform applied to a layer's input at run time, ``x -> x Q`` with ``Q = diag(signs)
    H / sqrt(n)`` (QuaRot's online Hadamard before the down projection: the activations it reads are made
    incoherent too, which no folded rotation can do across the MLP's nonlinearity). The layer stores ``W Q``, so
    ``(x Q)(W Q)^T = x W^T``. Computed from H's Kronecker factors without forming ``H``: a fast Walsh-Hadamard
    transform (butterflies, ``n log n``) for each power-of-two factor, a small dense product for a Paley factor.

    ``n`` must have a Hadamard matrix here (:func:`hadamard`); the signs come from ``seed``."""

    order: int
    seed: int

    def __post_init__(self):
        factors = hadamard_factors(self.order)
        if factors is None or any(f & (f - 1) and f > MAX_DENSE_FACTOR for f in factors):
            raise ValueError(f"no Hadamard matrix of order {self.order} is built here from a power of two and Paley "
                             f"factors of at most {MAX_DENSE_FACTOR} (12, 20, 32, 44, 60, ...)")

    @functools.cached_property
    def _signs(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, 2, (self.order,), generator=gen).to(torch.float64) * 2 - 1

    def signs(self) -> torch.Tensor:
        """The random signs (float64), drawn once per transform: every forward reads them."""
        return self._signs

    def matrix(self) -> torch.Tensor:
        """``Q`` as a dense float64 matrix (to fold into the layer's weight; tests)."""
        h = hadamard(self.order)
        assert h is not None  # __post_init__
        return self.signs().unsqueeze(1) * h / self.order ** 0.5

    @functools.cached_property
    def _factors(self) -> list[int]:
        factors = hadamard_factors(self.order)
        assert factors is not None  # __post_init__
        return factors

    def factors(self) -> list[int]:
        """The Kronecker factors of ``H``, in order (powers of two and Paley orders)."""
        return list(self._factors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x Q`` over the last axis of ``x``, in ``x``'s dtype and device."""
        lead = x.shape[:-1]
        y = (x * self.signs().to(x.device, x.dtype)).reshape(-1, *self.factors())
        for axis, f in enumerate(self.factors(), start=1):
            y = y.movedim(axis, -1)
            y = _walsh_hadamard(y) if f & (f - 1) == 0 else y @ _paley(f - 1).to(y.device, y.dtype)
            y = y.movedim(-1, axis)
        return (y / self.order ** 0.5).reshape(*lead, self.order)

    def meta(self) -> dict:
        return {"kind": "hadamard", "order": self.order, "seed": self.seed}

    def onnx_apply(self, g, x: str) -> str:
        """``x Q`` in the ONNX graph ``g`` (``compress.export.graph.Graph``) for ``x`` [batch, seq, n], in standard
        ops: ``H = H_a (x) H_b`` split in two Kronecker factors (a Paley factor and the rest, or a power of two in
        two halves), so ``x H`` is ``H_a^T X H_b`` on ``x`` seen as ``[a, b]``: two small matmuls, ``n (a + b)``
        multiply-adds instead of ``n^2``, no ``n x n`` matrix stored."""
        import numpy as np

        factors = self.factors()
        if len(factors) == 1:  # one power of two: Sylvester's H of 2^k is H of 2^i (x) H of 2^(k-i)
            a = 1 << (factors[0].bit_length() - 1) // 2
            first, rest = [a], [factors[0] // a]
        else:
            first, rest = factors[:1], factors[1:]
        a, b = int(np.prod(first)), int(np.prod(rest))
        h_a, h_b = (_kron(fs).numpy().astype(np.float32) for fs in (first, rest))
        scaled = g.op("Mul", x, g.const((self.signs() / self.order ** 0.5).numpy(), np.float32))
        blocks = g.op("Reshape", scaled, g.const([0, 0, a, b]))
        mixed = g.op("MatMul", g.const(np.ascontiguousarray(h_a.T), np.float32), g.op("MatMul", blocks,
                                                                                       g.const(h_b, np.float32)))
        return g.op("Reshape", mixed, g.const([0, 0, self.order]))


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last axis for Sylvester's ``H`` of order ``n = 2^k``: k butterfly passes, the halves of
    each block becoming their sum and difference (``[a, b] [[h, h], [h, -h]] = [(a + b) h, (a - b) h]``)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    half = n // 2
    while half >= 1:
        y = y.reshape(y.shape[0], n // (2 * half), 2, half)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        half //= 2
    return y.reshape(*lead, n)
