"""compressed-tensors ``pack-quantized``: the checkpoint format vLLM, SGLang, TensorRT-LLM and
``transformers.from_pretrained`` (with the ``compressed-tensors`` package) read.

Every integer-grid layer (``WeightFormat.integer_grid``) is written with the very codes, scales and zero points
the passes chose, never re-quantized. The value of a weight is ``(q - zero_point) * scale`` with ``q`` and the
zero point signed, ``q = code - 2^(bits-1)``; the bytes:

    NAME.weight_packed       int32 [out, ceil(in * bits / 32)]: each row a little-endian bit stream, weight k at
                             bits [k*bits, (k+1)*bits) holding q + 2^(bits-1), i.e. our unsigned code (the same
                             stream as ``compress.packing``, padded to whole 32-bit words)
    NAME.weight_scale        float16 [out, groups]
    NAME.weight_zero_point   asymmetric grids only: int32 [ceil(out * bits / 32), groups], the unsigned zero
                             points packed the same way along the output rows (column by column)
    NAME.weight_shape        int64 [2]

``config.json`` gets ``quantization_config``: one config group per distinct scheme (``targets: [Linear]`` when
one scheme covers every compressed layer, else the layers' names), ``ignore`` listing the linear layers kept in
floating point, and a ``sparsity_config`` describing 2:4 layers (stored dense: pruned weights hold their group's
zero point). Formats without an integer grid (code books, outliers, unstructured sparsity) are refused, naming
the layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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

TARGET = "compressed-tensors"
RECIPE_KEY = "compressed_tensors"  # its section under the recipe's `export`
READER = "transformers + compressed-tensors"
FORMAT = "pack-quantized"
FORMAT_VERSION = "0.20.0"  # the compressed-tensors release whose reader the tests run
VLLM_BITS = (4, 8)          # vLLM's WNA16 kernels (Marlin, Machete, Exllama)
VLLM_GROUPS = (32, 64, 128)  # besides per channel


def scheme(grid: IntegerGrid, in_features: int) -> dict:
    """The ``weights`` quantization arguments of one layer."""
    channel = grid.group_size >= in_features
    return {"num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric, "dynamic": False, "actorder": None,
            "strategy": "channel" if channel else "group", "group_size": None if channel else grid.group_size,
            "observer": "minmax"}


def layer_tensors(grid: IntegerGrid) -> dict[str, torch.Tensor]:
    rows, cols = grid.codes.shape
    t = {"weight_packed": pack_rows_int32(grid.codes, grid.bits), "weight_scale": grid.scales.half().contiguous(),
         "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not grid.symmetric:
        t["weight_zero_point"] = pack_rows_int32(grid.zeros.t(), grid.bits).t().contiguous()
    return t


def check_passes(passes, engine: str | None) -> None:
    """Before any compute: every pass's codes fit the format (and ``engine``'s kernels), else one ExportError."""
    from ..errors import ExportError

    for p, spec in written_specs(passes, TARGET, RECIPE_KEY, holds_embeddings=False):
        group = spec.group_size
        if engine == "vllm" and (spec.bits not in VLLM_BITS or (group is not None and group not in VLLM_GROUPS)):
            raise ExportError(f"{TARGET} for vLLM: {p.name} writes {spec.bits}-bit codes in groups of "
                              f"{group or 'a row'}; vLLM's kernels take {' or '.join(map(str, VLLM_BITS))} "
                              f"bits in groups of {', '.join(map(str, VLLM_GROUPS))} or per channel",
                              "change the pass's bits / group_size, or drop `target: vllm`")


def vllm_problem(grid: IntegerGrid, shape: tuple[int, int]) -> str | None:
    """Why vLLM's kernels would not take this layer, or None."""
    rows, cols = shape
    if grid.bits not in VLLM_BITS:
        return f"{grid.bits}-bit weights (vLLM's kernels take {' or '.join(map(str, VLLM_BITS))} bits)"
    if grid.group_size < cols and grid.group_size not in VLLM_GROUPS:
        return f"group size {grid.group_size} (vLLM takes {', '.join(map(str, VLLM_GROUPS))} or per channel)"
    if grid.sparsity is not None and not grid.symmetric:
        return f"{grid.sparsity} sparsity with zero points (vLLM's 2:4 kernels are symmetric)"
    return None


