"""Running an exported model in onnxruntime: sessions, the KV-cache loop, greedy generation;
and the same greedy loop on a PyTorch model, so both can be compared token for token."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..modules import dequantized_weights
from .decode_loop import DecodeLoop, cache_in_place, cache_names, exported_chunk, takes_logits_to_keep

ONNX_FILE = "model.onnx"
EXPORT_META = "export.json"


def session(path: Path, threads: int | None = None, accuracy_level: int = 0, custom_ops: Path | None = None):
    """An onnxruntime CPU session; a missing, truncated or corrupted file is a one-line error. ``custom_ops``: the
    library of our operators the graph uses (its folder's ``export.json`` names it: ``custom_ops_library``).

    onnxruntime fuses a blocked DequantizeLinear + MatMul (``weights: portable``) into its low-bit
    MatMul with int8 activations unless told otherwise: the session is told the export's own
    accuracy level, so portable and fast exports compute the same numbers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if custom_ops is not None:
        if not custom_ops.is_file():
            raise CheckpointError(f"{custom_ops}: the custom-operator library of this export is missing",
                                  "export it again, or copy the library back into the folder")
        options.register_custom_ops_library(str(custom_ops))
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable ONNX model, corrupted or truncated ({first[:160]})",
                              "export it again with `compress export`") from None


@dataclass
class Generation:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float | None:
        steps = sorted(self.decode_seconds)
        return 1000 * steps[len(steps) // 2] if steps else None


class OnnxCausalLM:
    """A decoder exported by ``compress export``: ``forward`` one chunk with the KV cache."""

    def __init__(self, folder, threads: int | None = None):
        folder = Path(folder)
        for needed in (ONNX_FILE, EXPORT_META):
            if not (folder / needed).is_file():
                raise CheckpointError(f"{folder} is not an ONNX export: {needed} is missing",
                                      "pass the onnx/ folder of a run, or the output of `compress export`")
        try:
            self.meta = json.loads((folder / EXPORT_META).read_text())
            self.layers, self.kv_heads, self.head_dim = (int(self.meta["io"][k])
                                                         for k in ("layers", "kv_heads", "head_dim"))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / EXPORT_META}: corrupted ({type(e).__name__}: {e})",
                                  "export it again") from None
        self.folder = folder
        try:
            library = self.meta.get("custom_ops_library")
            self.session = session(folder / ONNX_FILE, threads, self.meta.get("accuracy_level", 0),
                                   folder / library if isinstance(library, str) and library else None)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for any damage it finds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{folder / ONNX_FILE}: onnxruntime cannot load it ({first[:200]})",
                                  "export it again") from None

    @classmethod
    def from_session(cls, sess, io: dict, weights: str):
        """Over an open session of an export with export.json's ``io`` and ``weights`` ("fast" or "portable")."""
        self = cls.__new__(cls)
        self.session, self.meta = sess, {"io": io, "weights": weights}
        self.layers, self.kv_heads, self.head_dim = io["layers"], io["kv_heads"], io["head_dim"]
        return self

    @property
    def keeps_logits(self) -> bool:
        """Whether the graph takes ``logits_to_keep`` (exports since it was added)."""
        return takes_logits_to_keep(self.session)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)] * (2 * self.layers)

    def forward(self, ids: np.ndarray, cache: list[np.ndarray], mask: np.ndarray | None = None, keep: int = 0):
        """(logits [b, s, vocab], new cache) for ``ids`` [b, s] after ``cache``; ``keep`` > 0: the logits of the
        last ``keep`` positions only ([b, keep, vocab]), where the graph has the ``logits_to_keep`` input (exports
        before it return them all)."""
        batch, seq = ids.shape
        past = cache[0].shape[2]
        if mask is None:
            mask = np.ones((batch, past + seq), np.int64)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past:]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask, "position_ids": positions}
        feed.update(zip(cache_names(self.layers)[0], cache, strict=True))
        if keep and self.keeps_logits:
            feed["logits_to_keep"] = np.array([keep], np.int64)
        logits, *present = self.session.run(None, feed)
        return logits, present

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens a prefill run takes, as exported (:func:`exported_chunk`)."""
        return exported_chunk(self.meta)

    def decode_loop(self, chunk: int | None = None) -> DecodeLoop:
        """A :class:`DecodeLoop` over this session (the cache written in place where the graph allows it, as
        onnxruntime-genai runs it); ``chunk``: prompt tokens a prefill run takes (None: as exported)."""
        return DecodeLoop(self.session, self.meta["io"], cache_in_place(self.meta.get("weights")),
                          self.prefill_chunk if chunk is None else chunk)

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: frozenset[int] | set[int] = frozenset(),
               chunk: int | None = None) -> Generation:
        """Greedy tokens after ``prompt`` through :meth:`decode_loop`."""
        loop = self.decode_loop(chunk)
        t = time.perf_counter()
        logits = loop.prefill(list(prompt), len(prompt) + max_new_tokens)
        gen = Generation([], time.perf_counter() - t)
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            gen.tokens.append(token)
            if token in eos or len(gen.tokens) == max_new_tokens:
                break
            t = time.perf_counter()
            logits = loop.step(token)
            gen.decode_seconds.append(time.perf_counter() - t)
        return gen


def session_memory(folder: Path, threads: int = 0, prefill: int = 256, decode: int = 8,
                   chunk: int | None = None) -> dict:
    """Resident memory of ``folder``'s onnxruntime session, measured in a fresh interpreter that imports only
    numpy and onnxruntime (``session_probe.py``): before_mb, loaded_mb, peak_mb, session_mb (peak - before).
    ``chunk``: prompt tokens a prefill run takes (None: the export's ``prefill_chunk``)."""
    import subprocess
    import sys

    probe = Path(__file__).with_name("session_probe.py")
    proc = subprocess.run([sys.executable, str(probe), str(folder), "--threads", str(threads), "--prefill",
                           str(prefill), "--decode", str(decode), *(["--chunk", str(chunk)] if chunk is not None
                                                                    else [])], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"session probe failed on {folder}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def torch_greedy(model, prompt: list[int], max_new_tokens: int, eos: frozenset[int] | set[int] = frozenset(),
                 device="cpu") -> Generation:
    """The same greedy loop as :meth:`OnnxCausalLM.greedy`, on a PyTorch model with its KV cache."""
    with dequantized_weights(model):
        t = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        gen = Generation([], time.perf_counter() - t)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            gen.tokens.append(token)
            if token in eos or len(gen.tokens) == max_new_tokens:
                break
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                        use_cache=True)
            gen.decode_seconds.append(time.perf_counter() - t)
    return gen


def eos_ids(tokenizer, generation_config=None) -> set[int]:
    ids = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
