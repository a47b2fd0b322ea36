"""RMSNorm in the ONNX decoder, alone and fused with the residual add before it."""

from __future__ import annotations

import numpy as np

from ..formats.onnx_ops import as_float
from .graph import Graph


def epsilon(module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


def norm_weight(g: Graph, module, name: str, offset: float = 0.0) -> str:
    """The norm's float32 gain, ``offset + weight`` (Gemma's offset is 1)."""
    return as_float(g, f"{name}.weight", offset + module.weight.detach().float())


def rms_norm(g: Graph, x: str, module, name: str, offset: float = 0.0) -> str:
    """transformers' RMSNorm, x / sqrt(mean(x^2) + eps) * (offset + weight), in standard ops (the pattern
    onnxruntime fuses into its SimplifiedLayerNormalization)."""
    mean = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.const(epsilon(module), np.float32))))
    return g.op("Mul", normed, norm_weight(g, module, name, offset))


def add_and_norm(g: Graph, residual: str, delta: str, module, name: str, offset: float, fused: bool) -> tuple[str, str]:
    """(the RMSNorm of ``residual + delta``, ``residual + delta``): an Add and the norm, or fused, onnxruntime's
    ``com.microsoft::SkipSimplifiedLayerNormalization`` (one kernel, the same arithmetic)."""
    if not fused:
        total = g.op("Add", residual, delta)
        return rms_norm(g, total, module, name, offset), total
    gain = norm_weight(g, module, name, offset)
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", delta, residual, gain, outputs=4,
                               domain="com.microsoft", epsilon=epsilon(module))
    node = g.nodes[-1]
    node.output[1] = node.output[2] = ""  # the mean and inverse deviation (training outputs): not computed
    return normed, total
