"""The `compress` command line (typer)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import EXIT_BUDGET_MISSED, CompressError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Compress language models with YAML recipes: prune, cluster, quantize, evaluate, gate.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@contextmanager
def user_errors(json_mode: bool = False, on_error=None):
    """Print a CompressError as one line with its hint and exit with its code; no traceback.
    ``on_error(error)`` runs first (e.g. to write a JUnit file saying why the run stopped)."""
    try:
        yield
    except CompressError as e:
        if on_error is not None:
            on_error(e)
        if json_mode:
            print(json.dumps({"status": "error", "error": e.message, "hint": e.hint, "exit_code": e.exit_code}))
        else:
            err.print(f"error: {e}", markup=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written", markup=False)
        raise typer.Exit(130) from None


RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe value: KEY=VALUE "
                                                  "(e.g. passes.0.bits=3); repeatable")]


@app.command()
def run(
    recipe: RecipeArg,
    model: Annotated[str, typer.Argument(help="hub id, local folder, .gguf file, or smollm2-135m (offline)")],
    out_dir: Annotated[str | None, typer.Option("--out", help="output folder [default: reports/RECIPE-MODEL]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    set_: SetOpt = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="write outputs even when a budget "
                                              "is missed")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or logs")] = False,
    json_: Annotated[bool, typer.Option("--json", help="print a machine-readable summary on stdout")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="write the budgets as JUnit XML test cases "
                                               "to this file")] = None,
):
    """Compress MODEL with RECIPE, evaluate it, write checkpoint + report, and check budgets.

    Exit codes: 0 all budgets met, 1 a budget missed (nothing is written unless --keep-failed),
    2 bad input (recipe, model, data, options, existing output folder). When the environment has
    GITHUB_STEP_SUMMARY, a Markdown summary is appended to that file.
    """
    from .junit import budgets_xml, error_xml, write_atomically
    from .report import step_summary
    from .runner import run as run_recipe

    def log(msg):
        if not quiet and not json_:
            err.print(msg, markup=False)

    def junit_error(e):
        if junit:
            write_atomically(junit, error_xml(str(e), f"{recipe} on {model}"))

    with user_errors(json_, junit_error):
        outcome = run_recipe(recipe, model, out_dir, device, set_ or [], seed, force, quiet or json_,
                             keep_failed, log)
    if junit:
        write_atomically(junit, budgets_xml(outcome.report))
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as f:
            f.write(step_summary(outcome.report) + "\n")
    if json_:
        print(json.dumps(_summary(outcome), indent=1))
    elif not quiet:
        _print_summary(outcome)
    if not outcome.passed:
        if not json_:
            missed = ", ".join(f"{c.name} ({_num(c.actual)} vs limit {_num(c.limit)})" for c in outcome.checks
                               if not c.passed)
            kept = f"outputs kept in {outcome.out_dir}" if outcome.out_dir else \
                "nothing written (pass --keep-failed to keep the outputs)"
            err.print(f"budget missed: {missed}; {kept}", markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_BUDGET_MISSED)


def _num(v):
    return "n/a" if v is None else f"{v:.4g}"


def _summary(outcome) -> dict:
    r = outcome.report
    return {"status": "passed" if outcome.passed else "budget_missed", "exit_code": 0 if outcome.passed else 1,
            "out_dir": str(outcome.out_dir) if outcome.out_dir else None,
            "base_perplexity": r["base"]["perplexity"], "perplexity": r["compressed"]["perplexity"],
            "kl_divergence": r["compressed"]["kl_divergence"], "top1_agreement": r["compressed"]["top1_agreement"],
            "checkpoint_bytes": r["size"]["checkpoint_bytes"],
            "bits_per_weight": r["size"]["compressed_layers_bits_per_weight"],
            "budgets": r["budgets"], "seconds": r["timing"]["total_seconds"]}


def _print_summary(outcome):
    r = outcome.report
    t = Table(title=f"{r['recipe']['name']} on {r['model']['spec']}", show_edge=False)
    for col in ("", "perplexity", "KL vs base", "top-1 agree", "size MB", "bits/weight"):
        t.add_column(col, justify="right")
    s = r["size"]
    t.add_row("base", f"{r['base']['perplexity']:.3f}", "", "", f"{s['base_fp16_bytes'] / 1e6:.1f}", "16 (fp16)")
    c = r["compressed"]
    t.add_row("compressed", f"{c['perplexity']:.3f}", _num(c["kl_divergence"]), _num(c["top1_agreement"]),
              f"{s['checkpoint_bytes'] / 1e6:.1f}", f"{s['compressed_layers_bits_per_weight']:.3f} (layers)")
    out.print(t)
    if outcome.checks:
        b = Table(title="budgets", show_edge=False)
        for col in ("budget", "limit", "actual", "result"):
            b.add_column(col)
        for chk in outcome.checks:
            b.add_row(chk.name, _num(chk.limit), _num(chk.actual),
                      "[green]pass[/]" if chk.passed else "[red]FAIL[/]")
        out.print(b)
    if outcome.out_dir:
        out.print(f"wrote {outcome.out_dir} in {r['timing']['total_seconds']:.0f} s", markup=False)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None):
    """Check a recipe (schema, pass options, pass order) without loading a model."""
    from .pipeline import plan
    from .recipe import load_recipe

    with user_errors():
        r = load_recipe(recipe, set_ or [])
        passes = plan(r.passes)
    out.print(f"{recipe}: valid, {len(passes)} pass(es): " +
              (" -> ".join(p.name for p in passes) or "none"), markup=False)


@app.command("passes")
def list_passes(name: Annotated[str | None, typer.Argument(help="show one pass only")] = None):
    """List every pass with its options, types and defaults."""
    from .passes.registry import all_passes, get_pass

    with user_errors():
        chosen = {name: get_pass(name)} if name else all_passes()
    for pname, cls in chosen.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        t = Table(title=f"{pname} ({cls.stage}): {doc}", title_justify="left", show_edge=False)
        for col in ("option", "type", "default", "description"):
            t.add_column(col)
        for field, info in cls.Config.model_fields.items():
            if field == "type":
                continue
            ann = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            t.add_row(field, ann, json.dumps(info.default), info.description or "")
        out.print(t)
        out.print()


@app.command("eval")
def eval_(
    path: Annotated[str, typer.Argument(help="compressed checkpoint folder, or any model (hub id, folder, .gguf)")],
    data: Annotated[str, typer.Option(help="dataset spec; 'pydoc' uses its held-out part")] = "pydoc",
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 512,
    max_windows: Annotated[int, typer.Option(help="windows evaluated at most")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Perplexity of a compressed checkpoint or a model on held-out text."""
    from .checkpoint import is_checkpoint, load_checkpoint
    from .data import evaluation_windows, resolve_source
    from .evaluate import evaluate
    from .models import resolve
    from .runner import pick_device

    with user_errors(json_):
        dev = pick_device(device)
        resolve_source(data)
        if is_checkpoint(path):
            model, tok = load_checkpoint(path, device=dev)
        else:
            model, tok, _ = resolve(path)
            model.to(dev)
        windows = evaluation_windows(data, tok, seq_len, max_windows, calibration_spec="pydoc")
        result, _ = evaluate(model, windows, dev)
    if json_:
        print(json.dumps(result.to_dict()))
    else:
        out.print(f"{path}: perplexity {result.perplexity:.4f} on {result.tokens} tokens "
                  f"({result.windows} x {result.seq_len}) in {result.seconds:.1f} s", markup=False)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="output folders of `compress run` (with report.json)")],
    out_dir: Annotated[Path, typer.Option("--out", help="where compare.md/.svg/.html go")] = Path("reports/compare"),
    json_: Annotated[bool, typer.Option("--json", help="print the table as JSON")] = False,
):
    """Compare runs: a table (size, perplexity, KL, budgets) and a size-vs-perplexity Pareto plot."""
    from .compare import COLUMNS, compare_rows, load_runs, mismatched_bases, write_comparison

    with user_errors(json_):
        loaded = load_runs([str(r) for r in runs])
    rows = compare_rows(loaded)
    for d in mismatched_bases(loaded):
        err.print(f"warning: {d} was evaluated on another base model or other tokens: not comparable",
                  markup=False)
    paths = write_comparison(loaded, rows, out_dir)
    if json_:
        print(json.dumps(rows, indent=1))
        return
    t = Table(show_edge=False)
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*[("[red]yes[/]" if row[c] else "") if c == "pareto" else _num(row[c]) if isinstance(row[c], float)
                    else str(row[c]) for c in COLUMNS])
    Console(highlight=False, width=max(out.width, 150)).print(t)  # a CI log is 80 columns: don't fold
    out.print(f"wrote {', '.join(str(p) for p in paths)}", markup=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="output folder of `compress run`")]):
    """Write report.md and report.html again from a run's report.json."""
    from .compare import load_runs
    from .report import write_reports

    with user_errors():
        r = load_runs([str(run_dir)])[0]["report"]
    write_reports(r, run_dir)
    out.print(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.html'}", markup=False)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
