"""SparseGPT: "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (Frantar &
Alistarh, 2023).

Sweeps the columns like GPTQ: in each lazy block of ``block_size`` columns it chooses the mask by
the OBS saliency ``w^2 / [H^-1]_jj^2`` (for N:M, within every group of M columns as the sweep
reaches it), zeroes the pruned weights and spreads their error over the columns not yet visited,
reconstructing the layer's output. Per-row counts are exact: block b of each row prunes
``round(s * end_b) - round(s * start_b)`` weights.

Joint sparsification and quantization (the paper's section 3.5), ``joint_quantization: true``: when a
``gptq`` pass on the same layers follows directly, the sweep quantizes every kept weight as it reaches
it and prunes the others, so one error-compensating sweep does both; the ``gptq`` pass then leaves
those layers as they are. It is off by default: on SmolLM2-135M at 50% + 4-bit g64 (bench/prune.py)
the joint sweep took 126 s vs 192 s but reached perplexity 28.3 vs 24.8 for two sweeps, whose GPTQ
uses act-order and Hessians re-collected after the whole block was pruned.
Quantization groups run over each row's kept weights (the stored layout), so the lazy block is sized
to hold whole groups; its mask is chosen at the block's start and its groups are fitted on the block's
kept weights as updated so far (GPTQ's fit-at-first-column, for a whole block at once). Only
unstructured sparsity sweeps jointly: N:M masks are better chosen group by group as the sweep reaches
them, which fixed-per-block groups do not allow; on SmolLM2's layer 2 up_proj at 2:4 + 3-bit g64 the
joint sweep's output error was 0.0278 vs 0.0267 for SparseGPT then GPTQ, so N:M keeps two sweeps.
"""

from typing import Literal

import torch
from pydantic import Field

from ..formats import QuantizedWeight, SparseWeight, compact, nm_pattern
from ..hessian import obq_sweep, output_error, prepare_inverse_hessian
from ..modules import CompressedLinear
from ..quant import QuantSpec, decode, encode, fit_params, pad_to_groups
from .base import Requirements, current_weight, input_width
from .pruning import PruneOptions, PruningPass, check_shape, prune_count
from .registry import register


