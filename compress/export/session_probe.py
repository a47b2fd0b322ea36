"""How much memory an ONNX export's onnxruntime session takes: run as a script in a fresh interpreter (numpy and
onnxruntime only, no torch), so nothing else counts.

    python session_probe.py FOLDER [--threads N] [--prefill 256] [--decode 8] [--chunk N]

Prints one JSON line: the process's resident memory before the session (``before_mb``), its peak while the session
loads and runs a prefill of ``--prefill`` tokens and ``--decode`` KV-cache steps (``peak_mb``), and the difference
(``session_mb``: what the session itself needed), the session run by ``decode_loop.DecodeLoop`` as ``compress
generate`` runs it: the prompt in chunks of the export's ``prefill_chunk``, the last position's logits only, the
cache in onnxruntime's values, written in place where the graph's attention allows it (as onnxruntime-genai runs a
``fast`` export).
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
    ap.add_argument("--chunk", type=int, default=None, help="prompt tokens a prefill run takes (default: the "
                    "export's prefill_chunk)")
    a = ap.parse_args(argv)
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the package (light: no torch on this path)
    from compress.export.decode_loop import DecodeLoop, cache_in_place, exported_chunk

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
    # as a serving loop runs it (compress generate, onnxruntime-genai): the cache kept as onnxruntime's values and
    # written in place where the graph allows it, the last position's logits only
    loop = DecodeLoop(sess, io, cache_in_place(meta.get("weights")),
                      exported_chunk(meta) if a.chunk is None else a.chunk)
    logits = loop.prefill([int(t) for t in np.arange(a.prefill) % 1000 + 100], a.prefill + a.decode)
    for _ in range(a.decode):
        logits = loop.step(int(logits.argmax()))
    peak = _status_mb("VmHWM")
    return {"before_mb": before, "loaded_mb": loaded, "peak_mb": peak, "session_mb": peak - before}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