def write(ckpt: CheckpointLayers, out_dir: Path, engine: str | None, max_shard_bytes: int) -> dict:
    """Write the export into ``out_dir``: safetensors shards, config.json, tokenizer."""
    tensors, config = convert(ckpt, engine == "vllm")
    write_safetensors_export(ckpt, out_dir, tensors, config, max_shard_bytes)
    return {"checkpoint_format": FORMAT}


def convert(ckpt: CheckpointLayers, vllm: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) of the export. ``vllm``: also refuse layers vLLM's kernels would not take."""
    def check(name, grid, shape):
        if grid.group_size < shape[1] and shape[1] % grid.group_size:
            raise refuse(TARGET, name, f"groups of {grid.group_size} do not divide its {shape[1]} inputs (the "
                         "readers size scales as whole groups)", "choose a group size dividing the layer widths, or "
                         "ONNX")
        problem = vllm_problem(grid, shape) if vllm else None
        if problem:
            raise refuse(f"{TARGET} for vLLM", name, problem, "change the recipe's bits / group_size, or drop "
                         "`target: vllm`")

    grids, dense = split_layers(ckpt, TARGET, "integer grids (RTN, GPTQ, AWQ, mixed precision, 2:4)", check,
                                holds_embeddings=False)
    tensors: dict[str, torch.Tensor] = {}
    for name, grid in grids.items():
        tensors.update({f"{name}.{k}": v for k, v in layer_tensors(grid).items()})
        if name in ckpt.biases:
            tensors[f"{name}.bias"] = ckpt.biases[name]
    with_other_tensors(ckpt, tensors, dense)
    config = dict(ckpt.config)
    config["dtype"] = ckpt.dense_dtype
    config.pop("torch_dtype", None)
    config["quantization_config"] = quantization_config(grids, {n: ckpt.layers[n].shape[1] for n in grids},
                                                        linear_names(ckpt.config))
    return tensors, config


def quantization_config(grids: dict[str, IntegerGrid], widths: dict[str, int], linears: list[str]) -> dict:
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, grid in grids.items():
        args = scheme(grid, widths[name])
        groups.setdefault(repr(sorted(args.items())), (args, []))[1].append(name)
    single = len(groups) == 1
    config_groups: dict[str, Any] = {f"group_{i}": {"targets": ["Linear"] if single else names, "weights": args,
                                    "input_activations": None, "output_activations": None, "format": FORMAT}
                     for i, (args, names) in enumerate(groups.values())}
    ignore = [n for n in linears if n not in grids]
    qc: dict[str, Any] = {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
          "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "version": FORMAT_VERSION}
    sparse = sorted(n for n, g in grids.items() if g.sparsity is not None)
    if sparse:
        structures = {grids[n].sparsity for n in sparse}
        qc["sparsity_config"] = {"format": "dense", "sparsity_structure": structures.pop() if len(structures) == 1
                                 else "unstructured", "targets": sparse, "ignore": [],
                                 "global_sparsity": _global_sparsity(grids, sparse)}
    return qc


def _global_sparsity(grids: dict[str, IntegerGrid], sparse: list[str]) -> float:
    """Share of the quantized weights pruned (N:M layers prune 1 - N/M of theirs)."""
    def pruned(g: IntegerGrid) -> float:
        n, m = (int(x) for x in str(g.sparsity).split(":"))
        return g.codes.numel() * (1 - n / m)
    return sum(pruned(grids[n]) for n in sparse) / sum(g.codes.numel() for g in grids.values())


def read_back(out_dir: Path):
    """The export as ``transformers`` loads it with the ``compressed-tensors`` package, in float32.

    transformers 5.24 has two paths and each reads only part of what vLLM reads: its default path applies each
    layer's own config group but sizes asymmetric zero points unpacked and refuses the packed ones; its
    ``dequantize=True`` path reads zero points but decodes every dense layer with the first config group's scheme.
    So: symmetric grids (any number of groups) go through the default path, one asymmetric group through
    ``dequantize=True``, and several groups with zero points, which neither path reads, are refused here."""
    import json
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    groups = json.loads((out_dir / "config.json").read_text())["quantization_config"]["config_groups"].values()
    asymmetric = any(not g["weights"]["symmetric"] for g in groups)
    if asymmetric and len(groups) > 1:
        raise ValueError("transformers cannot read several config groups with zero points (its dequantize path "
                         "decodes every layer with the first group's scheme); vLLM reads them: --no-validate "
                         "keeps the export unchecked")
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **options).eval()
