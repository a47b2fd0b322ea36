"""Run Intel's AutoRound (signed gradient descent on rounding offsets and clipping ranges, Cheng et al.
2023, "Optimize Weight Rounding via Signed Gradient Descent") on a model with given calibration tokens
(a subprocess of the benches, in an environment where `auto-round` is installed). Saves the
fake-quantized float model that the bench then evaluates with compress's own evaluator on the same
tokens, and the run's time and peak memory.

usage: python bench/autoround_run.py MODEL_DIR CALIB.pt OUT_DIR BITS GROUP [ITERS]

The grid is the one our rows and llm-compressor's use at the same width: asymmetric integer codes with a
float16 scale and a zero point per group. ITERS defaults to AutoRound's own default (200 per block);
smaller values are for smoke runs only.
"""

import json
import resource
import sys
import time
from pathlib import Path

# This script's folder would shadow the `kernels` and `onnx` packages that transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main():
    model_dir, calib_path, out_dir, bits, group, *rest = sys.argv[1:]
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = torch.load(calib_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = 8  # AutoRound's default batch size: the calibration set goes in as batches of that many rows
    dataset = [{"input_ids": tokens[i:i + batch], "attention_mask": torch.ones_like(tokens[i:i + batch])}
               for i in range(0, tokens.shape[0], batch)]
    options = {"iters": int(rest[0])} if rest else {}
    ar = AutoRound(model, tok, scheme={"bits": int(bits), "group_size": int(group), "sym": False,
                                       "data_type": "int", "act_bits": 16},
                   dataset=dataset, nsamples=tokens.shape[0], seqlen=tokens.shape[1], batch_size=batch,
                   device_map="cpu", **options)
    t = time.perf_counter()
    quantized, _ = ar.quantize()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # quantize() leaves each layer's weight as its quantize-dequantized float values: save them as they are
    quantized.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    w = quantized.model.layers[0].self_attn.q_proj.weight.detach()
    levels = max(len(torch.unique(g)) for g in w.reshape(-1, int(group))[:64])
    if levels > 2 ** int(bits):
        raise SystemExit(f"AutoRound left {levels} distinct values in a group of {group}: not fake-quantized")
    with open(f"{out_dir}/llmc.json", "w") as f:
        json.dump({"seconds": seconds, "peak_memory_mb": peak}, f)


if __name__ == "__main__":
    main()
