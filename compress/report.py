"""report.json (versioned schema) and report.md of a run."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_SCHEMA_VERSION = 1


def write_reports(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "report.md").write_text(markdown(report))


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(r: dict) -> str:
    base, comp, size = r["base"], r["compressed"], r["size"]
    lines = [f"# compress report: {r['recipe']['name']} on {r['model']['spec']}", ""]
    status = "PASSED" if r["budgets_passed"] else "FAILED"
    lines += [f"**Budgets: {status}** · recipe hash `{r['recipe_hash']}` · seed {r['recipe']['seed']}", ""]
    lines += ["## Quality (held-out text)", "",
              "| model | perplexity | KL vs base | top-1 agreement | tokens |", "|---|---|---|---|---|",
              f"| base | {_fmt(base['perplexity'])} | - | - | {base['tokens']} |",
              f"| compressed | {_fmt(comp['perplexity'])} | {_fmt(comp.get('kl_divergence'))} | "
              f"{_fmt(comp.get('top1_agreement'))} | {comp['tokens']} |", ""]
    lines += ["## Size", "", "| | bytes | MB | bits per weight |", "|---|---|---|---|",
              f"| base (float16) | {size['base_fp16_bytes']} | {size['base_fp16_bytes'] / 1e6:.2f} | 16 |",
              f"| compressed checkpoint | {size['checkpoint_bytes']} | {size['checkpoint_bytes'] / 1e6:.2f} | "
              f"{size['model_bits_per_weight']:.3f} |",
              f"| compressed layers only | {size['compressed_layers_bytes']} | "
              f"{size['compressed_layers_bytes'] / 1e6:.2f} | {size['compressed_layers_bits_per_weight']:.3f} |", ""]
    if r["budgets"]:
        lines += ["## Budgets", "", "| budget | limit | actual | result |", "|---|---|---|---|"]
        for b in r["budgets"]:
            lines.append(f"| {b['name']} | {_fmt(b['limit'])} | {_fmt(b['actual'])} | "
                         f"{'pass' if b['passed'] else '**FAIL**'} |")
        lines.append("")
    lines += ["## Passes", "", "| # | pass | seconds |", "|---|---|---|"]
    for p in r["passes"]:
        lines.append(f"| {p['index']} | {p['type']} | {p['seconds']:.2f} |")
    lines += ["", "## Layers", "", "| layer | shape | format | bytes | bits/weight |", "|---|---|---|---|---|"]
    for layer in r["layers"]:
        lines.append(f"| {layer['name']} | {layer['shape'][0]}x{layer['shape'][1]} | {layer['format']} | "
                     f"{layer['bytes']} | {layer['bits_per_weight']:.3f} |")
    t = r["timing"]
    lines += ["", "## Run", "",
              f"- wall time {t['total_seconds']:.1f} s (load {t['load_seconds']:.1f}, compress "
              f"{t['compress_seconds']:.1f}, evaluate {t['evaluate_seconds']:.1f}); peak memory "
              f"{r['peak_memory_mb']:.0f} MB",
              f"- device {r['device']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)
