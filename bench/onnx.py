"""ONNX Runtime bench on SmolLM2-135M: file size, session load, prefill throughput and decode latency of
the exported model, fp32 against compressed variants, and whether greedy tokens equal PyTorch's; the same 4-bit
export and onnxruntime-genai's own model builder (int4) run by onnxruntime-genai's generator.

    python bench/onnx.py [--samples 16] [--threads 2] [--only PREFIX|PREFIX...] [--rounds 5] [--keep DIR [--reuse]]

Each variant is compressed in-process (small calibration: speed, not quality, is measured here),
exported with validation; then every row is timed in a fresh process (clean peak memory), the rows one
after the other, ``--rounds`` times: prefill of a 256-token prompt (tokens/s) and the median of 32 decode
steps with the KV cache after a 32-token prompt; the table shows each row's median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "onnx.jsonl"
# this file is named like the onnx package: keep its folder off the import path, load common.py by path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _load(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

common = _load(HERE / "common.py", "bench_common")


def _frontier_layers(recipe: str) -> dict:
    """The gptvq pass of ``recipes/<recipe>.yaml`` as it stands (its code books as the recipe sizes them), with fewer
    k-means iterations and no re-fit: the layout, not the quality, is timed."""
    return {**common.recipe_pass(recipe, "gptvq"), "iterations": 5, "codebook_refit": 0}


# 4-bit RTN g32 layers and a 4-bit g32 tied table (embeddings pass), symmetric: the rows of a quantized tied head
TIED_TABLE = [{"type": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
              {"type": "embeddings", "bits": 4, "group_size": 32, "method": "rtn", "symmetric": True}]

VARIANTS = {
    "fp32": [],
    "4-bit RTN g128 (MatMulNBits)": [{"type": "rtn", "bits": 4, "group_size": 128}],
    "4-bit RTN g128 (MatMulNBits, int8 activations)": [{"type": "rtn", "bits": 4, "group_size": 128}],
    "4-bit RTN g128 (GridMatMul, int8 activations)": [{"type": "rtn", "bits": 4, "group_size": 128}],
    "4-bit RTN g128 (portable DequantizeLinear)": [{"type": "rtn", "bits": 4, "group_size": 128}],
    "4-bit RTN g128 + 4-bit table (portable DequantizeLinear)": [
        {"type": "rtn", "bits": 4, "group_size": 128},
        {"type": "embeddings", "bits": 4, "group_size": 32, "method": "rtn"}],
    "3-bit RTN g128 (widened to 4-bit MatMulNBits)": [{"type": "rtn", "bits": 3, "group_size": 128}],
    "3-bit RTN g128 (GridMatMul)": [{"type": "rtn", "bits": 3, "group_size": 128}],
    "3-bit RTN g128 (widened to 4-bit MatMulNBits, int8 activations)": [{"type": "rtn", "bits": 3, "group_size": 128}],
    "3-bit RTN g128 (GridMatMul, int8 activations)": [{"type": "rtn", "bits": 3, "group_size": 128}],
    "2-bit GPTQ g32 (GridMatMul, float activations)": [{"type": "gptq", "bits": 2, "group_size": 32}],
    "2-bit GPTQ g32 (MatMulNBits, int8 activations)": [{"type": "gptq", "bits": 2, "group_size": 32}],
    "2-bit GPTQ g32 (GridMatMul, int8 activations)": [{"type": "gptq", "bits": 2, "group_size": 32}],
    "4-bit NF4 RTN g64 (GridMatMul)": [{"type": "rtn", "bits": 4, "group_size": 64, "grid": "nf"}],
    "3-bit NF3 RTN g64 (GridMatMul)": [{"type": "rtn", "bits": 3, "group_size": 64, "grid": "nf"}],
    "Q4_K RTN (GridMatMul; Q5_0 where 256 does not divide the inputs)": [
        {"type": "rtn", "grid": "gguf-q4_k"}],
    "Q3_K RTN (GridMatMul; Q4_0 where 256 does not divide the inputs)": [{"type": "rtn", "grid": "gguf-q3_k"}],
    "4-bit FP4 RTN g32 (exact 8-bit grid)": [{"type": "rtn", "bits": 4, "group_size": 32, "grid": "fp4"}],
    "4-bit k-means per channel (LutMatMul)": [{"type": "kmeans", "bits": 4, "granularity": "channel",
                                              "sensitivity": "none"}],
    "4-bit k-means per channel, 8-bit table (LutMatMul)": [{"type": "kmeans", "bits": 4, "granularity": "channel",
                                                           "sensitivity": "none", "table_dtype": "int8"}],
    "3-bit k-means per channel (LutMatMul)": [{"type": "kmeans", "bits": 3, "granularity": "channel",
                                              "sensitivity": "none"}],
    "2-bit GPTVQ, vectors of 2 (LutMatMul)": [{"type": "gptvq", "bits": 2, "dim": 2, "iterations": 5,
                                              "codebook_refit": 0}],
    "3-bit GPTVQ, vectors of 2 (LutMatMul; w3-frontier's layers)": [_frontier_layers("w3-frontier")],
    "3-bit GPTVQ, vectors of 2, int8 books (LutMatMul; w3-frontier-table8's layers)": [
        _frontier_layers("w3-frontier-table8")],
    "4-bit GPTVQ, vectors of 2 (LutMatMul; w4-frontier's layers)": [_frontier_layers("w4-frontier")],
    "2-bit GPTVQ, vectors of 4 (LutMatMul; w2-frontier's layers)": [_frontier_layers("w2-frontier")],
    "3-bit k-means per channel + 0.5% outliers": [{"type": "kmeans", "bits": 3, "granularity": "channel",
                                                   "outliers": "0.5%", "table_dtype": "int8"}],
    "50% Wanda, float16 values (SparseMatMul)": [{"type": "wanda", "sparsity": 0.5}],
    "2:4 Wanda, float16 values (SparseMatMul)": [{"type": "wanda", "pattern": "2:4"}],
    "2:4 Wanda + 4-bit GPTQ g64": [{"type": "wanda", "pattern": "2:4"}, {"type": "gptq", "bits": 4, "group_size": 64}],
    "50% Wanda + 4-bit RTN g64 kept values (SparseMatMul)": [{"type": "wanda", "sparsity": 0.5},
                                                             {"type": "rtn", "bits": 4, "group_size": 64}],
    "4-bit RTN g32 + 4-bit head (MatMulNBits head, float activations)": TIED_TABLE,
    "4-bit RTN g32 + 4-bit head (GridMatMul head, float activations)": TIED_TABLE,
    "4-bit RTN g32 + 4-bit head (MatMulNBits, int8 activations)": TIED_TABLE,
    "4-bit RTN g32 + 4-bit head (GridMatMul, int8 activations)": TIED_TABLE,
    # the same exports, run by onnxruntime-genai's generator; and its own model builder's int4 of the float model
    "onnxruntime-genai: 4-bit RTN g128 (ours)": [{"type": "rtn", "bits": 4, "group_size": 128}],
    "onnxruntime-genai: 4-bit RTN g32 + 4-bit head (ours, int8 activations)": TIED_TABLE,
    "onnxruntime-genai: 4-bit k-means per channel (ours, LutMatMul)": [
        {"type": "kmeans", "bits": 4, "granularity": "channel", "sensitivity": "none"}],
    "onnxruntime-genai: builder int4 (float model)": None,
}


def genai_builder_variant(out: Path) -> dict:
    """onnxruntime-genai's model builder on the float model (int4 weights, its defaults: block 32, symmetric,
    the head quantized too), from the same weights saved as a transformers folder."""
    from compress.data import evaluation_windows
    from compress.models import resolve

    model, tok, _ = resolve("smollm2-135m")
    hf = Path(tempfile.mkdtemp(prefix="compress-hf-"))
    model.float().save_pretrained(hf)
    tok.save_pretrained(hf)
    out = Path(out)
    log = out.parent / (out.name + ".builder.log")
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(hf / "cache")], stdout=f, stderr=f, check=True)
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    prompt = evaluation_windows("pydoc", tok, 256, 2, "pydoc")[1, :32].tolist()
    from compress.export.runtime import torch_greedy

    return {"file_bytes": size, "accounted_bytes": None, "want": torch_greedy(model, prompt, 32).tokens,
            "prompt": prompt, "validation": {}}


def time_genai(folder: str, prompt: list[int], threads: int, chunk: int | None = None) -> dict:
    """onnxruntime-genai's own loop: load, a 256-token prefill, then the median of 32 decode steps after a
    32-token prompt (greedy), with the process's peak resident memory (VmHWM). Every model runs on ``threads``
    (its genai_config.json's session options are set so: without them onnxruntime-genai runs one thread);
    ``chunk``: its ``search.chunk_size`` set so (None: as the folder has it; 0: none)."""
    import onnxruntime_genai as og

    config_file = Path(folder) / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    if chunk:
        config["search"]["chunk_size"] = chunk
    elif chunk == 0:
        config["search"].pop("chunk_size", None)
    config_file.write_text(json.dumps(config, indent=1))
    # onnxruntime is set up with the config (its environment and kernel registry: 14 MiB), as `import onnxruntime`
    # sets it up before the session probe's first reading: the session's memory is counted from there in both
    runtime_ready = og.Config(folder)
    before = _vm_rss_mb()
    t = time.perf_counter()
    model = og.Model(runtime_ready)
    load = time.perf_counter() - t

    def run(tokens: list[int], new: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + new, do_sample=False)
        generator = og.Generator(model, params)
        t = time.perf_counter()
        generator.append_tokens(tokens)
        prefill = time.perf_counter() - t
        out, steps = [], []
        while not generator.is_done():
            t = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - t)
            out.append(int(generator.get_next_tokens()[0]))
        return prefill, out, steps

    long_prompt = list(range(1000, 1256))
    run(long_prompt, 1)
    prefill = sorted(run(long_prompt, 1)[0] for _ in range(3))[1]
    _, tokens, steps = run(prompt, 36)
    steps = sorted(steps[4:])
    return {"load_s": load, "prefill_tok_s": 256 / prefill, "decode_ms": 1000 * steps[len(steps) // 2],
            "tokens": tokens[:32], "rss_mb": _vm_hwm_mb(), "session_mb": _vm_hwm_mb() - before,
            "prefill_chunk": config["search"].get("chunk_size", 0)}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _vm_hwm_mb() -> float:  # peak resident memory of this program (getrusage's would count the parent's too)
    return _status_mb("VmHWM")


def _vm_rss_mb() -> float:
    return _status_mb("VmRSS")


def export_variant(name: str, passes: list, out: Path, samples: int) -> dict:
    import torch

    from compress.checkpoint import checkpoint_content, round_to_storage
    from compress.data import calibration_batches, evaluation_windows
    from compress.export.onnx import Tolerance, export_onnx
    from compress.export.runtime import eos_ids, torch_greedy
    from compress.models import resolve
    from compress.pipeline import plan, run_passes
    from compress.recipe import parse_recipe

    model, tok, _ = resolve("smollm2-135m")
    steps = plan(parse_recipe({"passes": passes}).passes)
    dense = torch.float32 if not passes else torch.float16
    if passes:
        cal = calibration_batches("pydoc", tok, samples, 256, seed=0, heldout_spec="pydoc")
        run_passes(model, steps, cal, "cpu")
        round_to_storage(model, "float16")
    windows = evaluation_windows("pydoc", tok, 256, 2, "pydoc")
    int8 = "int8" in name
    if "MatMulNBits" in name:  # onnxruntime's kernels where ours would run
        from compress.formats import onnx_grid

        onnx_grid.OUR_GRID_BITS = ()
    info = export_onnx(model, tok, Path(out), windows, "portable" if "portable" in name else "fast", 4 if int8 else 0,
                       dense, Tolerance.for_export(int8), log=lambda m: None)
    if info["decoded_without_ortops"]:  # the row would time a different graph than the one it names
        raise RuntimeError(f"{name}: {info['decoded_without_ortops']} layers decoded in the graph: our operator "
                           "library is not built (python -m compress.ortops)")
    accounted = checkpoint_content(model, "float32" if not passes else "float16").nbytes()
    prompt = windows[1, :32].tolist()
    want = torch_greedy(model, prompt, 32, eos_ids(tok)).tokens
    return {"file_bytes": info["size"]["file_bytes"], "accounted_bytes": accounted, "want": want, "prompt": prompt,
            "validation": info["validation"]}


def time_variant(folder: str, prompt: list[int], threads: int, chunk: int | None = None) -> dict:
    """Our loop (``compress generate``'s): load, a 256-token prefill as generation runs it (``chunk`` tokens a run,
    None: the export's ``prefill_chunk``; the next token's logits only), then the median of 32 decode steps after
    a 32-token prompt (greedy)."""
    from compress.export.runtime import OnnxCausalLM

    t = time.perf_counter()
    lm = OnnxCausalLM(folder, threads)
    load = time.perf_counter() - t
    long_prompt = list(range(1000, 1256))
    lm.decode_loop(chunk).prefill(long_prompt, 256)  # warm-up
    prefill = []
    for _ in range(3):
        loop = lm.decode_loop(chunk)
        t = time.perf_counter()
        loop.prefill(long_prompt, 256)
        prefill.append(time.perf_counter() - t)
    gen = lm.greedy(prompt, 36, chunk=chunk)
    steps = sorted(gen.decode_seconds[3:])  # first steps warm the kernels
    return {"load_s": load, "prefill_tok_s": 256 / sorted(prefill)[1], "decode_ms": 1000 * steps[len(steps) // 2],
            "tokens": gen.tokens[:32], "rss_mb": _vm_hwm_mb(), "prefill_chunk": loop.chunk}


def _refresh_operators(folder: Path) -> None:
    """An export's copy of our operator library replaced by the current build: --reuse times the operators of the
    commit it records, not those of the commit that exported the folder."""
    from compress import ortops

    if not (folder / "export.json").is_file():  # onnxruntime-genai's builder's folder: none of ours
        return
    library = json.loads((folder / "export.json").read_text()).get("custom_ops_library")
    if library:
        shutil.copy2(ortops.build(), folder / library)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="the variants whose names start with this ('|' between several)")
    ap.add_argument("--keep", default=None, help="keep the exports in this folder")
    ap.add_argument("--reuse", action="store_true", help="time the exports already in --keep (made by this script; "
                    "their operator library replaced by the current build) instead of exporting again")
    ap.add_argument("--rounds", type=int, default=1, help="time every row this many times, the rows interleaved; "
                    "the table shows the medians (0: export only, for a later --reuse)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens a prefill run takes, in our "
                    "loop, the session probe and onnxruntime-genai (default: each export's own; 0: the whole prompt; "
                    "onnxruntime-genai's builder keeps its own)")
    ap.add_argument("--scale", default=None, metavar="SHAPE", help="instead: session memory of a random-weight "
                    "model of a bench/scale.py shape (1B, 3B, 8B), 4-bit RTN g64, exported and probed")
    a = ap.parse_args()
    from compress.export import runtime

    if a.scale:
        return scale_row(a.scale, a.threads, Path(a.keep or tempfile.mkdtemp(prefix="compress-onnx-scale-")))
    root = Path(a.keep or tempfile.mkdtemp(prefix="compress-onnx-bench-"))
    commit = common.current_commit()  # the code measured: taken before, as edits may land while it runs
    made, folders = {}, {}
    for name, passes in VARIANTS.items():  # every export first, then the timings in interleaved rounds
        if a.only and not any(name.startswith(prefix) for prefix in a.only.split("|")):
            continue
        folders[name] = folder = root / "".join(c if c.isalnum() else "_" for c in name)
        record = folder.with_name(folder.name + ".export.json")  # what the export returned, for --reuse
        if a.reuse and record.is_file():
            made[name] = json.loads(record.read_text())
            _refresh_operators(folder)
            continue
        made[name] = (run_python("genai_builder_variant", str(folder)) if passes is None else
                      run_python("export_variant", name, passes, str(folder), a.samples))
        made[name]["exported at"] = commit
        record.write_text(json.dumps(made[name]))
    if a.rounds == 0:  # exports only: time them later with --reuse
        print(f"exported to {root}")
        return
    timings: dict[str, list[dict]] = {name: [] for name in made}
    for _ in range(a.rounds):
        for name in made:
            runner = "time_genai" if name.startswith("onnxruntime-genai") else "time_variant"
            timings[name].append(run_python(runner, str(folders[name]), made[name]["prompt"], a.threads,
                                            None if name.endswith("(float model)") else a.prefill_chunk))
    rows = []
    for name, m in made.items():
        timed = timings[name][0]
        session_mb = (_median(t["session_mb"] for t in timings[name]) if name.startswith("onnxruntime-genai")
                      else runtime.session_memory(folders[name], a.threads, chunk=a.prefill_chunk)["session_mb"])
        v = m["validation"]
        rows.append({"variant": name, "ONNX MB": m["file_bytes"] / 1e6,
                     "ONNX / accounted": m["file_bytes"] / m["accounted_bytes"] if m["accounted_bytes"] else None,
                     "load s": _median(t["load_s"] for t in timings[name]),
                     "prefill tok/s": _median(t["prefill_tok_s"] for t in timings[name]),
                     "decode ms/token": _median(t["decode_ms"] for t in timings[name]), "peak RSS MB": timed["rss_mb"],
                     "session MB": session_mb, "session / file": session_mb * 2**20 / m["file_bytes"],
                     "prefill chunk": timed.get("prefill_chunk"),
                     "max logit diff": v.get("max_logit_diff"), "ppl onnx": v.get("perplexity_onnx"),
                     "greedy = PyTorch": _greedy_agreement(timed["tokens"], m["want"])})
        common.append_result(RESULTS, name, {**rows[-1], "threads": a.threads, "rounds": a.rounds, "commit": commit,
                                             "exported at": m.get("exported at", commit),
                                             "measured": time.strftime("%Y-%m-%d %H:%M")})
    base = next((r for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        r["decode speed-up vs fp32"] = base["decode ms/token"] / r["decode ms/token"] if base else None
    print(f"SmolLM2-135M in onnxruntime (CPUExecutionProvider, {a.threads} threads); validation on 2 x 256 held-out "
          f"pydoc tokens; prefill 256 tokens ('prefill chunk' a run), decode median of 32 steps after a 32-token "
          f"prompt; session MB: the session's own resident memory through a 256-token prefill and 8 decode steps "
          f"(a child process with numpy and onnxruntime only); timings: median of {a.rounds} interleaved rounds; "
          f"measured at {commit}, rows in {RESULTS.relative_to(HERE.parent)}")
    columns = ["variant", "ONNX MB", "ONNX / accounted", "load s", "prefill chunk", "prefill tok/s", "decode ms/token",
               "decode speed-up vs fp32", "session MB", "session / file", "peak RSS MB", "max logit diff",
               "ppl onnx", "greedy = PyTorch"]
    common.print_table(columns, rows)


SCALE_VARIANTS = {  # --scale rows: the extra passes after RTN 4-bit g64 (the recipe of bench/scale.py)
    "4-bit RTN g64": "",
    "4-bit RTN g64 + 4-bit embeddings (RTN g32)": "  - type: embeddings\n    method: rtn\n",
}


def scale_row(shape: str, threads: int, work: Path) -> None:
    """Memory at deployment sizes, where the head and the runtimes' fixed part are a small share of the file: a
    random-weight model of ``shape`` (memory only, never quality), RTN 4-bit g64 through `compress run`, with and
    without the embeddings pass, `compress export` (validated on one window) and the session probe; then each
    checkpoint exported with int8 activations (unvalidated: random weights' logits are too flat for the int8
    tolerances' top-1 agreement) and probed, and its first export run by onnxruntime-genai. Stored as rows of the
    same results file."""
    from compress.export import runtime

    scale = _load(HERE / "scale.py", "bench_scale")
    commit = common.current_commit()
    model = scale.make_model(shape, Path(tempfile.gettempdir()) / "compress-scale")
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def compress(*cmd: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "compress.cli", *cmd], capture_output=True, text=True)
        if proc.returncode not in (0, 1):  # 1: a budget of the recipe (none here)
            raise RuntimeError(f"compress {cmd[0]} failed:\n{proc.stderr[-2000:]}")

    def row(label: str, onnx_dir: Path, session_mb: float) -> None:
        size = sum(f.stat().st_size for f in onnx_dir.glob("model.onnx*"))
        meta = json.loads((onnx_dir / "export.json").read_text())
        rows.append({"variant": f"{shape} shape (random weights), {label}", "ONNX MB": size / 1e6,
                     "session MB": session_mb, "session / file": session_mb * 2**20 / size,
                     "max logit diff": (meta.get("validation") or {}).get("max_logit_diff"),
                     "lowerings": meta["lowerings"]})
        common.append_result(RESULTS, rows[-1]["variant"], {**rows[-1], "threads": threads, "commit": commit,
                                                             "measured": time.strftime("%Y-%m-%d %H:%M")})

    def export(folder: Path, *flags: str) -> Path:
        compress("export", str(ckpt), str(folder), "--windows", "1", "--seq-len", "128", "--force", *flags)
        return folder

    recipe, ckpt = work / "recipe.yaml", work / "ckpt"
    for label, extra in SCALE_VARIANTS.items():
        recipe.write_text(scale.COMMON + scale.RECIPES["rtn-w4g64"] + extra)
        compress("run", str(recipe), str(model), "--out", str(ckpt), "--quiet", "--force")
        onnx_dir = export(work / "onnx")
        row(label, onnx_dir, runtime.session_memory(onnx_dir, threads)["session_mb"])
        int8_dir = export(work / "onnx-int8", "--int8-activations", "--no-validate")
        row(f"{label}, int8 activations", int8_dir, runtime.session_memory(int8_dir, threads)["session_mb"])
        genai = run_python("time_genai", str(onnx_dir), list(range(1000, 1032)), threads)
        row(f"{label}, onnxruntime-genai", onnx_dir, genai["session_mb"])
    common.print_table(["variant", "ONNX MB", "session MB", "session / file", "max logit diff"], rows)


def _greedy_agreement(got: list[int], want: list[int]) -> str:
    """"yes" when onnxruntime's greedy tokens are PyTorch's (PyTorch's stop at an end-of-sequence token, ours run on
    to 32), else how many of PyTorch's match."""
    if got[: len(want)] == want:
        return "yes"
    return f"{sum(x == y for x, y in zip(got, want, strict=False))}/{len(want)}"


def _median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def run_python(func: str, *args):
    """``func(*args)`` of this file in a fresh interpreter (so peak memory is that row's alone)."""
    script = (f"import json, sys, importlib.util as u; s = u.spec_from_file_location('bench_onnx', "
              f"{str(Path(__file__).resolve())!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
              f"print('RESULT' + json.dumps(m.{func}(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{func} failed:\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    main()
