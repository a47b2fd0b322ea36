"""Shared machinery of the benches: run one method in a fresh process (clean peak memory), time
compression only, evaluate every result with compress's evaluator on the same held-out windows.

Peers run on the same calibration tokens, each in the Python of its own environment: llm-compressor
rows in --llmc-python (where `pip install llmcompressor` was done; it needs transformers<=5.17),
AutoRound rows in --autoround-python (where `pip install auto-round` was done). A peer's script saves a
fake-quantized float model that compress's evaluator scores on the same held-out windows as ours.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A bench script's folder comes first on sys.path, where bench/onnx.py and bench/kernels.py would shadow the packages
# compress imports: once the scripts have imported this module, the folder leaves the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def calibration_file(samples: int, seq_len: int) -> Path:
    import torch

    from compress.data import calibration_batches
    from compress.models import resolve

    path = Path(tempfile.gettempdir()) / f"compress-bench-calib-{samples}x{seq_len}.pt"
    if not path.exists():
        _, tok, _ = resolve("smollm2-135m")
        torch.save(calibration_batches("pydoc", tok, samples, seq_len, seed=0, heldout_spec="pydoc"), path)
    return path


def ours(passes: list[dict], calib: Path, windows: int) -> dict:
    """Worker: compress with our passes, then evaluate. Prints one JSON line."""
    import torch

    from compress.models import resolve
    from compress.modules import CompressedLinear
    from compress.pipeline import plan, run_passes
    from compress.recipe import parse_recipe

    model, tok, _ = resolve("smollm2-135m")
    tokens = torch.load(calib)
    t = time.perf_counter()
    result = run_passes(model, plan(parse_recipe({"passes": passes}).passes), tokens, "cpu")
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from compress.families import find_blocks

    nbytes = numel = 0
    for m in find_blocks(model)[1].modules():  # every linear layer of the blocks, compressed or fp16
        if isinstance(m, CompressedLinear):
            nbytes, numel = nbytes + m.fmt.nbytes(), numel + m.fmt.numel
        elif isinstance(m, torch.nn.Linear):
            nbytes, numel = nbytes + 2 * m.weight.numel(), numel + m.weight.numel()
    from compress.checkpoint import checkpoint_content
    from compress.modules import parameter_count

    file_bytes = checkpoint_content(model, "float16").nbytes()  # the whole checkpoint: embeddings, norms included
    return {"seconds": seconds, "peak_memory_mb": peak, "bytes": nbytes, "bits_per_weight": 8 * nbytes / numel,
            "checkpoint_bytes": file_bytes, "model_bits_per_weight": 8 * file_bytes / parameter_count(model),
            "pass_seconds": result.pass_seconds, "model_wide": _plain(result.allocation),
            **quality(model, tok, windows)}


def _plain(value):
    """``value`` with only JSON types (the report's per-pass information, which may hold tensors or tuples)."""
    return json.loads(json.dumps(value, default=str))


def quality(model, tok, windows: int) -> dict:
    from compress.data import evaluation_windows
    from compress.evaluate import evaluate
    from compress.models import resolve

    win = evaluation_windows("pydoc", tok, 512, windows, "pydoc")
    base_model, _, _ = resolve("smollm2-135m")
    base, ref = evaluate(base_model, win, keep_logprobs=True)
    del base_model
    r, _ = evaluate(model, win, reference=ref)
    return {"perplexity": r.perplexity, "kl": r.kl_divergence, "top1": r.top1_agreement,
            "base_perplexity": base.perplexity}


# a peer's name in a row's spec -> the script that runs it and the option naming its Python
PEERS = {"llmc": ("llmc_run.py", "--llmc-python"), "autoround": ("autoround_run.py", "--autoround-python")}


def peer(tool: str, args: list, calib: Path, windows: int, python: str) -> dict:
    from compress.models import cache_dir, resolve

    resolve("smollm2-135m")
    with tempfile.TemporaryDirectory() as out:
        cmd = [python, str(ROOT / "bench" / PEERS[tool][0]), str(cache_dir() / "models" / "smollm2-135m"),
               str(calib), out, *map(str, args)]
        subprocess.run(cmd, check=True, capture_output=True, cwd=tempfile.gettempdir())
        stats = json.loads((Path(out) / "llmc.json").read_text())
        model, tok, _ = resolve(out)
        return {**stats, **quality(model, tok, windows)}


def in_subprocess(kind: str, payload: dict) -> dict:
    """Run ``worker`` in a fresh interpreter so peak memory belongs to this row alone."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # bench/ goes last on the path: its onnx.py and kernels.py would shadow the packages compress imports
    code = (f"import json,sys; sys.path.append({str(ROOT / 'bench')!r}); import common; "
            f"print('RESULT' + json.dumps(common.worker({kind!r}, json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")


def worker(kind: str, p: dict) -> dict:
    calib = Path(p["calib"])
    if kind == "ours":
        return ours(p["passes"], calib, p["windows"])
    return peer(p["tool"], p["args"], calib, p["windows"], p["python"])


def bench_main(rows, columns: list[str], to_row, note: str = ""):
    """The shared driver of the benches: parse the common options, run every row of ``rows()``
    (tuples whose first item is the method name and last item its passes, or a peer's
    (name in ``PEERS``, *its script's arguments)); a peer row is measured only when its Python is given
    in a fresh process, and print the table with ``to_row(item, result)`` for each.

    Every measured row is appended to a results file (``--results``, JSON lines) keyed by the row, its
    passes and the calibration / evaluation sizes, with the commit it was measured at; a later run
    reuses rows already there (``--fresh`` re-measures), so a table too long for one sitting can be
    completed over several and still printed whole, each row's commit listed under it."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    for tool, (_, option) in PEERS.items():
        ap.add_argument(option, dest=f"{tool}_python", default=None,
                        help=f"python of an environment with {tool} installed")
    ap.add_argument("--only", default=None, help="run only rows whose leading fields joined by spaces "
                    "start with this, e.g. 'Wanda unstructured 0.5'")
    ap.add_argument("--results", type=Path, default=None, help="JSON-lines file of measured rows "
                    "(default bench/results/<bench>.jsonl)")
    ap.add_argument("--fresh", action="store_true", help="re-measure rows already in the results file")
    ap.add_argument("--cached-only", action="store_true", help="print the table of stored rows, measure none")
    a = ap.parse_args()
    results = a.results or ROOT / "bench" / "results" / f"{Path(sys.argv[0]).stem}.jsonl"
    stored = {} if a.fresh else load_results(results)
    calib = None
    out, commits, base = [], {}, None
    for item in rows():
        spec = item[-1]
        if a.only and not " ".join(map(str, item[:-1])).startswith(a.only):
            continue
        key = json.dumps({"row": list(map(str, item[:-1])), "spec": spec, "samples": a.samples,
                          "seq_len": a.seq_len, "windows": a.windows}, sort_keys=True, default=list)
        r = stored.get(key)
        if r is None and a.cached_only:
            continue
        if r is None:
            python = getattr(a, f"{spec[0]}_python") if isinstance(spec, tuple) else None
            if isinstance(spec, tuple) and python is None:
                print(f"skipped (not stored; give {PEERS[spec[0]][1]}): {item[:-1]}", file=sys.stderr)
                continue
            commit = current_commit()  # the code measured: taken before, as edits may land while it runs
            calib = calib or calibration_file(a.samples, a.seq_len)
            if isinstance(spec, tuple):
                args = [a_ for arg in spec[1:] for a_ in (arg if isinstance(arg, list) else [arg])]
                r = in_subprocess("peer", {"tool": spec[0], "args": args, "calib": str(calib),
                                           "windows": a.windows, "python": python})
            else:
                r = in_subprocess("ours", {"passes": spec, "calib": str(calib), "windows": a.windows})
            r = {**r, "commit": commit, "measured": time.strftime("%Y-%m-%d %H:%M")}
            append_result(results, key, r)
        out.append(to_row(item, dict(r)))
        commits.setdefault(r.get("commit", "?"), []).append(len(out))
        base = r["base_perplexity"]
        print(f"done: {out[-1]}", file=sys.stderr, flush=True)
    if base is None:
        return
    print(f"SmolLM2-135M, base perplexity {base:.4g}; calibration {a.samples} x {a.seq_len} "
          f"tokens of pydoc; evaluation {a.windows} x 512 held-out tokens; 2 CPU cores{note}")
    print_table(columns, out)
    print("\nMeasured at " + "; ".join(f"{c} (rows {', '.join(map(str, n))})" for c, n in commits.items()))


def recipe_pass(recipe: str, kind: str) -> dict:
    """The first ``kind`` pass of ``recipes/<recipe>.yaml`` as it stands: a bench that times a recipe's layout
    reads it here, so the bench follows the recipe."""
    import yaml

    passes = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())["passes"]
    return dict(next(p for p in passes if p["type"] == kind))


def current_commit() -> str:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (git.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def load_results(path: Path) -> dict:
    if not path.exists():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {rec["key"]: rec["result"] for rec in records}  # a later line for the same key wins


@functools.cache
def cpu_model() -> str:
    """The machine's CPU as /proc/cpuinfo names it with its widest vector extension (else the platform's word):
    timings are comparable on one CPU only."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    lines = cpuinfo.read_text().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    widest = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "no avx2")
    return f"{name} ({widest})"


def append_result(path: Path, key: str, result: dict):
    """One row of a bench's results file, with the CPU it ran on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"key": key, "result": {"cpu": cpu_model(), **result}}) + "\n")


def print_table(columns: list[str], rows: list[dict]):
    widths = [max([len(c), *(len(_cell(r.get(c))) for r in rows)]) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
