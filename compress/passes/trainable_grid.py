"""Stored weights whose values train (the ``tune``, ``peqa`` and ``l4q`` passes), codes fixed.

An integer grid (:class:`TrainableGrid`) trains each group
scale as ``stored * exp(t)``, and optionally the zero points of an asymmetric grid, moved by straight-through
rounding (the forward uses the rounded zero point, the gradient passes as if it were not rounded), so what trains is
always a value the format stores exactly.

With a low-rank adapter (``rank``, int grids only) the codes move too: the weight is the stored one plus ``B @ A``,
quantized again onto the grid with the current scales and zero points in every forward (straight-through
rounding), as in L4Q; ``B`` starts at zero, so the first forward gives the stored codes back. What the forward
computes is then always what :meth:`TrainableGrid.result` stores: the adapter is merged into the codes, exactly.

A vector code book (:class:`TrainableCodebook`) trains its entries and its row scales.

Between continuous steps, :meth:`TrainableWeight.move_codes` takes PV-Tuning's discrete step: with the values held,
the codes a quadratic model of the loss favours most move to that model's minimum (integer grids and code books;
other grids keep their codes)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import PlanError
from ..formats import QuantizedWeight, VectorWeight, WeightFormat
from ..formats.base import NotAnIntegerGrid
from ..formats.vector import stored_books
from ..kquants import ktype
from ..modules import CompressedEmbedding, CompressedLinear
from ..packing import pack_rows
from ..quant import decode, pad_to_groups


class TrainableWeight:
    """A stored format whose values train, and the modules computing with it (a tied table: the head and the
    embedding). ``log_factor`` scales its stored scales by ``exp(t)``; :meth:`value_parameters` are the other
    values it trains; :meth:`weight` is the float32 weight they give, :meth:`result` the format storing them."""

    fmt: WeightFormat
    modules: list
    log_factor: nn.Parameter
    zero_shift: nn.Parameter | None = None

    def adapter_parameters(self) -> list[nn.Parameter]:
        return []

    def value_parameters(self) -> list[nn.Parameter]:
        return []

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError

    def move_codes(self, grad: torch.Tensor, curvature: torch.Tensor, share: float) -> int:
        """The discrete step of "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression"
        (Malinovskii et al., 2024), with the values held. The loss around the current weight is modelled as
        ``<g, dw> + lam/2 sum F dw^2``, ``g`` its gradient in the float weight and ``F`` (``curvature``) a diagonal
        curvature (the gradients' mean square over sequences: the empirical Fisher, which grows with a column's
        input energy as the true curvature does). Each code (a weight's; a vector's) goes to the one minimizing
        that model, ``lam`` chosen as the smallest for which no more than ``share`` of all codes change: the codes
        whose move the model favours most (each code moves at any ``lam`` below its own ``threshold``, so ``lam``
        is set just above the threshold that ranks one past the ``share``). Returns how many moved (0 where this
        format's codes cannot)."""
        limit = int(share * self.codes_count())
        if limit < 1:
            return 0
        with torch.no_grad():
            model = self.code_model(grad, curvature.clamp_min(float(curvature.mean()) * 1e-6 + 1e-30))
            if model is None:
                return 0
            best, threshold, lam0 = model
            lam = lam0 * math.exp(-LAMBDA_RANGE)
            if threshold.numel() > limit:  # just above the (limit + 1)-th largest threshold (its rounding's width)
                kth = float(threshold.flatten().kthvalue(threshold.numel() - limit).values) * (1 + 1e-5)
                lam = min(max(kth, lam), lam0 * math.exp(LAMBDA_RANGE))
            codes, gain = best(lam)
            return self.take_codes(codes, gain > 0)

    def codes_count(self) -> int:
        return 0

    def code_model(self, grad: torch.Tensor, curvature: torch.Tensor):
        """``(best, threshold, lam0)``: ``best(lam)`` gives each code's model minimum and its gain (the model's
        decrease), ``threshold`` each code's largest ``lam`` at which it still moves (0: it cannot), ``lam0`` a
        typical ``lam``; None where the codes cannot move."""
        return None

    def take_codes(self, codes: torch.Tensor, where: torch.Tensor) -> int:
        raise NotImplementedError

    def code_state(self):
        """What :meth:`move_codes` changes, to put back with :meth:`set_code_state`."""
        return None

    def set_code_state(self, state) -> None:
        pass

    def install(self) -> None:
        """Point the modules' forwards at :meth:`weight` for the next step."""
        w = self.weight()
        for m in self.modules:
            m._cached_weight = w.to(m.compute_dtype)

    def uninstall(self) -> None:
        for m in self.modules:
            m._cached_weight = None

    def put(self, fmt) -> None:
        """Make ``fmt`` the modules' weight (kept shared by a tied pair)."""
        self.uninstall()
        for m in self.modules:
            m.fmt = fmt


class TrainableGrid(TrainableWeight):
    """One :class:`QuantizedWeight` and the modules computing with it."""

    fmt: QuantizedWeight

    def __init__(self, fmt: QuantizedWeight, modules: list[CompressedLinear | CompressedEmbedding], device,
                 zeros: bool = False, rank: int = 0):
        self.fmt, self.modules = fmt, modules
        codes, scale, zero = fmt.unpacked()
        out, k = fmt.shape
        self.gs = fmt.spec.group_size or k
        self.codes = pad_to_groups(codes, self.gs).reshape(out, -1, self.gs).to(device)
        self.scale = scale.to(device)
        self.zero = zero.to(device) if zero is not None else None
        self.log_factor = nn.Parameter(torch.zeros_like(self.scale))
        self.zero_shift = nn.Parameter(torch.zeros_like(self.scale)) if zeros and fmt.spec.has_zeros else None
        self.lora_a = self.lora_b = None
        self.moved = False  # whether move_codes changed the codes
        if rank and fmt.spec.grid == "int":
            g = torch.Generator().manual_seed(out * 7919 + k)
            self.lora_a = nn.Parameter((torch.randn(rank, k, generator=g) / k ** 0.5).to(device))
            self.lora_b = nn.Parameter(torch.zeros(out, rank, device=device))
            self.base = decode(self.codes, self.scale, self.zero, fmt.spec)  # the stored weight, grouped

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a, self.lora_b] if self.lora_a is not None and self.lora_b is not None else []

    def codes_count(self) -> int:
        return self.codes.numel()

    def code_model(self, grad: torch.Tensor, curvature: torch.Tensor):
        if self.fmt.spec.grid != "int" or self.lora_a is not None:
            return None
        as_codes = lambda t: pad_to_groups(t.to(self.codes.device, torch.float32), self.gs).reshape(self.codes.shape)  # noqa: E731
        g, f = as_codes(grad), as_codes(curvature)
        s, now = self.scales().detach().unsqueeze(-1), self.codes.float()
        g_level, f_level = g * s, f * s.square()  # the model in grid levels: dw = s dc

        def best(lam: float):
            codes = (now - g_level / (lam * f_level)).round().clamp(0, self.fmt.spec.maxq)
            dc = codes - now
            return codes, -(g_level * dc + lam / 2 * f_level * dc.square())

        # a code moves while one level against its gradient pays (|g| > lam f / 2), where the grid has that level
        free = torch.where(g_level > 0, now > 0, now < self.fmt.spec.maxq)
        threshold = torch.where(free, 2 * g_level.abs() / f_level, 0.0)
        return best, threshold, float(2 * g_level.abs().mean() / f_level.mean())  # lam0: one level pays, typically

    def take_codes(self, codes: torch.Tensor, where: torch.Tensor) -> int:
        self.codes = torch.where(where, codes, self.codes.float()).to(self.codes.dtype)
        self.moved = True
        return int(where.sum())

    def code_state(self):
        return self.codes.clone(), self.moved

    def set_code_state(self, state) -> None:
        self.codes, self.moved = state

    def scales(self) -> torch.Tensor:
        return self.scale * self.log_factor.exp()

    def zero_points(self) -> torch.Tensor | None:
        if self.zero is None or self.zero_shift is None:
            return self.zero
        moved = self.zero + self.zero_shift
        stored = moved.detach().round().clamp(0, self.fmt.spec.maxq)
        return moved + (stored - moved).detach()

    def current_codes(self, scales: torch.Tensor | None = None) -> torch.Tensor:
        """The codes [out, groups, group size] (float): the stored ones, or with an adapter the merged weight
        quantized again (straight-through rounding) with ``scales`` (default: the current ones)."""
        if self.lora_a is None or self.lora_b is None:
            return self.codes
        out, k = self.fmt.shape
        delta = pad_to_groups(self.lora_b @ self.lora_a, self.gs).reshape(out, -1, self.gs)
        zero = self.zero_points()
        assert zero is not None, "integer grids have zero points"
        x = (self.base + delta) / (self.scales() if scales is None else scales).unsqueeze(-1) + zero.unsqueeze(-1)
        return x + (x.detach().round().clamp(0, self.fmt.spec.maxq) - x).detach()

    def weight(self) -> torch.Tensor:
        """The float32 weight the current values give (differentiable in them)."""
        out, k = self.fmt.shape
        return decode(self.current_codes(), self.scales(), self.zero_points(), self.fmt.spec).reshape(out, -1)[:, :k]

    def result(self) -> QuantizedWeight:
        """The format holding the current values: scales rounded to float16 as stored, and the stored codes (with
        an adapter, the merged weight put on the grid of those scales)."""
        zero, spec = self.zero_points(), self.fmt.spec
        zeros = self.fmt.zeros if self.zero_shift is None or zero is None else \
            pack_rows(zero.detach().cpu().to(torch.uint8), spec.bits)
        stored = self.scales().detach().half()
        codes = self.fmt.codes
        if self.moved:  # codes taken by move_codes
            out, k = self.fmt.shape
            codes = pack_rows(self.codes.reshape(out, -1)[:, :k].cpu().to(torch.uint8), spec.bits)
        if self.lora_a is not None:  # the merged weight on the grid of the scales as stored
            out, k = self.fmt.shape
            merged = self.current_codes(stored.float()).detach().reshape(out, -1)[:, :k].round()
            codes = pack_rows(merged.cpu().to(torch.uint8), spec.bits)
        return QuantizedWeight(codes, stored.cpu(), zeros, spec, self.fmt.shape)


