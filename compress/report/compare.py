"""`compress compare RUN_DIR...`: several runs side by side, to choose a recipe.

A run is Pareto-optimal when no other run is at least as small, at least as accurate (perplexity)
and at least as close to the base (KL), and strictly better in one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cells import fmt_number
from .html import CSS, size_quality_plot, table
from .model import Report

COLUMNS = ["run", "recipe", "bits/weight", "size MB", "perplexity", "ppl increase", "KL vs base", "top-1",
           "budgets", "pareto"]


@dataclass
class Run:
    dir: str
    report: Report


def load_runs(dirs: list[str]) -> list[Run]:
    """The runs' reports, each validated against the report schema (a one-line error otherwise)."""
    return [Run(str(d), Report.load(Path(d) / "report.json")) for d in dirs]


def _dominates(a: dict, b: dict) -> bool:
    keys = ("size MB", "perplexity", "KL vs base")
    va = [a[k] if a[k] is not None else float("inf") for k in keys]
    vb = [b[k] if b[k] is not None else float("inf") for k in keys]
    return all(x <= y for x, y in zip(va, vb, strict=True)) and any(x < y for x, y in zip(va, vb, strict=True))


def compare_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for run in runs:
        r = run.report
        rows.append({
            "run": Path(run.dir).name, "recipe": r.name,
            "bits/weight": r.size.compressed_layers_bits_per_weight,
            "size MB": r.size.checkpoint_bytes / 1e6, "perplexity": r.compressed.perplexity,
            "ppl increase": r.compressed.perplexity / r.base.perplexity - 1,
            "KL vs base": r.compressed.kl_divergence, "top-1": r.compressed.top1_agreement,
            "budgets": "passed" if r.budgets_passed else "FAILED"})
    for row in rows:
        row["pareto"] = not any(_dominates(other, row) for other in rows if other is not row)
    return rows


def mismatched_bases(runs: list[Run]) -> list[str]:
    """Runs whose base model or evaluation tokens differ from the first run's: not comparable."""
    first = runs[0].report.base
    return [run.dir for run in runs[1:] if abs(run.report.base.perplexity - first.perplexity) >
            1e-6 * first.perplexity or run.report.base.tokens != first.tokens]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [("**yes**" if row[c] else "") if c == "pareto" else fmt_number(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(runs: list[Run], rows: list[dict], out_dir: Path) -> list[Path]:
    """compare.md, compare.svg (size vs perplexity, Pareto front in red) and compare.html in ``out_dir``."""
    base = runs[0].report
    points = [{"label": "base fp16", "size_mb": base.size.base_fp16_bytes / 1e6,
               "perplexity": base.base.perplexity, "base": True}]
    points += [{"label": row["run"], "size_mb": row["size MB"], "perplexity": row["perplexity"],
                "pareto": row["pareto"]} for row in rows]
    plot = size_quality_plot(points, f"{len(rows)} runs on {base.model.spec}: Pareto front in red")
    out_dir.mkdir(parents=True, exist_ok=True)
    md = (f"# compress compare: {len(rows)} runs on {base.model.spec}\n\n"
          f"Base perplexity {base.base.perplexity:.4g} on {base.base.tokens} held-out tokens.\n\n"
          + markdown_table(rows) + "\n![size vs perplexity](compare.svg)\n")
    rows_html = table(COLUMNS, [[("yes" if row[c] else "") if c == "pareto" else fmt_number(row[c]) for c in COLUMNS]
                                 for row in rows])
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>compress compare</title>"
            f"<style>{CSS}</style></head><body><h1>compress compare: {len(rows)} runs</h1>{rows_html}"
            f"<figure id='plot-pareto'>{plot}</figure></body></html>\n")
    paths = [out_dir / "compare.md", out_dir / "compare.svg", out_dir / "compare.html"]
    for path, text in zip(paths, (md, plot, page), strict=True):
        path.write_text(text)
    return paths
