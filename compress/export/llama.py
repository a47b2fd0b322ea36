"""The ONNX decoder graph of a Llama-like model, with a KV cache.

Inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] (1 = token, 0 = padding),
``position_ids`` [batch, seq], and per layer ``past_key_values.{i}.key|value``
[batch, kv_heads, past, head_dim] (past = 0 for the prefill); optional ``logits_to_keep`` [1] (transformers'
meaning: the logits of the last k positions only, 0 = all, the default). Outputs: ``logits``
[batch, seq or k, vocab] and ``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim].
Batch, sequence and past lengths are dynamic; prefill and decode run the same graph.

The graph follows transformers' ``LlamaForCausalLM`` op for op in float32: RMSNorm, rotary
embedding from the model's own ``inv_freq`` (so rope scaling variants carry over), grouped-query
attention (query heads grouped by their KV head, no copy of the cache), causal + padding mask,
SiLU-gated MLP. The families of ``families.py`` marked ``onnx_export`` differ from it in what this
builder reads from the model: fused q/k/v and gate/up layers, split after their matmul (Phi-3),
sliding-window layers (Mistral, Qwen2/3, Gemma 2/3, Phi-3: ``layer_windows``),
RMSNorm per head on queries and keys (Qwen3, Gemma 3), Gemma's embedding scale, ``1 + weight`` norms and
GELU (tanh) MLP, Gemma 2/3's norms after attention and around the MLP, soft-capped attention scores and
logits (Gemma 2), and a rotary base per layer type (Gemma 3's local and global layers).

``weights: portable`` builds it from standard opset-21 ops only. ``weights: fast`` uses onnxruntime's
contrib kernels: GroupQueryAttention (``attention.py``), the residual add fused with the next RMSNorm
(``norms.py``), and the low-bit matmuls (``weights.py``), siblings packed into one (``fuse.py``); the same
numbers, fewer and faster kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ExportError
from ..families import family, supporting
from ..formats import DenseWeight
from ..formats.onnx_custom import half_matmul
from ..formats.onnx_ops import torch_initializer
from ..modules import embeddings_tied
from .attention import AttentionContext, attention, cache_lengths, masks, rotary_tables, soft_cap, total_length
from .fuse import fuse_silu_gates, pack_sibling_matmuls
from .graph import FLOAT, INT64, Graph
from .head_positions import kept_positions
from .norms import add_and_norm, rms_norm
from .weights import LayerExport, WeightLowering

ACTIVATIONS = {"silu": "SiLU", "gelu_pytorch_tanh": "GELU (tanh)"}  # the MLP activations the builder emits


def _activation_name(cfg) -> str:
    return str(getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu")


def check_exportable(model) -> None:
    """Refuse, naming the family, a model the builder cannot reproduce (the run calls it before any compute)."""
    cfg = model.config
    if not family(cfg.model_type).onnx_export:
        raise ExportError(f"ONNX export supports Llama-like decoders ({', '.join(supporting('onnx_export'))}), not "
                          f"'{cfg.model_type}'", "export the compressed checkpoint with another tool, or open an issue")
    if _activation_name(cfg) not in ACTIVATIONS:
        raise ExportError(f"ONNX export of '{cfg.model_type}': activation '{_activation_name(cfg)}' is not supported",
                          f"supported: {', '.join(ACTIVATIONS)}")
    rope = _rope_parameters(cfg)
    if float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ExportError(f"ONNX export of '{cfg.model_type}': a rotation over part of each head "
                          f"(partial_rotary_factor {rope.get('partial_rotary_factor')}) is not supported",
                          "export the compressed checkpoint with another tool, or open an issue")
    if rope.get("rope_type") in DYNAMIC_ROPE:
        raise ExportError(f"ONNX export of '{cfg.model_type}': rope '{rope['rope_type']}' changes its frequencies with "
                          "the sequence length, which the graph's fixed tables cannot follow",
                          "export the compressed checkpoint with another tool, or open an issue")


DYNAMIC_ROPE = ("dynamic", "longrope")  # rope types whose frequencies depend on the sequence length


def _rope_parameters(cfg) -> dict:
    """The config's rope settings (``rope_parameters`` in transformers 5, ``rope_scaling`` before)."""
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(cfg, name, None)
        if isinstance(value, dict):
            return value
    return {}


