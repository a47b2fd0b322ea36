"""The refactoring guard: run every recipe on the offline default model and record what it produced.

For each recipe in ``recipes/`` (reduced calibration and evaluation sizes, so the whole set runs in
well under an hour on 2 cores; the code paths are the recipes' own), a fresh ``compress run`` writes
its outputs; the rows keep the perplexity, KL and the SHA-256 of every byte a user loads (checkpoint,
``compress.json``, config, ONNX graph and data) and the ONNX validation verdict.

    python bench/fingerprint.py --out before.json            # on the old tree
    python bench/fingerprint.py --out after.json              # on the new tree
    python bench/fingerprint.py --compare before.json after.json

``--compare`` prints one row per recipe (same bytes? perplexity relative change) and exits 1 when any
recipe differs beyond ``--rtol`` (1e-4) or in any hashed byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["calibration.samples=8", "calibration.seq_len=256", "evaluate.max_windows=4"]
HASHED = ("model.safetensors", "compress.json", "config.json", "onnx/model.onnx", "onnx/model.onnx.data")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(recipe: Path, model: str, work: Path) -> dict:
    out = work / recipe.stem
    cmd = [sys.executable, "-c", "from compress.cli import app; app()", "run", str(recipe), model, "--out", str(out),
           "--force", "--keep-failed", "--quiet"]
    for s in SMALL:
        cmd += ["--set", s]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    row = {"recipe": recipe.stem, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t, 1)}
    if proc.returncode not in (0, 1):
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return row
    report = json.loads((out / "report.json").read_text())
    row["perplexity"] = report["compressed"]["perplexity"]
    row["kl_divergence"] = report["compressed"].get("kl_divergence")
    row["onnx_validation"] = (report.get("onnx") or {}).get("validation")
    row["hashes"] = {name: sha256(out / name) for name in HASHED if (out / name).exists()}
    if (out / "compress.json").exists():  # the layers' formats and aliases, without the hash of the recipe's text
        meta = json.loads((out / "compress.json").read_text())
        kept = {k: v for k, v in meta.items() if k not in ("recipe_hash", "compress_version")}
        row["compress_json_layers"] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return row


def compare(before: list[dict], after: list[dict], rtol: float) -> bool:
    """One row per recipe: which output files are byte-identical, and the perplexity change. compress.json may
    differ only in its recipe hash (a renamed option changes the resolved recipe's text, not the model)."""
    old = {r["recipe"]: r for r in before}
    ok = True
    print(f"{'recipe':22} {'weights':8} {'compress.json':16} {'onnx':6} {'ppl before':>12} {'after':>12} {'rel':>9}")
    for r in after:
        b = old.get(r["recipe"])
        if b is None or "perplexity" not in b or "perplexity" not in r:
            print(f"{r['recipe']:22} missing or failed")
            ok = False
            continue

        def same(name, b=b, r=r):
            x, y = b["hashes"].get(name), r["hashes"].get(name)
            return "-" if x is None and y is None else "same" if x == y else "DIFFERENT"

        meta = same("compress.json")
        if meta == "DIFFERENT" and b.get("compress_json_layers") and \
                b.get("compress_json_layers") == r.get("compress_json_layers"):
            meta = "recipe hash only"
        onnx = "same" if all(same(n) in ("same", "-") for n in HASHED if n.startswith("onnx/")) else "DIFFERENT"
        onnx = "-" if not any(n.startswith("onnx/") for n in r["hashes"]) else onnx
        rel = abs(r["perplexity"] - b["perplexity"]) / b["perplexity"]
        ok &= same("model.safetensors") == "same" and meta != "DIFFERENT" and onnx != "DIFFERENT" and rel <= rtol
        print(f"{r['recipe']:22} {same('model.safetensors'):8} {meta:16} {onnx:6} {b['perplexity']:12.6f} "
              f"{r['perplexity']:12.6f} {rel:9.2e}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the rows here (JSON)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", nargs="*", type=Path, help="default: every recipes/*.yaml")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        sys.exit(0 if compare(before["rows"], after["rows"], args.rtol) else 1)
    recipes = args.recipes or sorted((ROOT / "recipes").glob("*.yaml"))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for recipe in recipes:
            row = fingerprint(recipe, args.model, Path(work))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "hashes"}), flush=True)
            if args.out:
                args.out.write_text(json.dumps({"commit": commit, "settings": SMALL, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