class SparseGPTConfig(PruneOptions):
    type: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(0.01, gt=0, le=1, description="dampening, fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=16, description="columns per lazy block (a multiple of M for N:M)")
    joint_quantization: bool = Field(False, description="when a gptq pass on the same layers follows, prune and "
                                     "quantize in one sweep (unstructured sparsity): about 1/3 faster, less "
                                     "accurate than two sweeps")


def joint_block_size(sparsity: float, pattern: str | None, group_size: int | None, cols: int) -> int | None:
    """A lazy block size whose kept weights per row form whole quantization groups, or None."""
    if group_size is None:
        return 128
    nm = nm_pattern(pattern)
    for block in range(16, 8 * max(group_size, 16) + 1, 16):
        if nm is not None:
            n, m = nm
            fits = block % m == 0 and (block // m * n) % group_size == 0
        else:
            pruned = sparsity * block
            fits = abs(pruned - round(pruned)) < 1e-9 and (block - round(pruned)) % group_size == 0
        if fits and (block >= 64 or block >= cols):
            return block
    return None


def _block_mask(w1, hinv1, sparsity, nm, k):
    """Prune-mask of one lazy block by OBS saliency (k per row, or the lowest M-N of every M)."""
    saliency = w1.pow(2) / torch.diagonal(hinv1).pow(2).unsqueeze(0)
    prune = torch.zeros_like(w1, dtype=torch.bool)
    if nm is None:
        if k:
            prune.scatter_(1, saliency.argsort(dim=1)[:, :k], True)
        return prune
    n, m = nm
    groups = saliency.reshape(w1.shape[0], -1, m)
    low = groups.topk(m - n, dim=2, largest=False).indices
    return prune.reshape(w1.shape[0], -1, m).scatter_(2, low, True).reshape(w1.shape)


def sparsegpt_prune(w, h, sparsity, pattern=None, block_size=128, damp=0.01, spec: QuantSpec | None = None):
    """-> (reconstructed weights with zeros at pruned places, keep-mask, quantized kept values or None).

    The OBS sweep of :func:`compress.hessian.obq_sweep`, in which each lazy block first chooses its mask
    (``start_block``) and each column is pruned where the mask says (and, for N:M, the mask of every group
    of M is chosen as the sweep reaches it). With ``spec`` the sweep also quantizes (joint mode) and the
    third item is the QuantizedWeight of the kept values (rows' kept weights in order); ``block_size`` must
    then come from :func:`joint_block_size`."""
    original = w.float()
    w, hinv = prepare_inverse_hessian(w, h, damp)
    rows, cols = w.shape
    nm = nm_pattern(pattern)
    if nm and spec is None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    final = torch.zeros(rows, cols)  # every column's value once the sweep passed it
    if spec is not None:
        kept_total = cols - prune_count(cols, sparsity) if nm is None else cols // nm[1] * nm[0]
        gs = spec.group_size or kept_total
        scale = torch.zeros(rows, spec.groups(kept_total))
        zero = torch.zeros_like(scale) if spec.grid == "int" else None
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        if spec.group_size is None:  # one group per row: fitted on the whole original row
            s, z = fit_params(original, spec)
            scale[:, 0] = s
            if zero is not None:
                zero[:, 0] = z
    block: dict = {"kept_before": 0}  # the current lazy block: its start, factor and (joint) groups

    def start_block(i1, i2, w1, hinv1):
        block.update(i1=i1, hinv1=hinv1)
        joint_nm = nm is not None and spec is not None
        prune[:, i1:i2] = _block_mask(w1, hinv1, sparsity, nm if joint_nm else None,
                                      0 if nm else prune_count(i2, sparsity) - prune_count(i1, sparsity))
        if spec is not None:
            keep1 = ~prune[:, i1:i2]
            kept_before = block["kept_before"]
            block["group"] = kept_before // gs + (keep1.cumsum(1) - 1).clamp_min(0) // gs
            if spec.group_size is not None:
                s, z = fit_params(pad_to_groups(compact(w1, keep1), gs).reshape(rows, -1, gs), spec)
                first = kept_before // gs
                scale[:, first:first + s.shape[1]] = s
                if zero is not None:
                    zero[:, first:first + s.shape[1]] = z
            block["kept_before"] = kept_before + int(keep1[0].sum())

    def round_column(j, rest):
        i = j - block["i1"]
        if nm is not None and spec is None and i % nm[1] == 0:
            n, m = nm
            saliency = rest[:, :m].pow(2) / torch.diagonal(block["hinv1"])[i:i + m].pow(2).unsqueeze(0)
            prune[:, j:j + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
        col = rest[:, 0]
        if spec is None:
            q = col.masked_fill(prune[:, j], 0)
        else:
            g = block["group"][:, i:i + 1]
            s_col = scale.gather(1, g).squeeze(1)
            z_col = zero.gather(1, g).squeeze(1) if zero is not None else None
            codes[:, j] = encode(col, s_col, z_col, spec)
            q = decode(codes[:, j], s_col, z_col, spec).masked_fill(prune[:, j], 0)
        final[:, j] = q
        return q

    obq_sweep(w, hinv, round_column, block_size, start_block)
    mask = ~prune
    quantized = QuantizedWeight.from_codes(compact(codes, mask), scale, zero, spec) if spec is not None else None
    return final * mask, mask, quantized


@register
class SparseGPT(PruningPass):
    name = "sparsegpt"
    Config = SparseGPTConfig

    def requirements(self):
        return Requirements(stats=frozenset({"hessian"}), model_plan=self.owl_plan(), layer_parallel=True)

    def fuses_with(self, following):
        """The paper's joint mode: with ``joint_quantization``, an unstructured sweep also quantizes for a
        ``gptq`` pass right after it on the same layers (plain GPTQ: no mixed precision, no asymmetric
        calibration, no overrides)."""
        c, f = self.cfg, following.cfg
        return (c.joint_quantization and following.name == "gptq" and not c.pattern
                and f.target_bits_per_weight is None and f.float_target_strength == 0
                and f.targets == c.targets and f.exclude == c.exclude and not f.overrides and not c.overrides)

    def apply(self, work, replace):
        for name, module in work.layers.items():
            cfg = self.cfg.for_layer(name)
            fmt, note = self._prune(name, module, work.stats.get(name), cfg, work.fused)
            replace(name, CompressedLinear.from_module(module, fmt))
            work.notes[name] = note
            if note.get("joint_quantization"):
                work.finished.add(name)

    def compress_layer(self, name, module, stats, cfg):
        return self._prune(name, module, stats, cfg, None)

    def _prune(self, name, module, stats, cfg, joint):
        """Prune one layer; with ``joint`` (the fused gptq pass) quantize its kept weights in the same sweep
        when a lazy block size holds whole groups."""
        w = current_weight(module)
        check_shape(name, w.shape[1], cfg.pattern)
        sparsity, h = self.layer_sparsity(name, cfg), stats.mean_hessian().cpu()
        spec = joint.layer_spec(name, joint.cfg.for_layer(name), input_width(module)) if joint is not None else None
        block = joint_block_size(sparsity, cfg.pattern, spec.group_size, w.shape[1]) if spec else None
        if block is None:  # no joint sweep: prune now, the quantization pass follows as usual
            pruned, mask, _ = sparsegpt_prune(w, h, sparsity, cfg.pattern, cfg.block_size, cfg.damp)
            return self.sparse_result(pruned, mask, cfg, origin=w)
        pruned, mask, values = sparsegpt_prune(w, h, sparsity, cfg.pattern, block, cfg.damp, spec)
        fmt = SparseWeight(mask, values, cfg.pattern)
        return fmt, {"format": fmt.describe(), "sparsity": 1 - mask.float().mean().item(),
                     "output_error": output_error(w, fmt.dequantize(), h), "joint_quantization": True}