def layer_windows(cfg) -> list[int | None]:
    """Each layer's sliding attention window (None: full attention), as transformers builds its masks: per
    ``layer_types`` when the config has them (Qwen2/3), else one window for every layer (Mistral)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * cfg.num_hidden_layers


def _linear(low: WeightLowering, x: str, module, name: str) -> str:
    rotation = getattr(module, "input_rotation", None)  # the rotate pass's online transform (modules.rotate_input)
    if rotation is not None:
        x = rotation.onnx_apply(low.g, x)
    fmt = getattr(module, "fmt", None)
    if fmt is None:  # a plain nn.Linear, stored in the checkpoint's dtype
        fmt = DenseWeight(module.weight, low.dense_dtype or module.weight.dtype)
    return low.linear(x, fmt, module.bias, name)


def _head_reads_16_bits(low: WeightLowering, dtype: torch.dtype) -> bool:
    """A tied float16 / bfloat16 table multiplied as stored by our operator (no float32 copy of it in the session)."""
    return dtype in (torch.float16, torch.bfloat16) and low.custom_ops is not None


def _embeddings(low: WeightLowering, module, ids: str, tied: bool, dense_dtype) -> tuple[str, torch.dtype, str | None]:
    """(hidden states of ``ids``, the table's dtype, the dense table's initializer for a tied head to share, or
    None). A compressed table gathers its stored rows and decodes them, tied from the head's own initializers
    (``WeightLowering.rows``). A dense one stays in the checkpoint's dtype, rows gathered then cast; tied, it is
    stored transposed [hidden, vocab] so that the head's MatMul reads the same initializer and neither needs a
    second copy in memory."""
    g = low.g
    fmt = getattr(module, "fmt", None)
    if fmt is not None:
        h, dtype, init = low.rows(fmt, ids, "model.embed_tokens", "lm_head" if tied else None), torch.float32, None
    else:
        table = module.weight.detach()
        if dense_dtype is not None:
            table = table.to(dense_dtype)
        dtype = table.dtype
        transposed = tied and not _head_reads_16_bits(low, dtype)
        init = torch_initializer(g, "model.embed_tokens.weight_t" if transposed else "model.embed_tokens.weight",
                                 table.t().contiguous() if transposed else table)
        rows = g.op("Transpose", g.op("Gather", init, ids, axis=1), perm=[1, 2, 0]) if transposed else g.op(
            "Gather", init, ids)
        h = rows if dtype == torch.float32 else g.op("Cast", rows, to=FLOAT)
    scale = getattr(module, "embed_scale", None)  # Gemma: sqrt(hidden) in the weights' dtype
    if scale is not None:
        weight = getattr(module, "weight", None)
        scale_dtype = weight.dtype if weight is not None else module.compute_dtype
        h = g.op("Mul", h, g.const(float(scale.to(scale_dtype)), np.float32))
    return h, dtype, init


def build_decoder(model, weights: str = "fast", accuracy_level: int = 0, dense_dtype: torch.dtype | None = None,
                  custom_ops: bool = True):
    """(ModelProto, WeightLowering, io facts) for ``model`` (a Llama-like ``*ForCausalLM``)."""
    check_exportable(model)
    cfg = model.config
    g = Graph()
    low = WeightLowering(g, weights, accuracy_level, custom_ops)
    low.dense_dtype = dense_dtype
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = model.model.layers
    offset, activation, windows = family(cfg.model_type).norm_offset, _activation_name(cfg), layer_windows(cfg)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers))

    ids = g.input("input_ids", INT64, ["batch", "sequence"])
    mask = g.input("attention_mask", INT64, ["batch", "total_sequence"])
    positions = g.input("position_ids", INT64, ["batch", "sequence"])
    past = []
    for i in range(len(layers)):
        past.append([g.input(f"past_key_values.{i}.{kv}", FLOAT, ["batch", kv_heads, "past_sequence", head_dim])
                     for kv in ("key", "value")])

    embed_module, head = model.model.embed_tokens, model.lm_head
    tied = embeddings_tied(model)
    h, embed_dtype, embed_init = _embeddings(low, embed_module, ids, tied, dense_dtype)

    fused, total = weights == "fast", total_length(g, mask)
    rotary, max_positions = model.model.rotary_emb, int(getattr(cfg, "max_position_embeddings", 2048))
    ctx = AttentionContext(g, fused, heads, kv_heads, head_dim, offset, getattr(cfg, "attn_logit_softcapping", None),
                           masks(g, mask, positions, set(windows)),
                           {t: rotary_tables(g, rotary, t, positions, fused, max_positions) for t in set(types)})
    if fused:
        ctx.positions = positions
        ctx.seqlens, ctx.total = cache_lengths(g, ids, total)

    x = rms_norm(g, h, layers[0].input_layernorm, "model.layers.0.input_layernorm", offset)
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):  # Phi-3: one layer, its rows the queries, keys and values
            q, k, v = g.op("Split", _linear(low, x, attn.qkv_proj, f"{p}.self_attn.qkv_proj"),
                           g.const([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]), axis=-1, outputs=3)
        else:
            q, k, v = (_linear(low, x, getattr(attn, f"{n}_proj"), f"{p}.self_attn.{n}_proj") for n in "qkv")
        context = attention(ctx, attn, q, k, v, past[i], windows[i], types[i], f"{p}.self_attn")
        attended = _linear(low, context, attn.o_proj, f"{p}.self_attn.o_proj")
        sandwich = getattr(layer, "pre_feedforward_layernorm", None) is not None  # Gemma 2/3: norms around both
        if sandwich:
            attended = rms_norm(g, attended, layer.post_attention_layernorm, f"{p}.post_attention_layernorm", offset)
        mlp_norm, mlp_norm_name = ((layer.pre_feedforward_layernorm, "pre_feedforward_layernorm") if sandwich
                                   else (layer.post_attention_layernorm, "post_attention_layernorm"))
        x, h = add_and_norm(g, h, attended, mlp_norm, f"{p}.{mlp_norm_name}", offset, fused)
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: the gate's rows, then the up projection's
            gate, up = g.op("Split", _linear(low, x, mlp.gate_up_proj, f"{p}.mlp.gate_up_proj"), axis=-1,
                            num_outputs=2, outputs=2)
        else:
            gate = _linear(low, x, mlp.gate_proj, f"{p}.mlp.gate_proj")
            up = _linear(low, x, mlp.up_proj, f"{p}.mlp.up_proj")
        if activation == "silu":
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        else:  # gelu_pytorch_tanh
            act = g.op("Mul", g.op("Gelu", gate, approximate="tanh"), up)
        out = _linear(low, act, mlp.down_proj, f"{p}.mlp.down_proj")
        if sandwich:
            out = rms_norm(g, out, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm", offset)
        last = i == len(layers) - 1
        next_norm, next_name = ((model.model.norm, "model.norm") if last
                                else (layers[i + 1].input_layernorm, f"model.layers.{i + 1}.input_layernorm"))
        x, h = add_and_norm(g, h, out, next_norm, next_name, offset, fused)
    h = kept_positions(g, x)
    if tied and embed_init is not None and _head_reads_16_bits(low, embed_dtype):
        logits = half_matmul(low, h, "lm_head", embed_init, (cfg.vocab_size, cfg.hidden_size))
        assert logits is not None  # _head_reads_16_bits: the library is there
        low.layers["lm_head"] = LayerExport(f"tied to model.embed_tokens, HalfMatMul {str(embed_dtype)[6:]}", 0)
    elif tied and embed_init is not None:
        # float32 weights for an exact head: onnxruntime holds a float32 copy of a float16 table (its CPU MatMul
        # would convert a float16 one the same way), beside the float16 table the Gather reads
        head_w = embed_init if embed_dtype == torch.float32 else g.op("Cast", embed_init, to=FLOAT)
        logits = g.op("MatMul", h, head_w)
        low.layers["lm_head"] = LayerExport("tied to model.embed_tokens", 0)
    else:
        logits = _linear(low, h, head, "lm_head")
    if getattr(cfg, "final_logit_softcapping", None):
        logits = soft_cap(g, logits, cfg.final_logit_softcapping)
    g.output(logits, "logits", FLOAT, ["batch", "logits_sequence", cfg.vocab_size])
    for i, (key, value) in enumerate(ctx.presents):
        for tensor, kind in ((key, "key"), (value, "value")):
            g.output(tensor, f"present.{i}.{kind}", FLOAT, ["batch", kv_heads, "total_sequence", head_dim])
    if fused:
        pack_sibling_matmuls(g)
        if low.custom_ops is not None and fuse_silu_gates(g):
            low.custom_ops_used = True
    io = {"layers": len(layers), "kv_heads": kv_heads, "head_dim": head_dim, "heads": heads,
          "vocab_size": cfg.vocab_size, "tied_embeddings": tied,
          "embedding_dtype": str(embed_dtype).removeprefix("torch.")}
    return g.model(low.opset), low, io
