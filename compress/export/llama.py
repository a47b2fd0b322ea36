"""The ONNX decoder graph of a Llama-like model, with a KV cache.

Inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] (1 = token, 0 = padding),
``position_ids`` [batch, seq], and per layer ``past_key_values.{i}.key|value``
[batch, kv_heads, past, head_dim] (past = 0 for the prefill). Outputs: ``logits``
[batch, seq, vocab] and ``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim].
Batch, sequence and past lengths are dynamic; prefill and decode run the same graph.

The graph follows transformers' ``LlamaForCausalLM`` op for op in float32: RMSNorm, rotary
embedding from the model's own ``inv_freq`` (so rope scaling variants carry over), grouped-query
attention (query heads grouped by their KV head, no copy of the cache), causal + padding mask,
SiLU-gated MLP. The families of ``families.py`` marked ``onnx_export`` differ from it in what this
builder reads from the model: sliding-window layers (Mistral, Qwen2/3, Gemma 2/3: ``layer_windows``),
RMSNorm per head on queries and keys (Qwen3, Gemma 3), Gemma's embedding scale, ``1 + weight`` norms and
GELU (tanh) MLP, Gemma 2/3's norms after attention and around the MLP, soft-capped attention scores and
logits (Gemma 2), and a rotary base per layer type (Gemma 3's local and global layers). Standard
opset-21 ops only; the weights decide whether contrib ops appear (see ``weights.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from ..errors import ExportError
from ..families import family, supporting
from ..formats import DenseWeight
from ..formats.onnx_ops import as_float, torch_initializer
from ..modules import embeddings_tied
from .graph import FLOAT, INT64, Graph
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


def layer_windows(cfg) -> list[int | None]:
    """Each layer's sliding attention window (None: full attention), as transformers builds its masks: per
    ``layer_types`` when the config has them (Qwen2/3), else one window for every layer (Mistral)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * cfg.num_hidden_layers


def _linear(low: WeightLowering, x: str, module, name: str) -> str:
    fmt = getattr(module, "fmt", None)
    if fmt is None:  # a plain nn.Linear, stored in the checkpoint's dtype
        fmt = DenseWeight(module.weight, low.dense_dtype or module.weight.dtype)
    return low.linear(x, fmt, module.bias, name)


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
        init = torch_initializer(g, "model.embed_tokens.weight_t" if tied else "model.embed_tokens.weight",
                                 table.t().contiguous() if tied else table)
        rows = g.op("Transpose", g.op("Gather", init, ids, axis=1), perm=[1, 2, 0]) if tied else g.op(
            "Gather", init, ids)
        h = rows if dtype == torch.float32 else g.op("Cast", rows, to=FLOAT)
    scale = getattr(module, "embed_scale", None)  # Gemma: sqrt(hidden) in the weights' dtype
    if scale is not None:
        weight = getattr(module, "weight", None)
        scale_dtype = weight.dtype if weight is not None else module.compute_dtype
        h = g.op("Mul", h, g.const(float(scale.to(scale_dtype)), np.float32))
    return h, dtype, init


