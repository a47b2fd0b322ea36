"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel, read by transformers with ``quantization_config.quant_method
gptq``, vLLM, SGLang, TGI, ExLlama): the hub's most common quantized format.

Every integer-grid layer (``WeightFormat.integer_grid``) is written with the codes, scales and zero points the
passes chose. A weight's value is ``scale[g] * (code - zero[g])`` with ``g = g_idx[k]``; the bytes of layer NAME
``[out, in]`` with ``G`` groups (``desc_act`` false: our act-order quantizes in static groups, so ``g_idx`` is
``k // group_size`` whatever the solve order was):

    NAME.qweight  int32 [in * bits / 32, out]: column ``j`` is weight row ``j`` as one little-endian bit stream,
                  input ``k`` at bits ``[k*bits, (k+1)*bits)`` (for 3 bits, values straddle words)
    NAME.qzeros   int32 [G, out * bits / 32]: row ``g`` the zero points of group ``g`` along the outputs, the same
                  bit stream, each stored as ``zero - 1`` (``checkpoint_format: gptq``, the "v1" convention every
                  reader expects) or as ``zero`` (``gptq_v2``, written only when an asymmetric group has zero 0,
                  which v1 cannot hold; GPTQModel reads v2, vLLM does not)
    NAME.scales   float16 [G, out]
    NAME.g_idx    int32 [in]

``config.json`` gets ``quantization_config`` (``quant_method: gptq``) with the most common scheme as its
``bits`` / ``group_size`` / ``sym`` and GPTQModel's ``dynamic`` rules for the rest: ``+:^NAME$`` with the layer's
own scheme (mixed precision), ``-:^NAME$`` for a linear layer of the decoder kept in floating point. 2:4 layers are
written as their dense codes (the format has no sparsity metadata). ``quantize_config.json`` repeats it for
AutoGPTQ-era readers.

GPTQModel (the reference reader) needs a newer torch than this project's CPU wheel, so :func:`read_back` decodes
the files by the layout above, independently of the writer's packing code, into a float transformers model.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..errors import ExportError
from ..formats.base import IntegerGrid
from ..packing import pack_rows_int32
from .served import (
    CheckpointLayers,
    linear_names,
    refuse,
    split_layers,
    with_other_tensors,
    write_safetensors_export,
    written_specs,
)

TARGET = "gptq"
RECIPE_KEY = "gptq"  # its section under the recipe's `export`
READER = "the documented GPTQ layout (GPTQModel needs torch >= 2.14)"
BITS = (2, 3, 4, 8)


def check_passes(passes, engine: str | None) -> None:
    """Before any compute: every pass's codes fit the format, else one ExportError."""
    for p, spec in written_specs(passes, TARGET, RECIPE_KEY, holds_embeddings=False):
        if spec.bits not in BITS:
            raise ExportError(f"{TARGET} export: {p.name} writes {spec.bits}-bit codes; the GPTQ format holds "
                              f"{', '.join(map(str, BITS))} bits", "change the pass's bits")


def _words_to_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words ``[rows, w]`` -> int64 ``[rows, n]``: each row a little-endian bit stream, value ``k`` at bits
    ``[k*bits, (k+1)*bits)`` (decoded a value at a time, independently of ``compress.packing``)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(words.shape[0], n, dtype=torch.int64)
    mask = (1 << bits) - 1
    for k in range(n):
        word, shift = divmod(k * bits, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        out[:, k] = v & mask
    return out


def layer_tensors(grid: IntegerGrid, v2: bool) -> dict[str, torch.Tensor]:
    rows, cols = grid.codes.shape
    size = min(grid.group_size, cols)
    stored_zeros = grid.zeros.to(torch.int64) - (0 if v2 else 1)
    return {"qweight": pack_rows_int32(grid.codes, grid.bits).t().contiguous(),
            "qzeros": pack_rows_int32((stored_zeros & ((1 << grid.bits) - 1)).t(), grid.bits),
            "scales": grid.scales.half().t().contiguous(),
            "g_idx": (torch.arange(cols, dtype=torch.int32) // size)}


def _scheme(grid: IntegerGrid, in_features: int) -> dict:
    return {"bits": grid.bits, "group_size": -1 if grid.group_size >= in_features else grid.group_size,
            "sym": grid.symmetric, "desc_act": False}


def _check_layer(name: str, grid: IntegerGrid, shape: tuple[int, int]) -> None:
    rows, cols = shape
    if grid.bits not in BITS:
        raise refuse(TARGET, name, f"{grid.bits}-bit codes (the format holds {', '.join(map(str, BITS))} bits)",
                     "choose one of those bits, or export compressed-tensors / ONNX")
    if grid.group_size < cols and cols % grid.group_size:
        raise refuse(TARGET, name, f"groups of {grid.group_size} do not divide its {cols} inputs",
                     "choose a group size dividing the layer widths, or ONNX")
    if cols * grid.bits % 32 or rows * grid.bits % 32:
        raise refuse(TARGET, name, f"{rows} x {cols} does not fill whole 32-bit words at {grid.bits} bits",
                     "export compressed-tensors or ONNX")


def write(ckpt: CheckpointLayers, out_dir: Path, engine: str | None, max_shard_bytes: int) -> dict:
    """Write the export into ``out_dir``: safetensors shards, config.json, tokenizer, quantize_config.json for
    readers of the AutoGPTQ era."""
    tensors, config = convert(ckpt, engine == "vllm")
    write_safetensors_export(ckpt, out_dir, tensors, config, max_shard_bytes)
    (out_dir / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2) + "\n")
    return {"checkpoint_format": config["quantization_config"]["checkpoint_format"]}


def convert(ckpt: CheckpointLayers, vllm: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) of the export. ``vllm``: refuse what vLLM's gptq loaders would not read (v2 zeros)."""
    grids, dense = split_layers(ckpt, TARGET, "integer grids (RTN, GPTQ, AWQ, mixed precision, 2:4 as dense "
                                "codes)", _check_layer, holds_embeddings=False)
    v2 = any(not g.symmetric and bool((g.zeros == 0).any()) for g in grids.values())
    if v2 and vllm:
        zero = next(n for n, g in grids.items() if not g.symmetric and bool((g.zeros == 0).any()))
        raise refuse(f"{TARGET} for vLLM", zero, "an asymmetric group with zero point 0 needs gptq_v2, which vLLM "
                     "does not read", "use symmetric: true, or export compressed-tensors")
    tensors: dict[str, torch.Tensor] = {}
    for name, grid in grids.items():
        tensors.update({f"{name}.{k}": v for k, v in layer_tensors(grid, v2).items()})
        if name in ckpt.biases:
            tensors[f"{name}.bias"] = ckpt.biases[name].half()
    with_other_tensors(ckpt, tensors, dense)
    config = dict(ckpt.config)
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    decoder_dense = [n for n in linear_names(ckpt.config) if n not in grids and not n.startswith("lm_head")]
    config["quantization_config"] = quantization_config(grids, {n: ckpt.layers[n].shape[1] for n in grids},
                                                        decoder_dense, v2)
    return tensors, config


def quantization_config(grids: dict[str, IntegerGrid], widths: dict[str, int], kept_dense: list[str],
                        v2: bool) -> dict:
    schemes = {n: _scheme(g, widths[n]) for n, g in grids.items()}
    counts = Counter(json.dumps(s, sort_keys=True) for s in schemes.values())
    default = json.loads(counts.most_common(1)[0][0]) if counts else {"bits": 4, "group_size": 128, "sym": True,
                                                                     "desc_act": False}
    dynamic = {f"+:^{re.escape(n)}$": s for n, s in schemes.items() if s != default}
    dynamic.update({f"-:^{re.escape(n)}$": {} for n in kept_dense})
    qc = {"quant_method": "gptq", "checkpoint_format": "gptq_v2" if v2 else "gptq", "true_sequential": True,
          "static_groups": False, "damp_percent": 0.01, "lm_head": any(n.startswith("lm_head") for n in grids),
          "pack_dtype": "int32", **default}
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def _scheme_of(name: str, qc: dict) -> dict | None:
    """The scheme ``qc`` gives layer ``name`` (GPTQModel's rules: the first matching ``dynamic`` rule wins, ``-:``
    keeps the layer in floating point), or None."""
    for pattern, override in qc.get("dynamic", {}).items():
        sign, _, regex = pattern.partition(":") if pattern[:2] in ("+:", "-:") else ("+", ":", pattern)
        if re.match(regex, name):
            return None if sign == "-" else {**qc, **override}
    return qc


def decode_layer(tensors: dict[str, torch.Tensor], scheme: dict, shape: tuple[int, int]) -> torch.Tensor:
    """One layer's float32 weight ``[out, in]`` from its qweight / qzeros / scales / g_idx, by the layout above."""
    rows, cols = shape
    bits = scheme["bits"]
    codes = _words_to_codes(tensors["qweight"].t(), bits, cols)                   # [out, in]
    zeros = _words_to_codes(tensors["qzeros"], bits, rows)                        # [G, out]
    if scheme.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1
    g = tensors["g_idx"].to(torch.int64)
    scales = tensors["scales"].float()                                           # [G, out]
    return ((codes - zeros.t()[:, g]).float() * scales.t()[:, g])


def read_back(out_dir: Path):
    """The export decoded by the GPTQ layout into a float32 ``transformers`` model (see the module docstring)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((out_dir / "config.json").read_text())
    qc = raw.pop("quantization_config")
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored: dict[str, torch.Tensor] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            stored.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118 (safe_open is not a dict)
    state = {}
    for key in [k for k in stored if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        scheme = _scheme_of(name, qc)
        if scheme is None:
            raise ExportError(f"{out_dir}: {name} has GPTQ tensors but the config keeps it in floating point",
                              "the export is damaged: write it again")
        try:
            layer = {k: stored.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
            state[f"{name}.weight"] = decode_layer(layer, scheme, (layer["scales"].shape[1], layer["g_idx"].shape[0]))
        except (KeyError, IndexError, RuntimeError) as e:
            raise ExportError(f"{out_dir}: GPTQ layer {name} is damaged ({type(e).__name__}: {e})",
                              "write the export again") from None
    state.update({k: v.float() for k, v in stored.items()})
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ExportError(f"{out_dir}: the GPTQ export does not fit its config ({str(e).splitlines()[-1].strip()})",
                          "write the export again") from None
    missing = [m for m in missing if not (config.tie_word_embeddings and m.startswith("lm_head"))]
    if missing or unexpected:
        raise ExportError(f"{out_dir}: the GPTQ export does not match the model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})", "write it again")
    model.tie_weights()
    return model
