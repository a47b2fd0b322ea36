"""``compress export``: a compressed (or plain) model -> an ONNX folder, validated in onnxruntime.

Folder layout::

    model.onnx        the decoder graph (see ``llama.py``)
    genai.onnx        the same graph, its head reading each row's last token only (``head_positions.py``),
                      for onnxruntime-genai; it reads model.onnx.data too
    model.onnx.data   its initializers (external data): packed codes, tables, masks, scales
    export.json       inputs/outputs, how each layer's weight is stored and its bytes, sizes,
                      and the validation against PyTorch
    genai_config.json what onnxruntime-genai reads (``onnxruntime_genai.Model(folder)``)
    libcompress_ortops.so  our operators (``compress.ortops``), when the graph uses them
    config.json, generation_config.json, tokenizer files

Validation runs every time: the onnxruntime session and the PyTorch model read the same held-out
windows (prefill) and the same tokens one at a time through the KV cache (decode); the export
fails with :class:`ExportError` when the logits, top-1 tokens or perplexities differ beyond the
tolerances, and nothing is left behind.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import ortops
from ..errors import CheckpointError, ExportError, ExportMismatch, OutputError
from ..modules import dequantized_weights
from ..staging import staged_folder
from .decode_loop import cache_in_place
from .genai import GENAI_CONFIG, GENAI_ONNX, PREFILL_CHUNK, genai_config
from .head_positions import last_token_graph
from .llama import build_decoder
from .runtime import EXPORT_META, ONNX_FILE, OnnxCausalLM, session
from .weights import UnsupportedFormat

DATA_FILE = ONNX_FILE + ".data"
DECODE_STEPS = 8
PAGE = 4096          # external data offsets are multiples of it (ONNX's ExternalData.md: what mmap needs)
EXTERNAL_FROM = PAGE  # initializers of at least this many bytes go to the data file (smaller ones stay in
                     # the graph: in the data file each would take a page of memory of its own)


@dataclass
class Tolerance:
    max_logit_diff: float = 0.05          # max |logit_onnx - logit_torch| over every position and token
    min_top1_agreement: float = 0.995     # share of positions with the same argmax token
    max_perplexity_diff: float = 0.002    # relative perplexity difference

    @classmethod
    def for_export(cls, int8_activations: bool = False, **overrides: float | None) -> Tolerance:
        """The exact export's tolerance, or with int8 activations (``accuracy_level`` 4: onnxruntime rounds each
        activation row to 8 bits, so logits move by whole units and near-ties flip their argmax) a looser one;
        ``overrides`` that are not None replace its fields."""
        base = cls(5.0, 0.9, 0.05) if int8_activations else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def save_with_page_aligned_data(proto: onnx.ModelProto, out_dir: Path) -> None:
    """Write ``proto`` as ``model.onnx`` and its initializers of ``EXTERNAL_FROM`` bytes or more to ``model.onnx.data``,
    each starting on a page boundary (``proto``'s initializers then refer to that file). onnxruntime maps each
    initializer from the page its offset falls in: packed end to end (as ``onnx.save_model`` writes them),
    neighbours sharing a page would map it twice, resident twice."""
    with open(out_dir / DATA_FILE, "wb") as data:
        for tensor in proto.graph.initializer:
            raw = tensor.raw_data
            if not tensor.HasField("raw_data") or len(raw) < EXTERNAL_FROM:
                continue
            offset = -(-data.tell() // PAGE) * PAGE
            data.write(bytes(offset - data.tell()))
            data.write(raw)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    if not (out_dir / DATA_FILE).stat().st_size:
        (out_dir / DATA_FILE).unlink()
    onnx.save_model(proto, str(out_dir / ONNX_FILE))


def export_onnx(model, tokenizer, out_dir: Path, windows: torch.Tensor | None, weights: str = "fast",
                accuracy_level: int = 0, dense_dtype: torch.dtype | None = None,
                tolerance: Tolerance | None = None, log=print, prefill_chunk: int = PREFILL_CHUNK,
                custom_ops: bool = True) -> dict:
    """Write the ONNX export of ``model`` into ``out_dir`` (created; the caller makes it atomic) and
    validate it on ``windows`` [n, seq] when given. Returns what export.json holds. ``prefill_chunk``: prompt
    tokens a prefill run takes in ``compress generate`` and onnxruntime-genai (0: the whole prompt).
    ``custom_ops``: False keeps a fast export on onnxruntime's own kernels (any execution provider that has them)."""
    tolerance = tolerance or Tolerance()
    t0 = time.perf_counter()
    try:
        proto, lowering, io = build_decoder(model, weights, accuracy_level, dense_dtype, custom_ops)
    except UnsupportedFormat as e:
        raise ExportError(f"ONNX export: {e}", "export the layer dense or pick a supported pass") from None
    except (ValueError, KeyError) as e:
        raise ExportError(f"ONNX export failed: {e}", "see the layers table of the report") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    if accuracy_level == 0 and any(r.lowering.startswith("MatMulNBits 2-bit") for r in lowering.layers.values()):
        log("note: onnxruntime's 2-bit MatMulNBits is slow with float activations (213 ms/token measured on "
            "SmolLM2-135M vs 24 ms in fp32); int8 activations make it 13 ms")
    library = None
    if lowering.custom_ops_used:  # the folder ships the library its graph needs
        library = out_dir / ortops.LIBRARY_NAME
        shutil.copyfile(lowering.custom_ops, library)
    elif lowering.decoded_without_ortops:
        log(f"note: {lowering.decoded_without_ortops} layers are decoded in the graph (onnxruntime folds them to "
            "float32); build our operators with `python -m compress.ortops` to keep them compressed")
    save_with_page_aligned_data(proto, out_dir)
    # onnxruntime-genai's graph: the same initializers, referring to the data file as they now do
    onnx.save_model(last_token_graph(proto), str(out_dir / GENAI_ONNX))
    del proto
    build_s = time.perf_counter() - t0
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    library_name = None if library is None else library.name
    (out_dir / GENAI_CONFIG).write_text(json.dumps(
        genai_config(model.config, getattr(model, "generation_config", None), io, GENAI_ONNX, library_name,
                     cache_in_place=cache_in_place(weights), prefill_chunk=prefill_chunk),
        indent=1) + "\n")
    graph_bytes = (out_dir / ONNX_FILE).stat().st_size
    data_bytes = (out_dir / DATA_FILE).stat().st_size if (out_dir / DATA_FILE).exists() else 0
    info = {
        "io": io, "weights": weights, "accuracy_level": accuracy_level, "opset": lowering.opset,
        "custom_ops_library": library_name, "prefill_chunk": prefill_chunk,
        "layers": {name: asdict(rec) for name, rec in lowering.layers.items()},
        "lowerings": _count_lowerings(lowering.layers),
        "decoded_without_ortops": lowering.decoded_without_ortops,
        "size": {"graph_bytes": graph_bytes, "data_bytes": data_bytes, "file_bytes": graph_bytes + data_bytes,
                 "genai_graph_bytes": (out_dir / GENAI_ONNX).stat().st_size,
                 "linear_weight_bytes": sum(r.file_bytes for r in lowering.layers.values())},
        "timing": {"build_seconds": build_s},
    }
    if windows is not None:
        t = time.perf_counter()
        try:
            sess = session(out_dir / ONNX_FILE, accuracy_level=accuracy_level, custom_ops=library)
        except CheckpointError as e:  # a graph we just wrote that onnxruntime refuses is our bug
            raise ExportError(f"onnxruntime cannot load the exported graph: {e.message}",
                              "please report it with the model and recipe") from None
        info["timing"]["session_seconds"] = time.perf_counter() - t
        lm = OnnxCausalLM.from_session(sess, io, weights)
        info["validation"] = validate(lm, model, windows, tolerance)
        info["timing"]["validation_seconds"] = time.perf_counter() - t
        v = info["validation"]
        log(f"onnx validation: max |logit diff| {v['max_logit_diff']:.2e} (decode {v['decode_max_logit_diff']:.2e}), "
            f"top-1 agreement {v['top1_agreement']:.4f}, perplexity {v['perplexity_onnx']:.4f} vs "
            f"{v['perplexity_torch']:.4f}")
    (out_dir / EXPORT_META).write_text(json.dumps(info, indent=1) + "\n")
    if windows is not None and not info["validation"]["passed"]:
        raise ExportMismatch(f"ONNX export does not match PyTorch: {info['validation']['failures']}",
                          "report it with the export.json; pass --no-validate to keep the file anyway")
    return info


def _count_lowerings(layers) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in layers.values():
        key = rec.lowering.split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


@torch.no_grad()
def validate(lm: OnnxCausalLM, model, windows: torch.Tensor, tol: Tolerance) -> dict:
    """onnxruntime vs PyTorch on the same tokens: every window in one prefill, and the first window's
    last tokens one at a time through the KV cache."""
    device = next(model.parameters()).device
    max_diff = decode_diff = 0.0
    agree = count = 0
    nll = {"onnx": 0.0, "torch": 0.0}
    first_ref: np.ndarray | None = None
    with dequantized_weights(model):
        for row in windows:
            ids = row.reshape(1, -1)
            ref = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu().numpy()
            first_ref = ref if first_ref is None else first_ref
            got, _ = lm.forward(ids.numpy(), lm.empty_cache(1))
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            count += ref.shape[1]
            targets = ids[0, 1:].numpy()
            for key, logits in (("onnx", got), ("torch", ref)):
                nll[key] += _nll(logits[0, :-1], targets)
        ids = windows[0].reshape(1, -1).numpy()
        split = ids.shape[1] - DECODE_STEPS
        logits, cache = lm.forward(ids[:, :split], lm.empty_cache(1))
        assert first_ref is not None, "validation needs at least one window"
        for step in range(DECODE_STEPS):
            logits, cache = lm.forward(ids[:, split + step: split + step + 1], cache)
            decode_diff = max(decode_diff, float(np.abs(logits[0, -1] - first_ref[0, split + step]).max()))
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    ppl_onnx, ppl_torch = math.exp(nll["onnx"] / tokens), math.exp(nll["torch"] / tokens)
    result: dict[str, Any] = {
        "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "decode_steps": DECODE_STEPS,
        "max_logit_diff": max_diff, "decode_max_logit_diff": decode_diff,
        "top1_agreement": agree / count, "perplexity_onnx": ppl_onnx, "perplexity_torch": ppl_torch,
        "tolerance": asdict(tol)}
    failures = []
    if max(max_diff, decode_diff) > tol.max_logit_diff:
        failures.append(f"max |logit diff| {max(max_diff, decode_diff):.3g} > {tol.max_logit_diff}")
    if result["top1_agreement"] < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.4f} < {tol.min_top1_agreement}")
    if abs(ppl_onnx / ppl_torch - 1) > tol.max_perplexity_diff:
        failures.append(f"perplexity {ppl_onnx:.4f} vs {ppl_torch:.4f}")
    result["passed"] = not failures
    result["failures"] = "; ".join(failures)
    return result


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def export_to_folder(model, tokenizer, out_dir: Path, force: bool = False, source: Path | None = None,
                     **kwargs) -> dict:
    """:func:`export_onnx` into a temporary sibling folder renamed into place at the end, with a model card
    (``source``: the checkpoint or model exported, whose run report the card quotes when it has one)."""
    from ..report.card import export_card
    from ..report.model import Report

    if out_dir.exists() and not force:
        raise OutputError(f"output folder {out_dir} already exists", "pass --force to replace it")
    with staged_folder(out_dir) as tmp:
        info = export_onnx(model, tokenizer, tmp, **kwargs)
        report = Report.load(source / "report.json") if source and (source / "report.json").is_file() else None
        (tmp / "README.md").write_text(export_card({**info, "source": str(source or "a model")}, report, "onnx"))
    return info
