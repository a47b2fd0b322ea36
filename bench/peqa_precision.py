"""`peqa` in float32 against bfloat16 autocast (its `bfloat16` option) on SmolLM2-135M: the pass's seconds and the
held-out KL it ends at, from the same start (RTN 3-bit g64 blocks, RTN 4-bit table), interleaved rounds.

    python bench/peqa_precision.py [--rounds 2] [--samples 20] [--threads 2]

Rows in bench/results/peqa.jsonl with the commit.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "peqa.jsonl"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=20, help="training sequences of 512 tokens (8 more held out)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
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
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(a.rounds):
        for bfloat16 in (False, True):
            passes = [{"type": "rtn", "bits": 3, "group_size": 64}, {"type": "embeddings", "method": "rtn"},
                      {"type": "peqa", "epochs": 1, "samples": a.samples, "held_out": 8, "bfloat16": bfloat16}]
            result = run_passes(copy.deepcopy(model), plan(parse_recipe({"passes": passes}).passes), calibration, "cpu")
            info = result.allocation["2:peqa"]
            runs[bfloat16].append({"seconds": result.pass_seconds["2:peqa"], "before": info["held_out_kl_before"],
                                   "after": info["held_out_kl_after"]})
    rows = []
    for bfloat16, got in runs.items():
        seconds = sorted(r["seconds"] for r in got)
        rows.append({"precision": "bfloat16 autocast" if bfloat16 else "float32", "peqa s (median)":
                     seconds[len(seconds) // 2], "held-out KL before": got[0]["before"],
                     "held-out KL after": got[0]["after"]})
        common.append_result(RESULTS, rows[-1]["precision"], {**rows[-1], "samples": a.samples, "rounds": a.rounds,
                                                              "threads": a.threads, "commit": commit,
                                                              "measured": time.strftime("%Y-%m-%d %H:%M")})
    print(f"peqa, 1 epoch over {a.samples} x 512 pydoc tokens (8 held out), SmolLM2-135M after RTN 3-bit g64 + "
          f"4-bit table, {a.threads} threads, {a.rounds} interleaved rounds, at {commit}")
    common.print_table(["precision", "peqa s (median)", "held-out KL before", "held-out KL after"], rows)


if __name__ == "__main__":
    main()
