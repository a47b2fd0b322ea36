"""Self-attention with a KV cache in the ONNX decoder, two ways that compute the same numbers.

- **standard** (``weights: portable``): opset-21 ops only. Rotary embedding by Split/Concat/Mul, query heads
  grouped by their KV head against the concatenated cache (no copy of it), an additive mask, Softmax.
- **fused** (``weights: fast``): onnxruntime's ``com.microsoft::GroupQueryAttention`` does the cache append, the
  score soft-cap (Gemma 2) and the softmax in one kernel. Queries and keys are rotated before it by
  ``com.microsoft::RotaryEmbedding`` at ``position_ids`` (from cos/sin tables over every position, computed in the
  graph from the model's ``inv_freq`` and folded when the session loads: nothing stored), after the per-head norms
  of Qwen3 and Gemma 3; the kernel's own rotation would place each new token at the cache's width, which counts the
  padding of a row padded on the right (onnxruntime-genai pads a batch's shorter prompts so). It reads the same
  additive mask as the standard graph as its attention bias, so padding and sliding windows mean what they mean in
  transformers; every key of the cache counts as present for its own bookkeeping.

Both read ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim] and write the present cache in
the same layout, so onnxruntime-genai and our own loop drive either graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from .graph import FLOAT, Graph
from .norms import rms_norm

MICROSOFT = "com.microsoft"


@dataclass
class AttentionContext:
    """What every layer's attention reads: the shapes, the masks per window, the rotary tables per layer type."""

    g: Graph
    fused: bool
    heads: int
    kv_heads: int
    head_dim: int
    norm_offset: float
    softcap: float | None
    masks: dict[int | None, str]            # window (None: full) -> additive mask [batch, 1, seq, total]
    rotary: dict[str, tuple[str, str]]      # layer type -> (cos, sin): standard [b, 1, s, hd], fused [positions, hd/2]
    positions: str = ""                     # position_ids [batch, seq] (fused)
    seqlens: str = ""                       # int32 [batch]: total - 1 (fused)
    total: str = ""                         # int32 scalar: past + seq (fused)
    presents: list[tuple[str, str]] = field(default_factory=list)


def rotary_tables(g: Graph, rotary, layer_type: str, positions: str, fused: bool, max_positions: int):
    """(cos, sin) of one layer type from the model's rotary module (its ``inv_freq`` and ``attention_scaling``, so
    rope scaling variants carry over). Standard: [batch, 1, seq, head_dim] at ``positions``. Fused: the half
    tables [max_positions, head_dim / 2] GroupQueryAttention indexes, built from constants only."""
    prefix = f"{layer_type}_" if hasattr(rotary, f"{layer_type}_inv_freq") else ""
    inv_freq = g.const(getattr(rotary, f"{prefix}inv_freq").detach().float().cpu().numpy(), np.float32)
    scaling = g.const(float(getattr(rotary, f"{prefix}attention_scaling", 1.0)), np.float32)
    if fused:
        every = g.op("Unsqueeze", g.op("Cast", g.arange(max_positions), to=FLOAT), g.const([-1]))
        angles = g.op("Mul", every, inv_freq)
    else:
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=FLOAT), g.const([-1])), inv_freq)
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))
    return g.op("Mul", g.op("Cos", angles), scaling), g.op("Mul", g.op("Sin", angles), scaling)


def soft_cap(g: Graph, x: str, cap: float) -> str:
    """cap * tanh(x / cap) (Gemma 2's attention scores and logits)."""
    return g.op("Mul", g.op("Tanh", g.op("Div", x, g.const(float(cap), np.float32))), g.const(float(cap), np.float32))


def attention(ctx: AttentionContext, attn, q: str, k: str, v: str, past: list[str], window: int | None,
              layer_type: str, name: str) -> str:
    """The attended values [batch, seq, heads * head_dim] of projections ``q``, ``k``, ``v`` [batch, seq, *] for
    one layer (``attn``: its transformers module, read for the scale and per-head norms); appends the layer's
    present key and value to ``ctx.presents``."""
    scale = float(getattr(attn, "scaling", ctx.head_dim ** -0.5))
    build = _fused if ctx.fused else _standard
    return build(ctx, attn, q, k, v, past, window, layer_type, scale, name)


def _fused(ctx, attn, q, k, v, past, window, layer_type, scale, name):
    g = ctx.g
    cos, sin = ctx.rotary[layer_type]
    attrs = {"num_heads": ctx.heads, "kv_num_heads": ctx.kv_heads, "scale": scale}
    if ctx.softcap:
        attrs["softcap"] = float(ctx.softcap)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3, Gemma 3: RMSNorm over each head before the rotation
        q = _per_head_norm(ctx, q, attn.q_norm, ctx.heads, f"{name}.q_norm")
        k = _per_head_norm(ctx, k, attn.k_norm, ctx.kv_heads, f"{name}.k_norm")
    q, k = (g.op("RotaryEmbedding", t, ctx.positions, cos, sin, domain=MICROSOFT, num_heads=n)
            for t, n in ((q, ctx.heads), (k, ctx.kv_heads)))
    out, key, value = g.op("GroupQueryAttention", q, k, v, past[0], past[1], ctx.seqlens, ctx.total, "", "", "",
                           ctx.masks[window], outputs=3, domain=MICROSOFT, **attrs)
    ctx.presents.append((key, value))
    return out


