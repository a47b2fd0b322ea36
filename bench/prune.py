"""Pruning bench on SmolLM2-135M: our magnitude / Wanda / SparseGPT / OWL / DSnoT / structured passes
next to llm-compressor's Wanda and SparseGPT modifiers on the same calibration tokens, all scored on
the same held-out windows.

    python bench/prune.py [--samples 128] [--seq-len 512] [--windows 16] [--llmc-python PY] [--only PREFIX]

Prints one Markdown table: method, structure, sparsity, bytes of the compressed layers, perplexity,
KL vs base, compression time, peak memory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rows():
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
    gptq4 = [{"type": "gptq", "bits": 4, "group_size": 64}]
    yield "SparseGPT + GPTQ 4-bit g64 (joint sweep)", "unstructured", 0.5, u(
        "sparsegpt", 0.5, joint_quantization=True) + gptq4
    yield "SparseGPT then GPTQ 4-bit g64 (two sweeps)", "unstructured", 0.5, u("sparsegpt", 0.5) + gptq4
    yield "GPTQ 4-bit g64 (dense reference)", "none", 0.0, gptq4
    yield "structured width", "channels+heads", 0.21, [{"type": "structured", "mlp_sparsity": 0.25,
                                                        "attention_groups": 1}]
    for kind, name in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
        for pattern in ("unstructured", "2:4"):
            yield f"{name} (llm-compressor)", pattern, 0.5, ("llmc", kind, [0.5, pattern])


def to_row(item, r):
    method, structure, sparsity, _ = item
    return {"method": method, "structure": structure, "sparsity": sparsity, "layer bytes": r.get("bytes"),
            "perplexity": r["perplexity"], "KL vs base": r["kl"], "time s": r["seconds"],
            "peak MB": r["peak_memory_mb"]}


if __name__ == "__main__":
    common.bench_main(rows, ["method", "structure", "sparsity", "layer bytes", "perplexity", "KL vs base",
                             "time s", "peak MB"], to_row,
                      ". layer bytes: the linear layers of the blocks as stored (fp16 where a method "
                      "leaves them dense, as llm-compressor's pruned float output is counted)")
