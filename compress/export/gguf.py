"""GGUF, the file llama.cpp, Ollama and LM Studio run, written through the ``gguf`` package's writer.

A layer whose integer grid is exactly a GGUF block type is written with our codes and scales, never re-quantized:

    4-bit symmetric, groups of 32  -> Q4_0: per block fp16 ``d``, 16 bytes of nibbles; value ``d * (q - 8)``
    8-bit symmetric, groups of 32  -> Q8_0: per block fp16 ``d``, 32 int8; value ``d * q``
    4-bit asymmetric, groups of 32 -> Q4_1: per block fp16 ``d`` and ``m``, 16 bytes; value ``d * q + m`` with
                                      ``m = -zero * scale`` rounded to float16 (the one rounding of this export)
    5-bit symmetric / asymmetric, groups of 32 -> Q5_0 / Q5_1: as Q4_0 / Q4_1 with the fifth bits of the 32
                                      codes in 4 bytes after ``d`` (and ``m``), bit ``j`` for code ``j``
    llama.cpp's k-quants (grids ``gguf-q2_k`` ... ``gguf-q6_k``): the layer's stored super-blocks, copied

(Q4/Q5 nibbles: byte ``j`` of a block holds value ``j`` in its low and value ``j + 16`` in its high half.)
Other grids are refused, naming the layer. Tensors no pass compressed keep the checkpoint's dense dtype (F16,
BF16 or F32); norms are F32. Architectures: llama (Llama, and Mistral without a sliding window), qwen2, qwen3.
For llama, Q and K projections are stored with llama.cpp's rotary row order (each head's two halves
interleaved), which readers undo; qwen2/qwen3 rotate NEOX-style and keep the rows as they are. Metadata: the
architecture's hyper-parameters, the BPE
vocabulary with merges, special tokens and the chat template. ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer)
is copied from the source GGUF when the model came from one, else "default".

The export is read back by ``transformers`` (``gguf_file=``, decoding through the ``gguf`` package) and compared;
``bench/gguf.py`` runs it in llama.cpp itself.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from ..formats.base import IntegerGrid
from ..formats.kquant import KQuantWeight
from ..kquants import ktype
from .served import CheckpointLayers, refuse, split_layers, with_other_tensors, written_specs

TARGET = "gguf"
RECIPE_KEY = "gguf"  # its section under the recipe's `export`
READER = "transformers (gguf_file=) with the gguf package"
FILE = "model.gguf"
# config.model_type -> the GGUF architecture this writer knows (Mistral without a sliding window is llama.cpp's llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ROTARY_ROW_ORDER = {"llama"}  # architectures whose Q/K rows llama.cpp keeps in its own rotary order (others: NEOX)
BLOCK = 32


def _types():
    from gguf import GGMLQuantizationType as T

    return T


def block_type(grid: IntegerGrid, in_features: int):
    """The GGUF type that holds ``grid`` exactly (Q4_1: up to its float16 minimum), or None."""
    if grid.group_size != BLOCK or in_features % BLOCK or grid.sparsity is not None:
        return None
    return _block_types().get((grid.bits, grid.symmetric))


@cache
def _block_types():
    """(bits, symmetric) of a grid in groups of 32 -> the GGUF type holding it."""
    T = _types()
    return {(4, True): T.Q4_0, (4, False): T.Q4_1, (5, True): T.Q5_0, (5, False): T.Q5_1, (8, True): T.Q8_0}

HOLDS = "4 or 5 bits in groups of 32 (Q4_0, Q4_1, Q5_0, Q5_1), 8-bit symmetric (Q8_0), or a k-quant grid"


def check_passes(passes, engine: str | None) -> None:
    """Before any compute: every pass writes a grid GGUF holds, else one ExportError."""
    for p, spec in written_specs(passes, TARGET, RECIPE_KEY, holds_k_quants=True):
        if ktype(spec.grid) is None and (spec.group_size != BLOCK or (spec.bits, spec.symmetric) not in _block_types()):
            raise ExportError(f"{TARGET} export: {p.name} writes {spec.bits}-bit codes in groups of "
                              f"{spec.group_size or 'a row'}{'' if spec.symmetric else ' with zero points'}; "
                              f"GGUF holds {HOLDS}", "set group_size: 32 with bits 4, 5 or 8, or grid: gguf-q4_k")


def _check_layer(name: str, grid: IntegerGrid, shape: tuple[int, int]) -> None:
    if block_type(grid, shape[1]) is None:
        raise refuse(TARGET, name, f"{grid.bits}-bit codes in groups of {grid.group_size}"
                     f"{' (sparse)' if grid.sparsity else ''} are no GGUF block type", f"GGUF holds {HOLDS}")


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.half().contiguous().view(torch.uint8).reshape(*t.shape, 2)


def encode(grid: IntegerGrid, kind) -> np.ndarray:
    """``grid`` as GGUF blocks: uint8 ``[rows, blocks * block_bytes]``."""
    T = _types()
    rows, cols = grid.codes.shape
    codes = grid.codes.reshape(rows, cols // BLOCK, BLOCK)
    parts = [_fp16_bytes(grid.scales)]
    if kind == T.Q8_0:
        parts.append((codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if kind in (T.Q4_1, T.Q5_1):
            parts.append(_fp16_bytes(-(grid.zeros.float() * grid.scales.float())))
        if kind in (T.Q5_0, T.Q5_1):  # the fifth bits: byte k holds codes 8k..8k+7's, one a bit
            high = (codes >> 4).reshape(rows, -1, 4, 8) << torch.arange(8, dtype=torch.uint8)
            parts.append(high.sum(-1, dtype=torch.uint8))
            codes = codes & 0xF
        parts.append(codes[..., :16] | (codes[..., 16:] << 4))
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()


def rotary_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q or K projection in llama.cpp's rotary order: within each head, rows ``[0, d/2)`` and
    ``[d/2, d)`` interleaved (the HF to GGUF conversion every reader undoes)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _permuted(grid: IntegerGrid, heads: int) -> IntegerGrid:
    return IntegerGrid(rotary_rows(grid.codes, heads), rotary_rows(grid.scales, heads),
                       rotary_rows(grid.zeros, heads), grid.bits, grid.group_size, grid.symmetric, grid.sparsity)


def _heads_of(name: str, config: dict) -> int | None:
    if name.endswith("q_proj"):
        return config["num_attention_heads"]
    if name.endswith("k_proj"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ExportError(f"{TARGET} export: rope type '{kind}' is not written yet", "export compressed-tensors or "
                          "ONNX for this model")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _dense(t: torch.Tensor, name: str) -> np.ndarray:
    if t.dim() == 1 or "norm" in name:
        return t.float().numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # written as BF16 (raw_dtype below)
    return t.numpy()


def write(ckpt: CheckpointLayers, out_dir: Path, engine: str | None, max_shard_bytes: int) -> dict:
    """``out_dir/model.gguf`` (one file) and the tokenizer files; returns what export.json records."""
    import gguf

    config = ckpt.config
    arch = ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise ExportError(f"{TARGET} export: model type '{config.get('model_type')}' is not written yet "
                          f"(knows: {', '.join(ARCHITECTURES)})", "export compressed-tensors or ONNX")
    window = config.get("sliding_window")
    if window and (config.get("use_sliding_window", True) and window < config.get("max_position_embeddings", 0)):
        raise ExportError(f"{TARGET} export: sliding-window attention ({window} tokens) is not written",
                          "export compressed-tensors or ONNX for this model")
    T = gguf.GGMLQuantizationType
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    writer = gguf.GGUFWriter(out_dir / FILE, arch)
    permute = arch in ROTARY_ROW_ORDER
    k_quants = {name: fmt for name, fmt in ckpt.layers.items() if isinstance(fmt, KQuantWeight)}
    grids, dense = split_layers(ckpt, TARGET, HOLDS, _check_layer, skip=set(k_quants))
    counts: dict[str, int] = {}
    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = []
    layers: dict[str, IntegerGrid | KQuantWeight] = {**grids, **k_quants}
    for name, layer in layers.items():
        heads = _heads_of(name, config) if permute else None
        if isinstance(layer, KQuantWeight):  # the stored super-blocks are GGUF's own bytes
            kind = getattr(T, layer.kt.name)
            data = (rotary_rows(layer.blocks, heads) if heads else layer.blocks).numpy()
        else:
            kind = block_type(layer, layer.codes.shape[1])
            data = encode(_permuted(layer, heads) if heads else layer, kind)
        tensors.append((f"{name}.weight", data, kind))
        counts[kind.name] = counts.get(kind.name, 0) + 1
        if name in ckpt.biases:
            bias = ckpt.biases[name].float()
            tensors.append((f"{name}.bias", (rotary_rows(bias, heads) if heads else bias).numpy(), None))
    for name, t in with_other_tensors(ckpt, {}, dense).items():
        heads = _heads_of(name.rsplit(".", 1)[0], config) if permute else None
        tensors.append((name, _dense(rotary_rows(t, heads) if heads and "norm" not in name else t, name), None))
    # the file type llama.cpp shows: the k-quant when there is one (its narrow layers fall back), else the commonest
    k_types = [kind for kind in counts if kind.endswith("_K")]
    _metadata(writer, ckpt, max(k_types or counts, key=lambda k: counts[k]) if counts else None)
    for hf_name, data, kind in tensors:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"{TARGET} export: no GGUF name for tensor {hf_name}", "export compressed-tensors or "
                              "ONNX for this model")
        if kind is not None:
            writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=kind)
        elif data.dtype == np.uint16:
            writer.add_tensor(gname, data, raw_dtype=T.BF16)
        else:
            writer.add_tensor(gname, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ckpt.path).save_pretrained(out_dir)
    return {"types": counts, "tokenizer_pre": _pre_tokenizer(ckpt)}


def _file_type(main: str | None, dense_dtype: str):
    from gguf import LlamaFileType as F

    if main is None:
        return {"float16": F.MOSTLY_F16, "bfloat16": F.MOSTLY_BF16}.get(dense_dtype, F.ALL_F32)
    return {"Q4_0": F.MOSTLY_Q4_0, "Q4_1": F.MOSTLY_Q4_1, "Q5_0": F.MOSTLY_Q5_0, "Q5_1": F.MOSTLY_Q5_1,
            "Q8_0": F.MOSTLY_Q8_0, "Q2_K": F.MOSTLY_Q2_K, "Q3_K": F.MOSTLY_Q3_K_S, "Q4_K": F.MOSTLY_Q4_K_S,
            "Q5_K": F.MOSTLY_Q5_K_S, "Q6_K": F.MOSTLY_Q6_K}[main]


def _metadata(writer, ckpt: CheckpointLayers, main_type: str | None) -> None:
    import gguf

    c = ckpt.config
    heads = c["num_attention_heads"]
    writer.add_name(Path(ckpt.path).name)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(c.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # readers take head_dim from here (Qwen3's default is not hidden / heads)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type(_file_type(main_type, ckpt.dense_dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, ckpt)


def _tokenizer(writer, ckpt: CheckpointLayers) -> None:
    """The BPE vocabulary (token texts, types, merges), special tokens and chat template."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((ckpt.path / "tokenizer.json").read_text()) if (ckpt.path / "tokenizer.json").is_file() else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError(f"{TARGET} export: only BPE tokenizers are written yet", "export compressed-tensors or ONNX")
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    n = ckpt.config["vocab_size"]
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    kind = gguf.TokenType
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(kind.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(kind.NORMAL if i not in added else kind.CONTROL if added[i].special else kind.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(ckpt))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(ckpt.path, load_merges=True, n_vocab=n).add_to_gguf(writer)


def _pre_tokenizer(ckpt: CheckpointLayers) -> str:
    """``tokenizer.ggml.pre`` of the GGUF the model came from (recorded by the run), else "default"."""
    source = (ckpt.path / "compress.json")
    meta = json.loads(source.read_text()) if source.is_file() else {}
    return meta.get("gguf_tokenizer_pre") or "default"


def read_back(out_dir: Path):
    """The export as ``transformers`` loads a GGUF file (dequantized to float32 by the ``gguf`` package)."""
    from unittest import mock

    from transformers import AutoModelForCausalLM, modeling_gguf_pytorch_utils
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:  # its GGUF decoding has a tqdm bar of its own, which the switch above does not reach
        with mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", lambda items, **_: items):
            return AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=FILE, dtype=torch.float32).eval()
    finally:
        logging.enable_progress_bar()
