"""`peqa`'s options side by side on SmolLM2-135M: the pass's seconds and the held-out KL it ends at, from the same
start (RTN 3-bit g64 blocks, RTN 4-bit table), interleaved rounds. Each variant is a JSON object of `peqa` options;
the default compares float32 with bfloat16 autocast.

    python bench/peqa_options.py [--rounds 2] [--samples 20] [--epochs 1] [--threads 2] \
        [--variant '{"bfloat16": false}' --variant '{"bfloat16": true}']

Rows in bench/results/peqa.jsonl with the commit.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "peqa.jsonl"
DEFAULT_VARIANTS = ['{"bfloat16": false}', '{"bfloat16": true}']


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=20, help="training sequences of 512 tokens (8 more held out)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", help="peqa options as JSON (repeat; default: float32, bfloat16)")
    a = ap.parse_args()
    variants = [json.loads(v) for v in a.variant or DEFAULT_VARIANTS]
    spec = importlib.util.spec_from_file_location("bench_common", HERE / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)  # first: it takes bench/ off the import path (bench/onnx.py is not onnx)
    import torch

    from compress.data import calibration_batches
    from compress.models import resolve
    from compress.pipeline import plan, run_passes
    from compress.recipe import parse_recipe

    commit = common.current_commit()
    torch.set_num_threads(a.threads)
    model, tok, _ = resolve("smollm2-135m")
    calibration = calibration_batches("pydoc", tok, a.samples + 8, 512, seed=0, heldout_spec="pydoc")
    runs: list[list[dict]] = [[] for _ in variants]
    for _ in range(a.rounds):
        for got, options in zip(runs, variants, strict=True):
            passes = [{"type": "rtn", "bits": 3, "group_size": 64}, {"type": "embeddings", "method": "rtn"},
                      {"type": "peqa", "epochs": a.epochs, "samples": a.samples, "held_out": 8, **options}]
            result = run_passes(copy.deepcopy(model), plan(parse_recipe({"passes": passes}).passes), calibration, "cpu")
            info = result.allocation["2:peqa"]
            got.append({"seconds": result.pass_seconds["2:peqa"], "before": info["held_out_kl_before"],
                        "after": info["held_out_kl_after"], "per epoch": info["held_out_kl_per_epoch"]})
    rows = []
    for got, options in zip(runs, variants, strict=True):
        seconds = sorted(r["seconds"] for r in got)
        rows.append({"peqa options": json.dumps(options), "peqa s (median)": seconds[len(seconds) // 2],
                     "held-out KL before": got[0]["before"], "held-out KL after": got[0]["after"],
                     "per epoch": " ".join(f"{kl:.4f}" for kl in got[0]["per epoch"])})
        common.append_result(RESULTS, rows[-1]["peqa options"], {**rows[-1], "samples": a.samples, "epochs": a.epochs,
                                                                 "rounds": a.rounds, "threads": a.threads,
                                                                 "commit": commit,
                                                                 "measured": time.strftime("%Y-%m-%d %H:%M")})
    print(f"peqa, {a.epochs} epoch(s) over {a.samples} x 512 pydoc tokens (8 held out), SmolLM2-135M after RTN 3-bit "
          f"g64 + 4-bit table, {a.threads} threads, {a.rounds} interleaved rounds, at {commit}")
    common.print_table(["peqa options", "peqa s (median)", "held-out KL before", "held-out KL after", "per epoch"],
                       rows)


if __name__ == "__main__":
    main()