class TrainableCodebook(TrainableWeight):
    """One :class:`VectorWeight`: its code book entries train, and its row scales as ``stored * exp(t)``, with the
    codes fixed (the continuous step of "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM
    Compression", Malinovskii et al., 2024, and AQLM's end-to-end code-book tuning)."""

    fmt: VectorWeight

    def __init__(self, fmt: VectorWeight, modules: list, device):
        self.fmt, self.modules = fmt, modules
        self.table = (torch.arange(fmt.shape[0]) // fmt.rows_per_table).unsqueeze(1).to(device)  # [rows, 1]
        self.codes = fmt.codes().long().to(device)  # [rows, in/dim]
        book = fmt.codebook.float().to(device)
        self.step = torch.ones(book.shape[0], 1, 1, device=device)
        if fmt.codebook_dtype == "int8":  # trained at unit scale (entries' mean square 1), stored as integers
            self.step = book.square().mean((1, 2), keepdim=True).rsqrt().nan_to_num(1.0, 1.0, 1.0)
        self.book = nn.Parameter(book * self.step)
        self.scale = fmt.row_scale.float().to(device)
        self.log_factor = nn.Parameter(torch.zeros_like(self.scale))

    def value_parameters(self) -> list[nn.Parameter]:
        return [self.book]

    def values(self) -> torch.Tensor:
        """The code books as the forward uses them, in the units of the row scales: int8 books rounded to their
        integers (straight-through: the gradient reaches the unrounded entries), float16 ones as they train."""
        if self.fmt.codebook_dtype == "float16":
            return self.book
        entries = self.book / self.step
        return entries + (stored_books(entries.detach(), "int8") - entries).detach()

    def weight(self) -> torch.Tensor:
        rows, cols = self.fmt.shape
        vectors = self.values()[self.table, self.codes]  # [rows, in/dim, dim]
        return vectors.reshape(rows, cols) * (self.scale * self.log_factor.exp()).unsqueeze(1)

    def result(self) -> VectorWeight:
        """The format holding the current values (rounded as stored) and codes."""
        scale = (self.scale * self.log_factor.exp()).detach().cpu()
        return VectorWeight.from_codes(self.codes.cpu(), self.values().detach().cpu(), scale, self.fmt.index_bits,
                                       self.fmt.rows_per_table, self.fmt.codebook_dtype)

    def codes_count(self) -> int:
        return self.codes.numel()

    def code_model(self, grad: torch.Tensor, curvature: torch.Tensor):
        rows, _ = self.fmt.shape
        book = self.values().detach()
        as_vectors = lambda t: t.to(book.device, torch.float32).reshape(rows, -1, 1, self.fmt.dim)  # noqa: E731
        scale = (self.scale * self.log_factor.exp()).detach().reshape(rows, 1, 1, 1)
        g, f = as_vectors(grad) * scale, as_vectors(curvature) * scale.square()  # at unit scale: dw = s dv
        now = book[self.table, self.codes].unsqueeze(2)  # [rows, in/dim, 1, dim]
        linear = torch.empty(*self.codes.shape, book.shape[1], device=book.device)  # [rows, in/dim, K]
        quadratic = torch.empty_like(linear)
        for r in range(0, rows, CODE_SEARCH_ROWS):  # every entry's move, a slice of rows at a time
            sl = slice(r, r + CODE_SEARCH_ROWS)
            dv = book[self.table[sl, 0]].unsqueeze(1) - now[sl]  # [slice, in/dim, K, dim]
            linear[sl], quadratic[sl] = (g[sl] * dv).sum(-1), (f[sl] * dv.square()).sum(-1) / 2

        def best(lam: float):
            value, codes = (linear + lam * quadratic).min(-1)
            return codes, -value

        # a code moves while some entry's model value is negative: lam < -linear / quadratic for one downhill entry
        threshold = torch.where(linear < 0, -linear / quadratic.clamp_min(1e-30), 0.0).amax(-1)
        return best, threshold, float(2 * g.abs().mean() / (f.mean() * _entry_spacing(book)))

    def take_codes(self, codes: torch.Tensor, where: torch.Tensor) -> int:
        self.codes = torch.where(where, codes, self.codes)
        return int(where.sum())

    def code_state(self):
        return self.codes.clone()

    def set_code_state(self, state) -> None:
        self.codes = state


CODE_SEARCH_ROWS = 64  # rows per code-book search: [rows, in/dim, entries, dim] moves, a few tens of MB
LAMBDA_RANGE = 14.0  # the discrete step's lam stays within e^14 of the format's typical lam0, either way


def _entry_spacing(book: torch.Tensor) -> float:
    """The typical distance per coordinate between a code book entry and its nearest other entry."""
    itself = torch.eye(book.shape[1], dtype=torch.bool, device=book.device)
    d = torch.cdist(book, book).masked_fill(itself, float("inf"))
    return float(d.min(-1).values.mean()) / book.shape[2] ** 0.5


def weight_gradients(grids: dict[str, TrainableWeight], losses: list[Callable[[], torch.Tensor]]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each format's (gradient, mean squared gradient) in its decoded float weight: the mean over ``losses`` (each
    a closure computing one loss through the modules) of each one's gradient, and of its square."""
    weights = {}
    for name, g in grids.items():
        weights[name] = g.weight().detach().requires_grad_(True)
        for m in g.modules:
            m._cached_weight = weights[name].to(m.compute_dtype)
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    square = {name: torch.zeros_like(w) for name, w in weights.items()}
    try:
        with torch.enable_grad():
            for loss in losses:
                loss().backward()
                for name, w in weights.items():
                    if w.grad is not None:
                        total[name] += w.grad
                        square[name] += w.grad.square()
                        w.grad = None
    finally:
        for g in grids.values():
            g.uninstall()
    return {name: (total[name] / len(losses), square[name] / len(losses)) for name in weights}


def discrete_step(grids: dict[str, TrainableWeight], losses: list[Callable[[], torch.Tensor]], share: float,
                  held_out: Callable[[], float], before: float) -> dict:
    """One discrete step (:meth:`TrainableWeight.move_codes`) on every format, from the gradients of ``losses``,
    kept only when ``held_out()`` (the held-out loss of the formats' current results) drops below ``before``;
    put back otherwise. Returns what it did."""
    saved = {name: g.code_state() for name, g in grids.items()}
    grads = weight_gradients(grids, losses)
    moved = sum(g.move_codes(*grads[name], share) for name, g in grids.items())
    after = held_out() if moved else before
    kept = after < before
    if not kept:
        for name, g in grids.items():
            g.set_code_state(saved[name])
    return {"codes_moved": moved, "share": share, "held_out_before": before, "held_out": after, "kept": kept}


def trainable_grids(modules: dict[str, nn.Module], device, zeros: bool = False, rank: int = 0
                    ) -> dict[str, TrainableWeight]:
    """A :class:`TrainableGrid` per integer-grid format object among ``modules`` (name -> module), and a
    :class:`TrainableCodebook` per vector code-book one, under the first name that computes with it: a table shared
    by two modules trains once."""
    grids: dict[int, TrainableWeight] = {}
    names: dict[int, str] = {}
    for name, m in modules.items():
        if not isinstance(m, CompressedLinear | CompressedEmbedding):
            continue
        if id(m.fmt) in grids:
            grids[id(m.fmt)].modules.append(m)
        elif isinstance(m.fmt, QuantizedWeight):
            grids[id(m.fmt)], names[id(m.fmt)] = TrainableGrid(m.fmt, [m], device, zeros, rank), name
        elif isinstance(m.fmt, VectorWeight):
            grids[id(m.fmt)], names[id(m.fmt)] = TrainableCodebook(m.fmt, [m], device), name
    return {names[key]: g for key, g in grids.items()}


def refuse_k_quants_before(tuner, passes) -> None:
    """A pass training stored grids, after a pass writing llama.cpp's k-quants (whose two-level scales it cannot train
    yet): one PlanError before any compute, rather than those layers left untrained without a word."""
    for p in passes[:passes.index(tuner)]:
        try:
            specs = p.written_grids()
        except NotAnIntegerGrid:
            continue
        if any(ktype(s.grid) is not None for s in specs):
            raise PlanError(f"the {tuner.name} pass cannot train the k-quant super-blocks {p.name} writes (their "
                            "scales are integers times a float16 factor)", f"drop {tuner.name}, or use grid: int")
