"""Memory and time of `compress run` as models grow: synthetic Llama-shaped models (random weights, saved by this
bench as bf16 shards with an index; quality is meaningless on them, memory and time are what is measured),
RTN 4-bit and GPTQ 4-bit g64 with a small calibration set, each run in its own process (`compress run`, as a
user runs it). Peak RSS is the run's own ``ru_maxrss`` (report.json), which counts the resident pages of the
memory-mapped model files too.

    python bench/scale.py                       # every shape and recipe (8B: about an hour on 2 cores)
    python bench/scale.py --only 1B             # rows whose name starts with 1B
    python bench/scale.py --workers             # 1 and 2 workers on SmolLM2 (w4-gptq)
    python bench/scale.py --cached-only         # the tables of stored rows

Rows are stored in bench/results/scale.jsonl with the commit they were measured at.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_result, current_commit, load_results, print_table  # noqa: E402

# bench/onnx.py would shadow the onnx package that compress imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# name -> Llama config fields (the 1B, 3B and 8B shapes are Llama 3.2-1B, 3.2-3B and 3.1-8B; vocabulary VOCAB
# unless given)
SHAPES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True, vocab_size=49152),  # SmolLM2-135M's shape
    "1B-half-depth": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=32,
                          num_key_value_heads=8, tie_word_embeddings=True),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
VOCAB = 128256
RECIPES = {
    "rtn-w4g64": "passes:\n  - type: rtn\n    bits: 4\n    group_size: 64\n",
    # GPTQ on block 0 only: its solves cost rows x columns^2 per layer (hours for all blocks of an 8B model on 2
    # cores), while memory peaks the same in every block; the other blocks still run through calibration,
    # evaluation, staging and writing
    "gptq-w4g64-block0": "calibration: {samples: 8, seq_len: 256}\npasses:\n  - type: gptq\n    bits: 4\n"
                         "    group_size: 64\n    targets: ['model.layers.0.*']\n",
}
COMMON = "name: scale\nexport: {dense_dtype: bfloat16}\nevaluate: {max_windows: 2, seq_len: 256}\n"


def make_model(name: str, folder: Path, tokenizer: Path | None = None) -> Path:
    """A random-weight bf16 Llama of shape ``name`` written shard by shard (one block's tensors at a time in
    memory) with SmolLM2's tokenizer (its ids are a subset of the vocabulary), read from the folder ``tokenizer``
    when given (a machine without the offline model)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from compress.models import resolve

    path = folder / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = transformers.LlamaConfig(**{"vocab_size": VOCAB, "max_position_embeddings": 4096, "dtype": "bfloat16",
                                         **SHAPES[name]})
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    groups: dict[str, dict] = {}
    for key, p in skeleton.state_dict().items():
        group = key.split(".")[2] if key.startswith("model.layers.") else key.split(".")[-2]
        groups.setdefault(group, {})[key] = tuple(p.shape)
    if config.tie_word_embeddings:
        groups.get("lm_head", {}).pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(0)
    files = [g for g in groups if groups[g]]
    weight_map = {}
    total = 0
    for k, group in enumerate(files):
        tensors = {}
        for key, shape in groups[group].items():
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config.save_pretrained(tmp)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer) if tokenizer else resolve("smollm2-135m")[1]
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def measure(model: Path, recipe_name: str, work: Path, device: str) -> dict:
    recipe = work / f"{recipe_name}.yaml"
    recipe.write_text(COMMON + RECIPES[recipe_name])
    out = work / f"out-{model.name}-{recipe_name}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "compress.cli", "run", str(recipe), str(model), "--out", str(out), "--quiet",
           "--device", device, "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{model.name} {recipe_name} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    files = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out)
    blocks = report["model"]["blocks"]
    return {"parameters": report["model"]["parameters"], "blocks": blocks,
            "peak_rss_gb": report["peak_memory_mb"] / 1024, "load_s": report["timing"]["load_seconds"],
            "compress_s": report["timing"]["compress_seconds"],
            "s_per_block": report["timing"]["compress_seconds"] / blocks,
            "evaluate_s": report["timing"]["evaluate_seconds"], "wall_s": wall,
            "pass_s": sum(p["seconds"] for p in report["passes"]), "checkpoint_gb": files / 1e9,
            "model_gb_bf16": 2 * report["model"]["parameters"] / 1e9}


WORKERS_SAMPLES = 32


