"""Pruning bench on SmolLM2-135M: our magnitude / Wanda / SparseGPT / OWL / DSnoT / structured passes
next to llm-compressor's Wanda and SparseGPT modifiers on the same calibration tokens, all scored on
the same held-out windows.

    python bench/prune.py [--samples 128] [--seq-len 512] [--windows 16] [--llmc-python PY] [--only PREFIX]

Prints one Markdown table: method, structure, sparsity, bytes of the compressed layers, perplexity,
KL vs base, compression time, peak memory.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rows(llmc_python: str | None):
    u = lambda t, s, **kw: [{"type": t, "sparsity": s, **kw}]  # noqa: E731
    nm = lambda t: [{"type": t, "pattern": "2:4"}]  # noqa: E731
    yield "magnitude", "unstructured", 0.5, u("magnitude", 0.5)
    yield "Wanda", "unstructured", 0.5, u("wanda", 0.5)
    yield "SparseGPT", "unstructured", 0.5, u("sparsegpt", 0.5)
    yield "Wanda", "2:4", 0.5, nm("wanda")
    yield "SparseGPT", "2:4", 0.5, nm("sparsegpt")
    for s in (0.6, 0.7):
        yield "Wanda uniform", "unstructured", s, u("wanda", s)
        yield "Wanda OWL", "unstructured", s, u("wanda", s, layerwise="owl")
    yield "Wanda + DSnoT", "unstructured", 0.6, u("wanda", 0.6) + [{"type": "dsnot"}]
    yield "SparseGPT + GPTQ 4-bit g64", "unstructured", 0.5, u("sparsegpt", 0.5) + [
        {"type": "gptq", "bits": 4, "group_size": 64}]
    yield "GPTQ 4-bit g64 (dense reference)", "none", 0.0, [{"type": "gptq", "bits": 4, "group_size": 64}]
    yield "structured width", "channels+heads", 0.21, [{"type": "structured", "mlp_sparsity": 0.25,
                                                        "attention_groups": 1}]
    if llmc_python:
        for kind, name in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
            for pattern in ("unstructured", "2:4"):
                yield f"{name} (llm-compressor)", pattern, 0.5, ("llmc", kind, [0.5, pattern])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--llmc-python", default=None, help="python of an environment with llmcompressor")
    ap.add_argument("--only", default=None, help="run only methods whose name starts with this")
    a = ap.parse_args()
    calib = common.calibration_file(a.samples, a.seq_len)
    out = []
    for method, structure, sparsity, spec in rows(a.llmc_python):
        if a.only and not method.startswith(a.only):
            continue
        if isinstance(spec, tuple):
            r = common.in_subprocess("llmc", {"kind": spec[1], "args": spec[2], "calib": str(calib),
                                              "windows": a.windows, "python": a.llmc_python})
        else:
            r = common.in_subprocess("ours", {"passes": spec, "calib": str(calib), "windows": a.windows})
        row = {"method": method, "structure": structure, "sparsity": sparsity, "layer bytes": r.get("bytes"),
               "perplexity": r["perplexity"], "KL vs base": r["kl"], "time s": r["seconds"],
               "peak MB": r["peak_memory_mb"]}
        out.append(row)
        print(f"done: {row}", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M, base perplexity {r['base_perplexity']:.4g}; calibration {a.samples} x {a.seq_len} "
          f"tokens of pydoc; evaluation {a.windows} x 512 held-out tokens; 2 CPU cores. layer bytes: the "
          "stored compressed linear layers (dense fp16 for llm-compressor's pruned float output)")
    common.print_table(["method", "structure", "sparsity", "layer bytes", "perplexity", "KL vs base", "time s",
                        "peak MB"], out)


if __name__ == "__main__":
    main()
