"""How much the language-model loss cares about each output channel of each linear layer.

``output_fisher`` runs forward + backward on calibration tokens and accumulates, per output channel
``c`` of each layer, ``F_c = sum over tokens of (dL/dy_c)^2``: the diagonal empirical Fisher of the
layer's outputs. With the input Hessian ``H``, a weight change ``D`` then costs about
``sum_c F_c (D H D^T)_cc`` in loss (the Kronecker-factored approximation of the loss Hessian used
by K-FAC and, for weights, by SqueezeLLM's Fisher-weighted k-means).
"""

from __future__ import annotations

import torch
from torch import nn


def output_fisher(model, layer_names: list[str], tokens: torch.Tensor, device="cpu",
                  chunk: int = 1) -> dict[str, torch.Tensor]:
    """Per-layer ``F_c`` over ``tokens`` ([sequences, length]), ``chunk`` sequences per backward.

    Only activation gradients are computed (parameters are frozen for the duration), and one sequence
    at a time by default: the saved activations and the vocabulary-sized logits of a backward are the
    peak memory of a mixed-precision run (4 sequences of 512 tokens with weight gradients took
    SmolLM2-135M's process to 7.1 GB)."""
    fisher: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(_module, _args, out):
            if out.requires_grad:
                def grad_hook(g):
                    sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                    fisher[name] = fisher[name] + sq if name in fisher else sq
                out.register_hook(grad_hook)
        return fn

    for name in layer_names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    embed = model.get_input_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for ids in tokens.split(chunk):
                ids = ids.to(device)
                x = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=x, use_cache=False).logits[:, :-1]
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   ids[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    return {k: v.cpu() for k, v in fisher.items()}
