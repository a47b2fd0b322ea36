"""Per-family facts about decoder blocks that generic discovery cannot infer: which module
produces the input of which linear layers, so an input-channel scaling can be folded into it.

Each entry: (producer, [consumers], producer kind). Scaling the consumers' input channels by ``s``
and the producer's output by ``1/s`` leaves the float model unchanged when the producer is an
RMSNorm/LayerNorm (its weight, and bias, scale per channel), or a linear layer whose output reaches
the consumers through an elementwise product (Llama's ``act(gate) * up``) or a positively
homogeneous activation (ReLU in OPT).
"""

import torch
from torch import nn

LLAMA_LIKE = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm"),
    ("self_attn.v_proj", ["self_attn.o_proj"], "linear"),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "norm"),
    ("mlp.up_proj", ["mlp.down_proj"], "linear"),
]
OPT = [
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm"),
    ("self_attn.v_proj", ["self_attn.out_proj"], "linear"),
    ("final_layer_norm", ["fc1"], "norm"),
    ("fc1", ["fc2"], "linear"),
]
SCALING_GROUPS = {"llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE,
                  "opt": OPT}
NORM_OFFSET = {"gemma": 1.0, "gemma2": 1.0}  # Gemma's RMSNorm multiplies by (1 + weight)


def scaling_groups(model_type: str, block: nn.Module) -> list[tuple[str, list[str], str]]:
    """The foldable (producer, consumers) pairs of one block, skipping pairs whose shapes do not
    line up. Under grouped-query attention v_proj -> o_proj is kept: each value channel feeds one
    o_proj input channel per query head of its group (see :func:`consumer_channels`)."""
    table = SCALING_GROUPS.get(model_type)
    if table is None and model_type in NORM_OFFSET:
        table = LLAMA_LIKE
    out = []
    for producer, consumers, kind in table or []:
        try:
            prod = block.get_submodule(producer)
            cons = [block.get_submodule(c) for c in consumers]
        except AttributeError:
            continue
        width = prod.weight.shape[0]
        if all(c.weight.shape[1] == width for c in cons) or consumer_channels(block, producer, cons) is not None:
            out.append((producer, consumers, kind))
    return out


def consumer_channels(block: nn.Module, producer: str, consumers: list[nn.Module]):
    """For v_proj -> o_proj under grouped-query attention: the value channel each o_proj input
    channel reads (query head ``h`` reads KV head ``h // groups``), else None (one to one)."""
    width = block.get_submodule(producer).weight.shape[0]
    attn = getattr(block, "self_attn", None)
    head_dim, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", 1)
    if not producer.endswith("v_proj") or head_dim is None or groups <= 1:
        return None
    if any(c.weight.shape[1] != width * groups for c in consumers):
        return None
    j = torch.arange(width * groups)
    return (j // head_dim) // groups * head_dim + j % head_dim
