"""What each model family supports, in one table (``FAMILIES``), and the family facts generic code reads.

- **Blocks** are found generically for every family (:func:`find_blocks`: the longest list of identical
  modules holding linear layers), so a new decoder family needs no entry to be compressed.
- **Scaling groups** (AWQ): which module produces the input of which linear layers, so an input-channel
  scaling can be folded into it. Each entry: (producer, [consumers], producer kind). Scaling the consumers'
  input channels by ``s`` and the producer's output by ``1/s`` leaves the float model unchanged when the
  producer is an RMSNorm/LayerNorm (its weight, and bias, scale per channel), or a linear layer whose output
  reaches the consumers through an elementwise product (Llama's ``act(gate) * up``) or a positively
  homogeneous activation (ReLU in OPT).
- **Structured pruning** (``passes/structured.py``) and **ONNX export** (``export/llama.py``) name the
  families they build for here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PlanError
from .modules import CompressedLinear, linear_weight

LLAMA_SCALING = (
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm"),
    ("self_attn.v_proj", ["self_attn.o_proj"], "linear"),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "norm"),
    ("mlp.up_proj", ["mlp.down_proj"], "linear"),
)
GEMMA2_SCALING = (  # Gemma 2/3: the MLP reads pre_feedforward_layernorm (post_attention_layernorm feeds the residual)
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm"),
    ("self_attn.v_proj", ["self_attn.o_proj"], "linear"),
    ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "norm"),
    ("mlp.up_proj", ["mlp.down_proj"], "linear"),
)
PHI3_SCALING = (  # Phi-3: q/k/v and gate/up fused into one layer each (the value rows of qkv_proj are not folded)
    ("input_layernorm", ["self_attn.qkv_proj"], "norm"),
    ("post_attention_layernorm", ["mlp.gate_up_proj"], "norm"),
)
LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
OPT_SCALING = (
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm"),
    ("self_attn.v_proj", ["self_attn.out_proj"], "linear"),
    ("final_layer_norm", ["fc1"], "norm"),
    ("fc1", ["fc2"], "linear"),
)


@dataclass(frozen=True)
class Family:
    """What compress does with one ``config.model_type``."""

    model_type: str
    scaling: tuple = ()              # AWQ's (producer, consumers, kind) groups; () = AWQ leaves the family alone
    norm_offset: float = 0.0         # RMSNorm multiplies by (offset + weight): Gemma's 1
    structured_pruning: bool = False  # Llama-shaped MLP and GQA attention: channels and head groups removable
    onnx_export: bool = False        # the decoder builder of export/llama.py reproduces it
    # the rotate pass: the layers writing into the residual stream, when every block is pre-norm (RMSNorm before
    # each sub-layer, nothing between a writer and the residual add); () = the stream cannot be rotated
    residual_writers: tuple = ()


FAMILIES = {f.model_type: f for f in (
    Family("llama", LLAMA_SCALING, structured_pruning=True, onnx_export=True, residual_writers=LLAMA_WRITERS),
    Family("mistral", LLAMA_SCALING, structured_pruning=True, onnx_export=True, residual_writers=LLAMA_WRITERS),
    Family("qwen2", LLAMA_SCALING, structured_pruning=True, onnx_export=True, residual_writers=LLAMA_WRITERS),
    Family("qwen3", LLAMA_SCALING, structured_pruning=True, onnx_export=True, residual_writers=LLAMA_WRITERS),
    Family("gemma", LLAMA_SCALING, norm_offset=1.0, onnx_export=True, residual_writers=LLAMA_WRITERS),
    Family("gemma2", GEMMA2_SCALING, norm_offset=1.0, onnx_export=True),
    Family("gemma3_text", GEMMA2_SCALING, norm_offset=1.0, onnx_export=True),
    Family("phi3", PHI3_SCALING, onnx_export=True, residual_writers=LLAMA_WRITERS),
    Family("opt", OPT_SCALING),
    Family("gpt2"),
)}


def family(model_type: str) -> Family:
    """The family's entry; a family not in the table is compressed generically (blocks found, no AWQ folding,
    no structured pruning, no ONNX export)."""
    return FAMILIES.get(model_type) or Family(model_type)


def supporting(feature: str) -> list[str]:
    """The model types whose entry has ``feature`` (a boolean field of :class:`Family`) set."""
    return [t for t, f in FAMILIES.items() if getattr(f, feature)]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose items are all of one class."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if any(isinstance(m, nn.Linear | CompressedLinear) for m in mod[0].modules()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise PlanError(f"no decoder blocks found in {type(model).__name__}",
                        "compress supports decoder-only models with a list of transformer blocks")
    return best


def scaling_groups(model_type: str, block: nn.Module) -> list[tuple[str, list[str], str]]:
    """The foldable (producer, consumers) pairs of one block, skipping pairs whose shapes do not line up or whose
    consumers rotate their input at run time (``modules.rotate_input``). Under grouped-query attention v_proj ->
    o_proj is kept: each value channel feeds one o_proj input channel per query head of its group (see
    :func:`consumer_channels`)."""
    out = []
    for producer, consumers, kind in family(model_type).scaling:
        try:
            prod = block.get_submodule(producer)
            cons = [block.get_submodule(c) for c in consumers]
        except AttributeError:
            continue
        if any(getattr(c, "input_rotation", None) is not None for c in cons):
            continue  # a transform at run time sits between them: a channel's scale would not reach its consumer
        width = linear_weight(prod).shape[0]
        one_to_one = all(linear_weight(c).shape[1] == width for c in cons)
        if one_to_one or consumer_channels(block, producer, cons) is not None:
            out.append((producer, consumers, kind))
    return out


def consumer_channels(block: nn.Module, producer: str, consumers: list[nn.Module]):
    """For v_proj -> o_proj under grouped-query attention: the value channel each o_proj input
    channel reads (query head ``h`` reads KV head ``h // groups``), else None (one to one)."""
    width = linear_weight(block.get_submodule(producer)).shape[0]
    attn = getattr(block, "self_attn", None)
    head_dim, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", 1)
    if not producer.endswith("v_proj") or head_dim is None or groups <= 1:
        return None
    if any(linear_weight(c).shape[1] != width * groups for c in consumers):
        return None
    j = torch.arange(width * groups)
    return (j // head_dim) // groups * head_dim + j % head_dim


def norm_modules(module: nn.Module) -> list[nn.Module]:
    """The norms inside ``module`` that carry a gain vector (RMSNorm / LayerNorm ``weight``), in module order."""
    return [m for m in module.modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]
