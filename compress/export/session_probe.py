"""How much memory an ONNX export's onnxruntime session takes: run as a script in a fresh interpreter (numpy and
onnxruntime only, no torch), so nothing else counts.

    python session_probe.py FOLDER [--threads N] [--prefill 256] [--decode 8]

Prints one JSON line: the process's resident memory before the session (``before_mb``), its peak while the session
loads and runs a prefill of ``--prefill`` tokens and ``--decode`` KV-cache steps (``peak_mb``), and the difference
(``session_mb``: what the session itself needed, with one buffer for the logits: they are bound to the caller's array
and the cache stays in onnxruntime's values, as onnxruntime-genai runs a model; the last position's logits only where
the graph takes ``logits_to_keep``, as ``compress generate`` runs it).
:func:`compress.export.runtime.session_memory` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory line in MiB. ``VmHWM`` (peak resident) belongs to this program's own memory
    map: ``getrusage``'s ``ru_maxrss`` would carry over the parent's resident size from before ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=8)
    a = ap.parse_args(argv)
    import numpy as np
    import onnxruntime as ort

    folder = Path(a.folder)
    meta = json.loads((folder / "export.json").read_text())
    io = meta["io"]
    before = _status_mb("VmRSS")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(meta.get("accuracy_level", 0)))
    options.intra_op_num_threads = a.threads
    options.log_severity_level = 3
    if meta.get("custom_ops_library"):
        options.register_custom_ops_library(str(folder / meta["custom_ops_library"]))
    sess = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    loaded = _status_mb("VmRSS")
    # as a serving loop runs it: the cache kept as onnxruntime's values between steps, not copied into numpy arrays;
    # the logits of the last position only where the graph takes logits_to_keep (compress generate), else written
    # straight into the caller's buffer (onnxruntime-genai's way)
    names = [f"past_key_values.{i}.{kv}" for i in range(io["layers"]) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(io["layers"]) for kv in ("key", "value")]
    cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, io["kv_heads"], 0, io["head_dim"]), np.float32))
             for _ in names]
    ids = (np.arange(a.prefill, dtype=np.int64) % 1000 + 100)[None]
    keeps = any(i.name == "logits_to_keep" for i in sess.get_overridable_initializers())
    past = 0
    for _ in range(1 + a.decode):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past + ids.shape[1]), np.int64),
                "position_ids": np.arange(past, past + ids.shape[1], dtype=np.int64)[None]}
        if keeps:  # (io binding cannot feed an optional input: onnxruntime's overridable initializers)
            feed["logits_to_keep"] = np.ones(1, np.int64)
            values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
            out = sess.run_with_ort_values(["logits", *presents], {**values, **dict(zip(names, cache, strict=True))})
            logits, cache = out[0].numpy(), out[1:]
        else:
            binding = sess.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            for name, value in zip(names, cache, strict=True):
                binding.bind_ortvalue_input(name, value)
            logits = np.empty((1, ids.shape[1], io["vocab_size"]), np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            for name in presents:
                binding.bind_output(name, "cpu")
            sess.run_with_iobinding(binding)
            cache = binding.get_outputs()[1:]
            del binding
        past += ids.shape[1]
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    peak = _status_mb("VmHWM")
    return {"before_mb": before, "loaded_mb": loaded, "peak_mb": peak, "session_mb": peak - before}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
