"""Clustering (palettization) bench on SmolLM2-135M: k-means modes next to our GPTQ at the same
bits, all on the same calibration tokens and held-out windows.

    python bench/cluster.py [--samples 128] [--seq-len 512] [--windows 16] [--only PREFIX]

Prints one Markdown table: mode, bits, granularity, outliers, real bits per weight (compressed
layers, tables and outliers included), perplexity, KL vs base, time, peak memory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rows():
    k = lambda bits, **kw: [{"type": "kmeans", "bits": bits, **kw}]  # noqa: E731
    yield "k-means", 4, "channel", 0, k(4, sensitivity="none")
    yield "k-means sensitive", 4, "channel", 0, k(4)
    yield "k-means sensitive + feedback", 4, "channel", 0, k(4, table_dtype="int8", error_feedback=True)
    yield "k-means sensitive fisher", 4, "group16", 0, k(4, granularity="group", sensitivity="fisher")
    yield "GPTQ", 4, "g64", 0, [{"type": "gptq", "bits": 4, "group_size": 64}]
    yield "k-means", 3, "channel", 0, k(3, sensitivity="none")
    yield "k-means sensitive", 3, "channel", 0, k(3)
    yield "k-means sensitive + feedback", 3, "channel", 0, k(3, table_dtype="int8", error_feedback=True)
    yield "k-means sensitive + outliers + feedback", 3, "channel", 0.005, k(
        3, table_dtype="int8", outliers=0.005, error_feedback=True)
    yield "GPTQ", 3, "g64", 0, [{"type": "gptq", "bits": 3, "group_size": 64}]


def to_row(item, r):
    mode, bits, granularity, outliers, _ = item
    return {"mode": mode, "bits": bits, "granularity": granularity, "outliers": f"{outliers:.1%}",
            "bits/weight": r["bits_per_weight"], "perplexity": r["perplexity"], "KL vs base": r["kl"],
            "time s": r["seconds"], "peak MB": r["peak_memory_mb"]}


if __name__ == "__main__":
    common.bench_main(rows, ["mode", "bits", "granularity", "outliers", "bits/weight",
                                             "perplexity", "KL vs base", "time s", "peak MB"], to_row)
