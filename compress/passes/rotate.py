"""Incoherence processing: rotations folded into the weights, so that no channel of a layer's input stands out and
its weights quantize with less error. "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs" (Ashkboos et al.,
2024); "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice Codebooks" (Tseng et al., 2024).

- **Residual stream.** Every block of a pre-norm family reads the stream through an RMSNorm, which commutes with an
  orthogonal ``Q`` once its gain is folded into the layers it feeds (``||x Q|| = ||x||``). So the token embedding
  becomes ``E Q``, each layer reading the stream ``W diag(g) Q``, each layer writing into it (``o_proj``,
  ``down_proj``) ``Q^T W`` (and its bias ``b Q``), and the head ``W diag(g_final) Q``: the float model computes the
  same logits. A head tied to the embedding is untied (it is ``E diag(g) Q``, the lookup ``E Q``).
- **Values per head.** ``v_proj``'s rows of each key/value head are rotated by ``R^T`` and ``o_proj``'s columns of
  each query head by ``R`` (``R`` of the head dimension): attention mixes tokens, not channels, so it commutes.

``Q`` and ``R`` are randomized Hadamard transforms (``compress.rotation``; a random orthogonal matrix where no
Hadamard matrix of the order is built). All of the above is folded: no runtime cost.

- **Online** (``online: true``, QuaRot's online Hadamard): the MLP's nonlinearity sits between the up projection and
  the down projection, so no folded rotation reaches the down projection's input. There the layer stores ``W Q``
  (``Q`` a randomized Hadamard transform of the intermediate width) and reads ``x Q``, computed at run time by a
  fast Walsh-Hadamard transform (``OnlineHadamard``) in a forward pre-hook (``modules.rotate_input``), so the
  calibration statistics, every pass and every forward path see the rotated input; the model config records it
  (``modules.ONLINE_ROTATION``) for a loaded checkpoint and the exporters. AWQ leaves the (up, down) pair alone.

The pass runs first in a recipe; the embedding and head are rotated before the calibration inputs are captured, each
block when its turn comes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import PlanError
from ..families import family
from ..modules import ONLINE_ROTATION, embeddings_tied, linear_weight, rotate_input
from ..rotation import OnlineHadamard, random_rotation
from .base import Pass, PassConfig
from .registry import register


class RotateConfig(PassConfig):
    type: Literal["rotate"] = "rotate"
    seed: int = Field(0, description="seed of the random signs (or random orthogonal matrices)")
    values: bool = Field(True, description="also rotate each attention head's values (v_proj rows, o_proj columns)")
    online: bool = Field(False, description="also a randomized Hadamard transform on the down projection's input at "
                         "run time (QuaRot's online Hadamard: the weight stores W Q, the layer reads x Q); ONNX "
                         "exports apply it, GGUF / compressed-tensors / GPTQ readers cannot")

    @model_validator(mode="after")
    def _whole_blocks(self):
        if self.targets != ["*"] or self.exclude or self.overrides:
            raise ValueError("rotate turns every block whole (rotating some layers only would change the model): "
                             "give it no targets, exclude or overrides")
        return self


ONLINE_LAYER = "mlp.down_proj"  # the layer whose input the online transform rotates (its input: the MLP's width)


@register
class Rotate(Pass):
    name = "rotate"
    stage = "transform"
    Config = RotateConfig

    def check_plan(self, passes):
        if passes.index(self) != 0:
            raise PlanError("rotate must be the first pass (the passes before it would see another model)",
                            "move `- type: rotate` to the top of passes")

    def check_model(self, model) -> None:
        model_type = model.config.model_type
        if not family(model_type).residual_writers:
            raise PlanError(f"rotate: model type '{model_type}' is not a pre-norm family whose residual stream can "
                            "be rotated", "drop the rotate pass for this model")
        width = getattr(model.config, "intermediate_size", None)
        if self.cfg.online:
            try:
                OnlineHadamard(int(width or 0), self.cfg.seed)
            except ValueError as e:
                raise PlanError(f"rotate: online, at the MLP's width {width}: {e}", "set online: false") from None

    def runtime_transforms(self) -> list[str]:
        return [ONLINE_LAYER] if self.cfg.online else []

    def prepare(self, model) -> None:
        """Draw the rotations, untie the head, fold the final norm into it, and rotate the token embedding and the
        head."""
        self.check_model(model)
        config = model.config
        fam = family(config.model_type)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.q, self.kind = random_rotation(config.hidden_size, gen)
        heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.r, _ = random_rotation(self.head_dim, gen)
        self.offset, self.writers = fam.norm_offset, fam.residual_writers
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if embeddings_tied(model):
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
            config.tie_word_embeddings = False
            if hasattr(config, "get_text_config"):
                config.get_text_config().tie_word_embeddings = False
        _set(head, "weight", _f64(head.weight) * self._take_gain(model.model.norm) @ self.q)
        _set(emb, "weight", _f64(emb.weight) @ self.q)
        self.online = None
        if self.cfg.online:
            self.online = OnlineHadamard(int(config.intermediate_size), self.cfg.seed)
            setattr(config, ONLINE_ROTATION, {"layers": [ONLINE_LAYER], **self.online.meta()})

    def _take_gain(self, norm: nn.Module) -> torch.Tensor:
        """The norm's gain (``offset + weight``), which the caller folds into the layers it feeds; the norm's own
        gain becomes 1."""
        gain = self.offset + _f64(linear_weight(norm))
        _set(norm, "weight", torch.full_like(gain, 1 - self.offset))
        return gain

    def apply(self, work, replace) -> None:
        block, q = work.block, self.q
        for norm_name, consumers, kind in family(work.model_type).scaling:  # each norm and the layers reading it
            if kind != "norm":
                continue
            gain = self._take_gain(block.get_submodule(norm_name))
            for layer in (block.get_submodule(c) for c in consumers):
                _set(layer, "weight", _f64(linear_weight(layer)) * gain @ q)
        if self.cfg.values:
            self._rotate_values(block)
        for layer in (block.get_submodule(w) for w in self.writers):
            _set(layer, "weight", q.t() @ _f64(linear_weight(layer)))
            if layer.bias is not None:
                _set(layer, "bias", _f64(layer.bias) @ q)
        if self.online is not None:
            down = block.get_submodule(ONLINE_LAYER)
            _set(down, "weight", _f64(linear_weight(down)) @ self.online.matrix())
            rotate_input(down, self.online)
        for name in work.layers:
            work.notes[name] = {"rotation": self.kind}
            if self.online is not None and name.endswith("." + ONLINE_LAYER):
                work.notes[name]["online rotation"] = f"randomized Hadamard {self.online.factors()}"

    def _rotate_values(self, block):
        """Each value head's output (and the output projection's matching inputs) turned by ``r``; the values are a
        row range of a fused ``qkv_proj`` in Phi-3."""
        attn = block.self_attn
        hd, r = self.head_dim, self.r
        fused = getattr(attn, "v_proj", None) is None
        v = attn.qkv_proj if fused else attn.v_proj
        w = _f64(linear_weight(v))
        rows = slice(w.shape[0] - attn.config.num_key_value_heads * hd, None) if fused else slice(None)
        values = w[rows]
        w[rows] = (r.t() @ values.reshape(-1, hd, values.shape[1])).reshape(values.shape)
        _set(v, "weight", w)
        if v.bias is not None:
            b = _f64(v.bias)
            b[rows] = (b[rows].reshape(-1, hd) @ r).reshape(-1)
            _set(v, "bias", b)
        o = attn.o_proj
        w = _f64(linear_weight(o))
        _set(o, "weight", (w.reshape(w.shape[0], -1, hd) @ r).reshape(w.shape))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """``module.attr`` takes ``value`` in the dtype and device of the tensor it replaces."""
    old = getattr(module, attr)
    old.data = value.to(device=old.device, dtype=old.dtype)
