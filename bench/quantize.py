"""Quantization bench on SmolLM2-135M: RTN, GPTQ, AWQ+GPTQ, mixed precision, and llm-compressor's
GPTQ on the same calibration tokens, all scored on the same held-out windows.

    python bench/quantize.py [--samples 128] [--seq-len 512] [--windows 16] [--llmc-python PY]

Prints one Markdown table: method, bits, group, real bits per weight (compressed layers),
perplexity, KL vs base, top-1 agreement, compression time, peak memory.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rows(llmc_python: str | None):
    q = lambda t, b, g, **kw: [{"type": t, "bits": b, "group_size": g, **kw}]  # noqa: E731
    yield "RTN", 4, 64, q("rtn", 4, 64)
    yield "RTN", 3, 64, q("rtn", 3, 64)
    yield "RTN", 2, 32, q("rtn", 2, 32)
    yield "GPTQ (compress)", 4, 64, q("gptq", 4, 64)
    yield "GPTQ (compress)", 3, 64, q("gptq", 3, 64)
    yield "GPTQ (compress)", 2, 32, q("gptq", 2, 32)
    yield "AWQ+GPTQ (compress)", 3, 64, [{"type": "awq"}] + q("gptq", 3, 64)
    yield "AWQ+GPTQ (compress)", 2, 32, [{"type": "awq"}] + q("gptq", 2, 32)
    yield "mixed 3.25 (compress)", "mix", "mix", [{"type": "gptq", "target_bits_per_weight": 3.25}]
    if llmc_python:
        for b, g in ((4, 64), (3, 64), (2, 32)):
            yield "GPTQ (llm-compressor)", b, g, ("llmc", "gptq", [b, g])


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
    for method, bits, group, spec in rows(a.llmc_python):
        if a.only and not method.startswith(a.only):
            continue
        if isinstance(spec, tuple):
            r = common.in_subprocess("llmc", {"kind": spec[1], "args": spec[2], "calib": str(calib),
                                              "windows": a.windows, "python": a.llmc_python})
            r["bits_per_weight"] = bits + 16 / group + bits / group  # int codes + fp16 scale + zero per group
        else:
            r = common.in_subprocess("ours", {"passes": spec, "calib": str(calib), "windows": a.windows})
        row = {"method": method, "bits": bits, "group": group, "bits/weight": r["bits_per_weight"],
               "perplexity": r["perplexity"], "KL vs base": r["kl"], "top-1": r["top1"],
               "time s": r["seconds"], "peak MB": r["peak_memory_mb"]}
        out.append(row)
        print(f"done: {row}", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M, base perplexity {r['base_perplexity']:.4g}; calibration {a.samples} x {a.seq_len} "
          f"tokens of pydoc; evaluation {a.windows} x 512 held-out tokens; 2 CPU cores")
    common.print_table(["method", "bits", "group", "bits/weight", "perplexity", "KL vs base", "top-1",
                        "time s", "peak MB"], out)


if __name__ == "__main__":
    main()
