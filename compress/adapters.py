"""Per-family facts about decoder blocks that generic discovery cannot infer: which module
produces the input of which linear layers, so an input-channel scaling can be folded into it.

Each entry: (producer, [consumers], producer kind). Scaling the consumers' input channels by ``s``
and the producer's output by ``1/s`` leaves the float model unchanged when the producer is an
RMSNorm/LayerNorm (its weight, and bias, scale per channel), or a linear layer whose output reaches
the consumers through an elementwise product (Llama's ``act(gate) * up``) or a positively
homogeneous activation (ReLU in OPT).
"""

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
    line up (e.g. v_proj -> o_proj under grouped-query attention)."""
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
        if all(c.weight.shape[1] == width for c in cons):
            out.append((producer, consumers, kind))
    return out
