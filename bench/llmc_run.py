"""Run one llm-compressor modifier on a model with given calibration tokens (a subprocess of the
benches, in the environment where llmcompressor is installed). Saves a fake-quantized / pruned
float model that the bench then evaluates with compress's own evaluator on the same tokens.

usage: python bench/llmc_run.py MODEL_DIR CALIB.pt OUT_DIR KIND [bits group | sparsity pattern]
"""

import json
import resource
import sys
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, where bench/kernels.py and bench/onnx.py would
# shadow the `kernels` and `onnx` packages transformers imports (PreTrainedModel then fails to import).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main():
    model_dir, calib_path, out_dir, kind, *args = sys.argv[1:]
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = torch.load(calib_path)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if kind == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        bits, group = int(args[0]), int(args[1])
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group))
        recipe = GPTQModifier(config_groups={"g": scheme}, ignore=["lm_head"], actorder="static")
    else:
        sparsity, pattern = float(args[0]), args[1]
        mask = "0:0" if pattern == "unstructured" else pattern  # llm-compressor spells unstructured "0:0"
        if kind == "wanda":
            from llmcompressor.modifiers.pruning import WandaPruningModifier as M
        else:
            from llmcompressor.modifiers.pruning import SparseGPTModifier as M
        recipe = M(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=["lm_head"])
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=tokens.shape[0],
            max_seq_length=tokens.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Save plain float weights (fake-quantized) for an apples-to-apples evaluation.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not any(s in k for s in ("_scale", "_zero_point", "_g_idx"))}
    clean = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in model.named_modules():
        if hasattr(module, "quantization_scheme") and hasattr(module, "weight_scale"):
            from compressed_tensors.quantization.lifecycle.forward import fake_quantize

            args_ = module.quantization_scheme.weights
            state[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale,
                                                    module.weight_zero_point, args_).detach()
    clean.load_state_dict(state, strict=False)
    clean.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(f"{out_dir}/llmc.json", "w") as f:
        json.dump({"seconds": seconds, "peak_memory_mb": peak}, f)


if __name__ == "__main__":
    main()