def measure_workers(nproc: int, work: Path) -> dict:
    """recipes/w4-gptq.yaml (AWQ + GPTQ 4-bit g64) with 32 x 512 calibration tokens on SmolLM2 with ``nproc``
    workers: perplexity, time, and what worker 0 sent."""
    out = work / f"out-smollm2-w4-gptq-{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "compress.cli", "run", str(ROOT / "recipes" / "w4-gptq.yaml"), "smollm2-135m",
           "--out", str(out), "--quiet", "--device", "cpu", "--nproc", str(nproc), "--keep-failed",
           "--set", f"calibration.samples={WORKERS_SAMPLES}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode not in (0, 1):
        raise SystemExit(f"--nproc {nproc} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)
    blocks = report["model"]["blocks"]
    sent = report.get("communication_bytes", {})
    return {"perplexity": report["compressed"]["perplexity"], "base_perplexity": report["base"]["perplexity"],
            "compress_s": report["timing"]["compress_seconds"], "wall_s": wall,
            "peak_rss_gb": report["peak_memory_mb"] / 1024, "sent_mb_per_block": {k: v / 1e6 / blocks
                                                                                    for k, v in sent.items()}}


def workers_table(stored: dict, results: Path, a) -> None:
    rows = []
    for nproc in (1, 2):
        key = json.dumps({"row": ["smollm2-135m", "w4-gptq", f"nproc={nproc}"], "samples": WORKERS_SAMPLES},
                         sort_keys=True)
        r = stored.get(key)
        if r is None and not a.cached_only:
            a.models.mkdir(parents=True, exist_ok=True)
            commit = current_commit()  # before measuring: edits may land while it runs
            r = {**measure_workers(nproc, a.models), "commit": commit,
                 "measured": time.strftime("%Y-%m-%d %H:%M")}
            append_result(results, key, r)
            print(f"done: nproc {nproc}: {r}", file=sys.stderr, flush=True)
        if r is not None:
            rows.append({"workers": nproc, "perplexity": r["perplexity"], "compress s": r["compress_s"],
                         "wall s": r["wall_s"], "peak RSS GB (worker 0)": r["peak_rss_gb"],
                         "sent MB/block (worker 0)": ", ".join(f"{k} {v:.2f}" for k, v in
                                                               sorted(r["sent_mb_per_block"].items())) or "-",
                         "commit": r["commit"]})
    if rows:
        print(f"\nSmolLM2-135M, recipes/w4-gptq.yaml (AWQ + GPTQ 4-bit g64) with {WORKERS_SAMPLES} x 512 "
              "calibration tokens, 16 x 512 evaluated, 2 CPU cores shared by all workers")
        print_table(["workers", "perplexity", "compress s", "wall s", "peak RSS GB (worker 0)",
                     "sent MB/block (worker 0)", "commit"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/compress-scale"), help="where the synthetic "
                    "models are written (8B: 16 GB)")
    ap.add_argument("--only", default=None, help="rows whose 'shape recipe' starts with this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenizer", type=Path, default=None, help="a folder holding SmolLM2's tokenizer (default: "
                    "the offline model's)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--cached-only", action="store_true")
    ap.add_argument("--keep-models", action="store_true", help="keep the synthetic models after measuring")
    ap.add_argument("--workers", action="store_true", help="only the table of 1 and 2 workers on SmolLM2")
    a = ap.parse_args()
    results = ROOT / "bench" / "results" / "scale.jsonl"
    stored = {} if a.fresh else load_results(results)
    if a.workers:
        workers_table(stored, results, a)
        return
    rows = []
    for shape in SHAPES:
        made = False
        for recipe in RECIPES:
            label = f"{shape} {recipe}"
            if a.only and not label.startswith(a.only):
                continue
            key = json.dumps({"row": [shape, recipe], "shape": SHAPES[shape], "recipe": COMMON + RECIPES[recipe],
                              "device": a.device}, sort_keys=True)
            r = stored.get(key)
            if r is None and not a.cached_only:
                a.models.mkdir(parents=True, exist_ok=True)
                model, made = make_model(shape, a.models, a.tokenizer), True
                commit = current_commit()  # before measuring: edits may land while it runs
                r = {**measure(model, recipe, a.models, a.device), "commit": commit,
                     "measured": time.strftime("%Y-%m-%d %H:%M")}
                append_result(results, key, r)
                print(f"done: {label}: {r}", file=sys.stderr, flush=True)
            if r is not None:
                rows.append({"shape": shape, "recipe": recipe, "params B": r["parameters"] / 1e9,
                             "blocks": r["blocks"], "bf16 GB": r["model_gb_bf16"], "peak RSS GB": r["peak_rss_gb"],
                             "load s": r["load_s"], "compress s": r["compress_s"], "s/block": r["s_per_block"],
                             "in passes s": r.get("pass_s"),
                             "evaluate s": r["evaluate_s"], "checkpoint GB": r["checkpoint_gb"],
                             "commit": r["commit"]})
        if made and not a.keep_models:  # a shape this run did not use is left alone
            shutil.rmtree(a.models / shape)
    print(f"Synthetic Llama shapes (random bf16 weights), `compress run` on {a.device}, 2 windows x 256 tokens "
          "evaluated before and after; GPTQ calibrates on 8 x 256 tokens of pydoc")
    print_table(["shape", "recipe", "params B", "blocks", "bf16 GB", "peak RSS GB", "load s", "compress s",
                 "s/block", "in passes s", "evaluate s", "checkpoint GB", "commit"], rows)
    if a.only is None:
        workers_table(stored, results, a)


if __name__ == "__main__":
    main()