def _rms_norm(g: Graph, x: str, module, name: str, offset: float = 0.0) -> str:
    """HF's RMSNorm: x / sqrt(mean(x^2) + eps) * (offset + weight) (the pattern onnxruntime fuses; Gemma's
    offset is 1)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    mean = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.const(eps, np.float32))))
    return g.op("Mul", normed, as_float(g, f"{name}.weight", offset + module.weight.detach().float()))


def _soft_cap(g: Graph, x: str, cap: float) -> str:
    return g.op("Mul", g.op("Tanh", g.op("Div", x, g.const(float(cap), np.float32))), g.const(float(cap), np.float32))


def _rotate(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    first, second = g.op("Split", x, g.const([half, half]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def build_decoder(model, weights: str = "fast", accuracy_level: int = 0, dense_dtype: torch.dtype | None = None):
    """(ModelProto, WeightLowering, io facts) for ``model`` (a Llama-like ``*ForCausalLM``)."""
    check_exportable(model)
    cfg = model.config
    g = Graph()
    low = WeightLowering(g, weights, accuracy_level)
    low.dense_dtype = dense_dtype
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv_heads
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

    # additive mask [batch, 1, 1, seq, total]: causal over absolute positions, and padding
    total = g.op("Gather", g.op("Shape", mask), g.const(1))
    seq = g.op("Gather", g.op("Shape", ids), g.const(1))
    key_pos = g.op("Range", g.const(0), total, g.const(1))
    query_pos = g.op("Range", g.op("Sub", total, seq), total, g.const(1))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", key_pos, g.const([0])), g.op("Unsqueeze", query_pos, g.const([1])))
    padding = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.const([1, 2, 3]))
    neg = float(np.finfo(np.float32).min)
    biases: dict[int | None, str] = {}
    for window in set(layer_windows(cfg)):
        allowed = g.op("And", causal, padding)
        if window is not None:  # transformers' sliding window: a query sees the keys less than `window` behind it
            distance = g.op("Sub", g.op("Unsqueeze", query_pos, g.const([1])), g.op("Unsqueeze", key_pos, g.const([0])))
            allowed = g.op("And", allowed, g.op("Less", distance, g.const(window)))
        biases[window] = g.op("Where", allowed, g.const(0.0, np.float32), g.const(neg, np.float32))

    # rotary tables [batch, 1, seq, head_dim], one pair per layer type (Gemma 3: local and global bases)
    rotary = model.model.rotary_emb
    position = g.op("Unsqueeze", g.op("Cast", positions, to=FLOAT), g.const([-1]))
    tables: dict[str, tuple[str, str]] = {}
    for layer_type in set(types):
        prefix = f"{layer_type}_" if hasattr(rotary, f"{layer_type}_inv_freq") else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq").detach().float().cpu().numpy()
        freqs = g.op("Mul", position, g.const(inv_freq, np.float32))
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))
        scaling = g.const(float(getattr(rotary, f"{prefix}attention_scaling", 1.0)), np.float32)
        tables[layer_type] = g.op("Mul", g.op("Cos", angles), scaling), g.op("Mul", g.op("Sin", angles), scaling)
    softcap = getattr(cfg, "attn_logit_softcapping", None)

    presents = []
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        x = _rms_norm(g, h, layer.input_layernorm, f"{p}.input_layernorm", offset)

        def heads_first(t, n):  # [b, s, n*hd] -> [b, n, s, hd]
            return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, head_dim])), perm=[0, 2, 1, 3])

        q = heads_first(_linear(low, x, attn.q_proj, f"{p}.self_attn.q_proj"), heads)
        k = heads_first(_linear(low, x, attn.k_proj, f"{p}.self_attn.k_proj"), kv_heads)
        v = heads_first(_linear(low, x, attn.v_proj, f"{p}.self_attn.v_proj"), kv_heads)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head before the rotation
            q = _rms_norm(g, q, attn.q_norm, f"{p}.self_attn.q_norm", offset)
            k = _rms_norm(g, k, attn.k_norm, f"{p}.self_attn.k_norm", offset)
        cos, sin = tables[types[i]]
        q = _rotate(g, q, cos, sin, head_dim // 2)
        k = _rotate(g, k, cos, sin, head_dim // 2)
        key = g.op("Concat", past[i][0], k, axis=2)
        value = g.op("Concat", past[i][1], v, axis=2)
        presents += [(key, f"present.{i}.key"), (value, f"present.{i}.value")]
        # query heads grouped by their KV head: [b, kv, group, s, hd] against [b, kv, 1, t, hd]
        q5 = g.op("Reshape", g.op("Mul", q, g.const(float(getattr(attn, "scaling", head_dim ** -0.5)), np.float32)),
                  g.const([0, kv_heads, group, -1, head_dim]))
        k5 = g.op("Unsqueeze", key, g.const([2]))
        v5 = g.op("Unsqueeze", value, g.const([2]))
        scores = g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))
        if softcap:  # Gemma 2: cap * tanh(scores / cap)
            scores = _soft_cap(g, scores, softcap)
        scores = g.op("Add", scores, biases[windows[i]])
        context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v5)
        context = g.op("Reshape", g.op("Transpose", g.op("Reshape", context, g.const([0, heads, -1, head_dim])),
                                       perm=[0, 2, 1, 3]), g.const([0, 0, heads * head_dim]))
        attended = _linear(low, context, attn.o_proj, f"{p}.self_attn.o_proj")
        sandwich = getattr(layer, "pre_feedforward_layernorm", None) is not None  # Gemma 2/3: norms around both
        if sandwich:
            attended = _rms_norm(g, attended, layer.post_attention_layernorm, f"{p}.post_attention_layernorm", offset)
        h = g.op("Add", h, attended)

        mlp_norm, mlp_norm_name = ((layer.pre_feedforward_layernorm, "pre_feedforward_layernorm") if sandwich
                                   else (layer.post_attention_layernorm, "post_attention_layernorm"))
        x = _rms_norm(g, h, mlp_norm, f"{p}.{mlp_norm_name}", offset)
        mlp = layer.mlp
        gate = _linear(low, x, mlp.gate_proj, f"{p}.mlp.gate_proj")
        up = _linear(low, x, mlp.up_proj, f"{p}.mlp.up_proj")
        if activation == "silu":
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        else:  # gelu_pytorch_tanh
            act = g.op("Mul", g.op("Gelu", gate, approximate="tanh"), up)
        out = _linear(low, act, mlp.down_proj, f"{p}.mlp.down_proj")
        if sandwich:
            out = _rms_norm(g, out, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm", offset)
        h = g.op("Add", h, out)

    h = _rms_norm(g, h, model.model.norm, "model.norm", offset)
    if tied and embed_init is not None:
        # float32 weights for an exact head: onnxruntime holds a float32 copy of a float16 table (its CPU MatMul
        # would convert a float16 one the same way), beside the float16 table the Gather reads
        head_w = embed_init if embed_dtype == torch.float32 else g.op("Cast", embed_init, to=FLOAT)
        logits = g.op("MatMul", h, head_w)
        low.layers["lm_head"] = LayerExport("tied to model.embed_tokens", 0)
    else:
        logits = _linear(low, h, head, "lm_head")
    if getattr(cfg, "final_logit_softcapping", None):
        logits = _soft_cap(g, logits, cfg.final_logit_softcapping)
    g.output(logits, "logits", FLOAT, ["batch", "sequence", cfg.vocab_size])
    for value, name in presents:
        g.output(value, name, FLOAT, ["batch", kv_heads, "total_sequence", head_dim])
    io = {"layers": len(layers), "kv_heads": kv_heads, "head_dim": head_dim, "heads": heads,
          "vocab_size": cfg.vocab_size, "tied_embeddings": tied,
          "embedding_dtype": str(embed_dtype).removeprefix("torch.")}
    return g.model(low.opset), low, io
