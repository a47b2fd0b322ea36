"""Quantization bench on SmolLM2-135M: RTN, GPTQ, AWQ+GPTQ, SignRound, mixed precision, and llm-compressor's
GPTQ and AutoRound on the same calibration tokens, all scored on the same held-out windows.

    python bench/quantize.py [--samples 128] [--seq-len 512] [--windows 16] [--llmc-python PY]
                             [--autoround-python PY] [--only PREFIX]

Prints one Markdown table: method, bits, group, real bits per weight (compressed layers),
perplexity, KL vs base, top-1 agreement, compression time, peak memory.
"""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rows():
    q = lambda t, b, g, **kw: [{"type": t, "bits": b, "group_size": g, **kw}]  # noqa: E731
    yield "RTN", 4, 64, q("rtn", 4, 64)
    yield "RTN", 3, 64, q("rtn", 3, 64)
    yield "RTN", 2, 32, q("rtn", 2, 32)
    yield "GPTQ (compress)", 4, 64, q("gptq", 4, 64)
    yield "GPTQ (compress)", 3, 64, q("gptq", 3, 64)
    yield "GPTQ (compress)", 2, 32, q("gptq", 2, 32)
    awq, tune = [{"type": "awq"}], [{"type": "tune"}]
    for b, g in ((4, 64), (3, 64), (2, 32)):
        yield "AWQ+GPTQ (compress)", b, g, awq + q("gptq", b, g)
    for b, g in ((4, 64), (3, 64), (2, 32)):
        tuned = yaml.safe_load((common.ROOT / f"recipes/w{b}-gptq-tuned.yaml").read_text())["passes"]
        yield f"w{b}-gptq-tuned.yaml (compress)", b, g, tuned
    yield "mixed 3.25 (compress)", "mix", "mix", [{"type": "gptq", "target_bits_per_weight": 3.25}]
    yield "AWQ+mixed 3.25 asym 0.125+tune (compress)", "mix", "mix", awq + [
        {"type": "gptq", "target_bits_per_weight": 3.25, "float_target_strength": 0.125}] + tune
    # the w3 tuned recipe with its uniform 3 bits g64 replaced by a 3.25 bits-per-weight target
    tuned3 = yaml.safe_load((common.ROOT / "recipes/w3-gptq-tuned.yaml").read_text())["passes"]
    mixed3 = [{k: v for k, v in p.items() if k not in ("bits", "group_size")} | {"target_bits_per_weight": 3.25}
              if p["type"] == "gptq" else p for p in tuned3]
    yield "w3-gptq-tuned.yaml at mixed 3.25 (compress)", "mix", "mix", mixed3
    # incoherence processing: the residual stream and values rotated (folded) before quantizing
    rot = [{"type": "rotate"}]
    for b, g in ((4, 64), (3, 64)):
        yield "rotate+RTN (compress)", b, g, rot + q("rtn", b, g)
    for b, g in ((3, 64), (2, 32)):
        yield "rotate+GPTQ (compress)", b, g, rot + q("gptq", b, g)
    for b, g in ((3, 64), (2, 32)):
        yield "rotate+AWQ+GPTQ (compress)", b, g, rot + awq + q("gptq", b, g)
    # and the down projection's input rotated at run time too (QuaRot's online Hadamard)
    online = [{"type": "rotate", "online": True}]
    for b, g in ((4, 64), (3, 64)):
        yield "rotate online+RTN (compress)", b, g, online + q("rtn", b, g)
    for b, g in ((3, 64), (2, 32)):
        yield "rotate online+GPTQ (compress)", b, g, online + q("gptq", b, g)
    # the token embedding / output head (tied on SmolLM2) quantized too: the whole file
    for method in ("gptq", "rtn"):
        yield f"AWQ+GPTQ + embeddings {method} 4-bit g32 (compress)", 4, 64, awq + q("gptq", 4, 64) + [
            {"type": "embeddings", "bits": 4, "group_size": 32, "method": method}]
    # end-to-end tuning of every grid's scales against the float model's top-k distribution (PEQA)
    peqa = [{"type": "peqa"}]
    yield "RTN + peqa (compress)", 4, 64, q("rtn", 4, 64) + peqa
    yield "RTN + l4q (compress)", 4, 64, q("rtn", 4, 64) + [{"type": "l4q"}]
    for b, g in ((4, 64), (3, 64)):
        yield "AWQ+GPTQ + embeddings gptq 4-bit g32 + peqa (compress)", b, g, awq + q("gptq", b, g) + [
            {"type": "embeddings", "bits": 4, "group_size": 32}] + peqa
    # vector code books with GPTQ's error feedback (GPTVQ): the group column names the vector length
    # (code books of 2^(bits x dim) float16 vectors shared by table_weights weights: about 0.06 bits/weight)
    vq = lambda b, d, t: [{"type": "gptvq", "bits": b, "dim": d, "table_weights": t}]  # noqa: E731
    for b, d, t in ((2, 2, 16384), (3, 2, 32768), (2, 4, 131072)):
        yield "GPTVQ (compress)", b, f"d{d}", vq(b, d, t)
        yield "AWQ+GPTVQ (compress)", b, f"d{d}", awq + vq(b, d, t)
    emb4 = [{"type": "embeddings", "bits": 4, "group_size": 32}]
    for b, d, t in ((2, 2, 16384), (3, 2, 32768)):
        yield "GPTVQ + tune (compress)", b, f"d{d}", vq(b, d, t) + tune
        yield "GPTVQ + embeddings gptq 4-bit g32 + peqa (compress)", b, f"d{d}", vq(b, d, t) + emb4 + peqa
    # PV-Tuning: peqa's continuous epochs, each opened by a discrete step on the codes (same 2 epochs)
    pv = [{"type": "pv_tuning", "epochs": 2}]
    for b, d, t in ((2, 2, 16384), (3, 2, 32768)):
        yield "GPTVQ + embeddings gptq 4-bit g32 + pv_tuning (compress)", b, f"d{d}", vq(b, d, t) + emb4 + pv
    for b, g in ((4, 64), (3, 64)):
        yield "AWQ+GPTQ + embeddings gptq 4-bit g32 + pv_tuning (compress)", b, g, awq + q("gptq", b, g) + emb4 + pv
    # learned rounding and clipping, block by block (SignRound, the method of AutoRound): 200 signed steps a block
    sr = lambda b, g: [{"type": "signround", "bits": b, "group_size": g}]  # noqa: E731
    for b, g in ((2, 32), (2, 64), (3, 64), (4, 64)):
        yield "SignRound (compress)", b, g, sr(b, g)
    for b, g in ((2, 32), (2, 64), (3, 64)):
        yield "SignRound + embeddings gptq 4-bit g32 + peqa (compress)", b, g, sr(b, g) + emb4 + peqa
    for b, g in ((4, 64), (3, 64), (2, 32)):
        yield "GPTQ (llm-compressor)", b, g, ("llmc", "gptq", [b, g])
    for b, g in ((2, 32), (4, 64), (3, 64)):  # about 2 hours each on 2 cores at AutoRound's 200 steps a block
        yield "AutoRound (auto-round)", b, g, ("autoround", [b, g])


def to_row(item, r):
    method, bits, group, spec = item
    if isinstance(spec, tuple):  # the peers' grid: int codes + fp16 scale + zero per group
        r["bits_per_weight"] = bits + 16 / group + bits / group
    return {"method": method, "bits": bits, "group": group, "bits/weight": r["bits_per_weight"],
            "perplexity": r["perplexity"], "KL vs base": r["kl"], "top-1": r["top1"], "time s": r["seconds"],
            "peak MB": r["peak_memory_mb"], "file MB": r["checkpoint_bytes"] / 1e6 if "checkpoint_bytes" in r else None,
            "model bits/weight": r.get("model_bits_per_weight")}


if __name__ == "__main__":
    common.bench_main(rows, ["method", "bits", "group", "bits/weight", "perplexity", "KL vs base", "top-1",
                             "time s", "peak MB", "file MB", "model bits/weight"], to_row)