def _per_head_norm(ctx, x: str, module, heads: int, name: str) -> str:
    """RMSNorm over each head of ``x`` [batch, seq, heads * head_dim] (onnxruntime's CPU GroupQueryAttention does
    not take the norm weights itself)."""
    g = ctx.g
    split = g.op("Reshape", x, g.const([0, 0, heads, ctx.head_dim]))
    return g.op("Reshape", rms_norm(g, split, module, name, ctx.norm_offset), g.const([0, 0, heads * ctx.head_dim]))


def _standard(ctx, attn, q, k, v, past, window, layer_type, scale, name):
    g, hd, heads, kv_heads = ctx.g, ctx.head_dim, ctx.heads, ctx.kv_heads

    def heads_first(t, n):  # [b, s, n*hd] -> [b, n, s, hd]
        return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

    q, k, v = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
    if getattr(attn, "q_norm", None) is not None:
        q = rms_norm(g, q, attn.q_norm, f"{name}.q_norm", ctx.norm_offset)
        k = rms_norm(g, k, attn.k_norm, f"{name}.k_norm", ctx.norm_offset)
    cos, sin = ctx.rotary[layer_type]
    q, k = _rotate(g, q, cos, sin, hd // 2), _rotate(g, k, cos, sin, hd // 2)
    key = g.op("Concat", past[0], k, axis=2)
    value = g.op("Concat", past[1], v, axis=2)
    ctx.presents.append((key, value))
    # query heads grouped by their KV head: [b, kv, group, s, hd] against [b, kv, 1, t, hd]
    q5 = g.op("Reshape", g.op("Mul", q, g.const(scale, np.float32)), g.const([0, kv_heads, heads // kv_heads, -1, hd]))
    k5 = g.op("Unsqueeze", key, g.const([2]))
    v5 = g.op("Unsqueeze", value, g.const([2]))
    scores = g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
    if ctx.softcap:
        scores = soft_cap(g, scores, ctx.softcap)
    scores = g.op("Add", scores, g.op("Unsqueeze", ctx.masks[window], g.const([2])))
    context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v5)
    return g.op("Reshape", g.op("Transpose", g.op("Reshape", context, g.const([0, heads, -1, hd])), perm=[0, 2, 1, 3]),
                g.const([0, 0, heads * hd]))


def _rotate(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    first, second = g.op("Split", x, g.const([half, half]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def total_length(g: Graph, mask: str) -> str:
    """past + seq as an int64 scalar: the width of ``attention_mask``."""
    return g.op("Gather", g.op("Shape", mask), g.const(1))


def masks(g: Graph, mask: str, positions: str, windows: set[int | None]) -> dict[int | None, str]:
    """Additive masks [batch, 1, seq, total], one per sliding window (None: full attention), in positions, not cache
    slots: a key's position is the count of present keys before it (``attention_mask``'s running sum), a query's its
    ``position_ids``; a query sees the present keys at its position or before, and within a window those less than
    ``window`` behind it (transformers' rule). So padding on either side, left (transformers') or right
    (onnxruntime-genai's batches, whose new tokens follow the padding in the cache), means what it means."""
    present = g.op("Cast", mask, to=TensorProto.BOOL)
    key_pos = g.op("Unsqueeze", g.op("Sub", g.op("CumSum", mask, g.const(1)), g.const(1)), g.const([1]))  # int64
    query_pos = g.op("Unsqueeze", positions, g.const([2]))
    distance = g.op("Sub", query_pos, key_pos)  # [batch, seq, total]
    allowed = g.op("And", g.op("GreaterOrEqual", distance, g.const(0)), g.op("Unsqueeze", present, g.const([1])))
    neg = float(np.finfo(np.float32).min)
    out = {}
    for window in windows:
        inside = allowed if window is None else g.op("And", allowed, g.op("Less", distance, g.const(window)))
        out[window] = g.op("Unsqueeze", g.op("Where", inside, g.const(0.0, np.float32), g.const(neg, np.float32)),
                           g.const([1]))
    return out


def cache_lengths(g: Graph, ids: str, total: str) -> tuple[str, str]:
    """(seqlens_k int32 [batch] = total - 1, total_sequence_length int32 scalar) for GroupQueryAttention."""
    batch = g.op("Gather", g.op("Shape", ids), g.const([0]))
    seqlens = g.op("Expand", g.op("Sub", total, g.const(1)), batch)
    return g.op("Cast", seqlens, to=TensorProto.INT32), g.op("Cast", total, to=TensorProto.INT32)
