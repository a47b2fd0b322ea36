"""report.md of a run, and the short Markdown summary CI systems show (GitHub's step summary)."""

from __future__ import annotations

from .cells import fmt_number, onnx_rows
from .model import Report


def _verdict(r: Report) -> str:
    status = "PASSED" if r.budgets_passed else "FAILED"
    return f"**Budgets: {status}** · recipe hash `{r.recipe_hash}` · seed {r.recipe['seed']}"


def quality_and_budgets(r: Report, heading: str) -> list[str]:
    base, comp = r.base, r.compressed
    lines = [f"{heading} Quality (held-out text)", "",
             "| model | perplexity | KL vs base | top-1 agreement | decode ms/token | tokens |",
             "|---|---|---|---|---|---|",
             f"| base | {fmt_number(base.perplexity)} | - | - | {fmt_number(base.latency_ms)} | "
             f"{base.tokens} |",
             f"| compressed | {fmt_number(comp.perplexity)} | {fmt_number(comp.kl_divergence)} | "
             f"{fmt_number(comp.top1_agreement)} | {fmt_number(comp.latency_ms)} | {comp.tokens} |",
             ""]
    if comp.tasks:
        lines += ["| task | base | compressed |", "|---|---|---|"]
        lines += [f"| {t} | {fmt_number((base.tasks or {}).get(t))} | {fmt_number(a)} |" for t, a in comp.tasks.items()]
        lines.append("")
    if r.budgets:
        lines += [f"{heading} Budgets", "", "| budget | limit | actual | result |", "|---|---|---|---|"]
        for b in r.budgets:
            lines.append(f"| {b.name} | {fmt_number(b.limit)} | {fmt_number(b.actual)} | "
                         f"{'pass' if b.passed else '**FAIL**'} |")
        lines.append("")
    return lines


def step_summary(r: Report) -> str:
    """The short Markdown a CI job shows: verdict, quality, size, budgets."""
    size = r.size
    lines = [f"### compress: {r.name} on {r.model.spec}", "", _verdict(r), ""]
    lines += quality_and_budgets(r, "####")
    lines += [f"Checkpoint {size.checkpoint_bytes / 1e6:.2f} MB ({size.compression_ratio_vs_fp16:.2f}x "
              f"smaller than fp16); compressed layers {size.compressed_layers_bits_per_weight:.3f} bits/weight.",
              ""]
    return "\n".join(lines)


def markdown(r: Report) -> str:
    size = r.size
    lines = [f"# compress report: {r.name} on {r.model.spec}", "", _verdict(r), ""]
    lines += quality_and_budgets(r, "##")
    lines += ["## Size", "", "| | bytes | MB | bits per weight |", "|---|---|---|---|",
              f"| base (float16) | {size.base_fp16_bytes} | {size.base_fp16_bytes / 1e6:.2f} | 16 |",
              f"| compressed checkpoint | {size.checkpoint_bytes} | {size.checkpoint_bytes / 1e6:.2f} | "
              f"{size.model_bits_per_weight:.3f} |",
              f"| compressed layers only | {size.compressed_layers_bytes} | "
              f"{size.compressed_layers_bytes / 1e6:.2f} | {size.compressed_layers_bits_per_weight:.3f} |", ""]
    if r.onnx:
        lines += ["## ONNX export", "", "| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in onnx_rows(r)] + [""]
    lines += ["## Passes", "", "| # | pass | seconds |", "|---|---|---|"]
    for p in r.passes:
        lines.append(f"| {p.index} | {p.type} | {p.seconds:.2f} |")
    lines += ["", "## Layers", "", "| layer | shape | format | bytes | bits/weight |", "|---|---|---|---|---|"]
    for layer in r.layers:
        lines.append(f"| {layer.name} | {layer.shape[0]}x{layer.shape[1]} | {layer.format} | "
                     f"{layer.bytes} | {layer.bits_per_weight:.3f} |")
    t = r.timing
    lines += ["", "## Run", "",
              f"- wall time {t.total_seconds:.1f} s (load {t.load_seconds:.1f}, compress "
              f"{t.compress_seconds:.1f}, evaluate {t.evaluate_seconds:.1f}); peak memory "
              f"{r.peak_memory_mb:.0f} MB",
              f"- device {r.device}; " + ", ".join(f"{k} {v}" for k, v in r.versions.items()), ""]
    return "\n".join(lines)
