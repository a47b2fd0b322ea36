"""Our GGUF files in llama.cpp itself (llama-cpp-python), side by side with llama.cpp's own quantization of the
same float model to the same type: perplexity on held-out pydoc windows (the same token ids for every file) and
decode / prompt speed on this machine's cores.

    python bench/gguf.py                  # measure rows not stored yet, print the table
    python bench/gguf.py --fresh          # measure everything again
    python bench/gguf.py --cached-only    # the stored rows

The float model is SmolLM2-135M-Instruct as packaged (GGUF Q4_1: its float weights sit on a Q4_1 grid). llama.cpp's
row quantizes that file with ``llama_model_quantize`` (requantizing: it decodes Q4_1 to float first, the same
float weights we read) to the same type, token embeddings kept F16 like ours, so both files have the same size.
Q3_K_S: llama.cpp writes Q3_K where 256 divides a tensor's inputs (SmolLM2's down projections) and falls back to
Q4_0 elsewhere; ``recipes/w3-gguf.yaml`` (grid ``gguf-q3_k``) gives exactly those types.

The "+ imatrix" rows hand ``llama_model_quantize`` an importance matrix: what llama.cpp's ``llama-imatrix`` collects
(each block linear's mean squared input per column over calibration text, on the float model), computed here in
PyTorch on the calibration tokens our recipes use (128 x 512 pydoc tokens, seed 0), since llama-cpp-python ships no
``llama-imatrix``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_result, calibration_file, current_commit, load_results, print_table  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

WINDOWS, SEQ = 16, 512
DECODE_TOKENS = 64
THREADS = 2
# llama.cpp's file type -> our recipe. Q4_K_M mixes types layer by layer (llama.cpp's heuristics): our run gets
# per-layer overrides read from llama.cpp's own file, so every tensor has the same type in both files.
RECIPES = {"Q4_0": "recipes/w4-gguf.yaml", "Q3_K_S": "recipes/w3-gguf.yaml", "Q4_K_M": "recipes/w4-gguf-k.yaml"}
# a GGUF type in llama.cpp's file -> the grid whose layer gets it: the k-quant itself, or (576-wide layers) the
# k-quant whose fallback it is
GRID_OF_TYPE = {"Q2_K": "gguf-q2_k", "Q3_K": "gguf-q3_k", "Q4_K": "gguf-q4_k", "Q5_K": "gguf-q5_k",
                "Q6_K": "gguf-q6_k", "Q4_0": "gguf-q3_k", "Q5_0": "gguf-q4_k", "Q5_1": "gguf-q5_k", "Q8_0": "gguf-q6_k"}


def windows():
    from compress.data import evaluation_windows
    from compress.models import resolve

    _, tok, _ = resolve("smollm2-135m")
    return evaluation_windows("pydoc", tok, SEQ, WINDOWS, calibration_spec="pydoc")


def importance_matrix(samples: int = 128, seq_len: int = 512) -> dict[str, np.ndarray]:
    """Each block linear's mean squared input per column on the float model over the calibration tokens, keyed by
    its GGUF tensor name (llama-imatrix's statistic)."""
    import gguf
    import torch

    from compress.models import resolve

    model, _, _ = resolve("smollm2-135m")
    calib = torch.load(calibration_file(samples, seq_len))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    tokens = [0]

    def hook(name):
        def collect(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        return collect

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for batch in calib.split(4):
            model(batch)
            tokens[0] += batch.numel()
    for h in handles:
        h.remove()
    return {names.get_name(f"{n}.weight", try_suffixes=(".weight",)): (s / tokens[0]).numpy()
            for n, s in sums.items()}


def llama_cpp_quantize(source: Path, out: Path, kind: str, importance: dict | None = None) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = THREADS
    params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    if importance:  # llama_model_imatrix_data entries, ended by one whose name is NULL
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        keep = []
        for entry, (name, values) in zip(entries, importance.items(), strict=False):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(data)
            entry.name, entry.size = name.encode(), data.size
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")


@contextlib.contextmanager
def without_repacking():
    """llama.cpp's extra CPU buffer types (weights repacked for AMX / interleaved kernels) crash its first decode on
    this machine (a segmentation fault with AMX present, whatever the file); the loader is told not to use them."""
    import llama_cpp.llama as high_level

    bindings = high_level.llama_cpp
    default = bindings.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = plain
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


def measure(path: Path, ids) -> dict:
    """Perplexity over ``ids`` (each window from a fresh context), prompt and decode tokens/s in llama.cpp."""
    import llama_cpp
    import numpy as np

    with without_repacking():
        llm = llama_cpp.Llama(str(path), n_ctx=SEQ, n_threads=THREADS, n_batch=SEQ, logits_all=True, verbose=False)
    nll, count, prompt_s = 0.0, 0, 0.0
    for row in ids.tolist():
        llm.reset()
        t = time.perf_counter()
        llm.eval(row)
        prompt_s += time.perf_counter() - t
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    llm.reset()
    llm.eval(ids[0, :16].tolist())
    t = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_s = time.perf_counter() - t
    return {"perplexity": math.exp(nll / count), "prompt_tok_s": ids.numel() / prompt_s,
            "decode_tok_s": DECODE_TOKENS / decode_s, "file_mb": path.stat().st_size / 1e6}


def block_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> type name of every weight in the blocks of ``path``."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name}


def recipe_with_types(kind: str, llama_file: Path, work: Path) -> Path:
    """Our recipe for ``kind`` with one override per layer giving it the type llama.cpp's file has (a recipe without
    k-quants as it is)."""
    import gguf
    import yaml

    from compress.models import resolve

    model, _, _ = resolve("smollm2-135m")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    hf = {names.get_name(f"{n}.weight", try_suffixes=(".weight",)): n for n, m in model.named_modules()
          if ".layers." in n and hasattr(m, "weight") and m.weight.dim() == 2}
    recipe = yaml.safe_load((ROOT / RECIPES[kind]).read_text())
    quantizer = next((p for p in recipe["passes"] if str(p.get("grid", "")).startswith("gguf-")), None)
    if quantizer is None:
        return ROOT / RECIPES[kind]
    quantizer["overrides"] = {hf[t]: {"grid": GRID_OF_TYPE[k]} for t, k in block_types(llama_file).items()}
    path = work / f"recipe-{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def our_file(kind: str, work: Path, llama_file: Path) -> tuple[Path, dict]:
    out = work / f"ours-{kind}"
    if not (out / "gguf" / "model.gguf").is_file():
        cmd = [sys.executable, "-m", "compress.cli", "run", str(recipe_with_types(kind, llama_file, work)),
               "smollm2-135m", "--out", str(out), "--force", "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode not in (0, 1):
            raise SystemExit(done.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    return out / "gguf" / "model.gguf", report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/compress-gguf-bench"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--cached-only", action="store_true")
    a = ap.parse_args()
    results = ROOT / "bench" / "results" / "gguf.jsonl"
    stored = {} if a.fresh else load_results(results)
    from compress.models import ALIASES, packaged_gguf

    source = packaged_gguf(ALIASES["smollm2-135m"][0])
    a.work.mkdir(parents=True, exist_ok=True)
    ids = None
    rows = []
    plan = [("F16", "float (F16)")] + [(kind, f"{who} {kind}{imatrix}") for kind in RECIPES
                                        for who, imatrix in (("llama.cpp", ""), ("llama.cpp", " + imatrix"),
                                                             ("compress", ""))]
    importance = None
    for kind, who in plan:
        key = json.dumps({"row": who, "windows": WINDOWS, "seq": SEQ, "threads": THREADS, "repacked": False})
        r = stored.get(key)
        if r is None and not a.cached_only:
            commit = current_commit()  # before measuring: edits may land while it runs
            ids = windows() if ids is None else ids
            if who.startswith("float"):
                path = a.work / "float-f16.gguf"
                llama_cpp_quantize(source, path, "F16") if not path.is_file() else None
            elif who.startswith("llama.cpp"):
                path = a.work / f"llama-cpp-{kind}{'-imatrix' if 'imatrix' in who else ''}.gguf"
                if "imatrix" in who:
                    importance = importance_matrix() if importance is None else importance
                llama_cpp_quantize(source, path, kind, importance if "imatrix" in who else None)
            else:
                llama_file = a.work / f"llama-cpp-{kind}.gguf"
                llama_cpp_quantize(source, llama_file, kind) if not llama_file.is_file() else None
                path, report = our_file(kind, a.work, llama_file)
                if block_types(path) != block_types(llama_file):
                    raise SystemExit(f"{path}: its tensor types differ from llama.cpp's {kind} file")
            r = {**measure(path, ids), "commit": commit, "measured": time.strftime("%Y-%m-%d %H:%M")}
            if who.startswith("compress"):
                r["perplexity_in_our_report"] = report["compressed"]["perplexity"]  # PyTorch, same windows
                r["base_perplexity_in_our_report"] = report["base"]["perplexity"]
            append_result(results, key, r)
            print(f"done: {who}: {r}", file=sys.stderr, flush=True)
        if r is not None:
            rows.append({"file": who, "perplexity": r["perplexity"],
                         "PyTorch (report)": r.get("perplexity_in_our_report"), "file MB": r["file_mb"],
                         "prompt tok/s": r["prompt_tok_s"], "decode tok/s": r["decode_tok_s"],
                         "commit": r["commit"]})
    print(f"SmolLM2-135M-Instruct in llama.cpp (llama-cpp-python), {WINDOWS} x {SEQ} held-out pydoc tokens, "
          f"{THREADS} threads")
    print_table(["file", "perplexity", "PyTorch (report)", "file MB", "prompt tok/s", "decode tok/s", "commit"], rows)


if __name__ == "__main__":
    main()
