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
from .export.genai import PREFILL_CHUNK

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Compress language models with YAML recipes: prune, cluster, quantize, evaluate, gate.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so staging folders and locks are cleaned on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated


@contextmanager
def user_errors(json_mode: bool = False, on_error=None):
    """Print a CompressError as one line with its hint and exit with its code; no traceback.
    ``on_error(error)`` runs first (e.g. to write a JUnit file saying why the run stopped).
    Ctrl-C exits 130 and SIGTERM 143, after the staging folder and the output lock are removed."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
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
        if not os.environ.get("COMPRESS_LAUNCHED"):  # a worker stopped by its launcher, which says why
            err.print("interrupted: nothing was written", markup=False)
        raise typer.Exit(130) from None
    except Terminated:
        if not os.environ.get("COMPRESS_LAUNCHED"):
            err.print("terminated: nothing was written", markup=False)
        raise typer.Exit(143) from None


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30}


def parse_size(text: str, option: str) -> int:
    """'5GB', '500MB', '1.5GiB', '1000000' -> bytes (at least one)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) * SIZE_UNITS[unit] < 1:
        raise CompressError(f"{option} {text!r} is not a size", "write it as e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="read a checkpoint without checking its tensor "
                                           "hashes and layer layouts")]
PushOpt = Annotated[str | None, typer.Option("--push-to-hub", help="upload the output folder to this Hugging Face "
                                             "model repository (owner/name) when done")]
PrivateOpt = Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repository private")]
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
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="load a model folder whose weights are "
                                               "pickle files (.bin/.pt: they can run code when read)")] = False,
    ignore_resource_check: Annotated[bool, typer.Option("--ignore-resource-check", help="run even when the "
                                                        "memory, disk or GPU estimate does not fit")] = False,
    json_: Annotated[bool, typer.Option("--json", help="print a machine-readable summary on stdout")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="write the budgets as JUnit XML test cases "
                                               "to this file")] = None,
    dtype: Annotated[str, typer.Option(help="dtype the model is read in: auto (the checkpoint's own; weights stay "
                                       "memory-mapped), float32, bfloat16 or float16")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="continue a stopped run from its last finished block "
                                         "(same recipe, model and options)")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="largest checkpoint file, e.g. 5GB, "
                                                "500MB")] = "5GB",
    revision: Annotated[str | None, typer.Option(help="hub ids: the branch, tag or commit to read")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="run the model's own Python code "
                                                    "from its folder or hub repository (read it first)")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="workers on this machine (torch.distributed, gloo): "
                                       "calibration and evaluation split, statistics summed, layers solved in "
                                       "parallel")] = 1,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
):
    """Compress MODEL with RECIPE, evaluate it, write checkpoint + report + model card, and check budgets.

    Exit codes: 0 all budgets met, 1 a budget missed (nothing is written unless --keep-failed),
    2 bad input (recipe, model, data, options, existing output folder), 5 --push-to-hub cannot reach the Hub
    (checked first) or the upload failed (the folder stays). When the environment has GITHUB_STEP_SUMMARY, a
    Markdown summary is appended to that file.
    """
    from .junit import budgets_xml, error_xml, write_atomically
    from .report import step_summary
    from .runner import LoadOptions
    from .runner import run as run_recipe

    def log(msg):
        if not quiet and not json_:
            err.print(msg, markup=False)

    def junit_error(e):
        if junit:
            write_atomically(junit, error_xml(str(e), f"{recipe} on {model}"))

    with user_errors(json_, junit_error):
        options = LoadOptions(dtype, resume, parse_size(max_shard_size, "--max-shard-size"), allow_pickle, revision,
                              trust_remote_code)
        if nproc < 1:
            raise CompressError(f"--nproc {nproc}: a run needs at least one worker", "use --nproc 1 or more")
        if push_to_hub and os.environ.get("RANK", "0") == "0":
            from .hub import check_push

            check_push(push_to_hub)
        if nproc > 1 and "WORLD_SIZE" not in os.environ:  # start the workers; each runs this command
            from .distributed import launch
            from .runner import check_run

            checked = check_run(recipe, model, out_dir, set_ or [], seed, force, options, nproc)
            argv = ["run", str(recipe), model, "--out", str(checked.out_dir), "--device", device, "--dtype", dtype,
                    "--max-shard-size", max_shard_size, *[a for s in set_ or [] for a in ("--set", s)],
                    *(["--revision", revision] if revision else []),
                    *(["--seed", str(seed)] if seed is not None else []),
                    *[flag for flag, on in (("--force", force), ("--keep-failed", keep_failed), ("--quiet", quiet),
                                            ("--allow-pickle", allow_pickle), ("--resume", resume),
                                            ("--trust-remote-code", trust_remote_code),
                                            ("--ignore-resource-check", ignore_resource_check), ("--json", json_))
                      if on], *(["--junit", str(junit)] if junit else []),
                    *(["--push-to-hub", push_to_hub] if push_to_hub else []), *(["--private"] if private else [])]
            raise typer.Exit(launch(argv, nproc, lambda line: err.print(line, markup=False, soft_wrap=True)))
        outcome = run_recipe(recipe, model, out_dir, device, set_ or [], seed, force, quiet or json_,
                             keep_failed, log, ignore_resource_check=ignore_resource_check, options=options)
    if outcome.worker != 0:
        return
    if junit:
        write_atomically(junit, budgets_xml(outcome.report))
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as f:
            f.write(step_summary(outcome.report) + "\n")
    if json_:
        print(json.dumps(_summary(outcome), indent=1))
    elif not quiet:
        _print_summary(outcome)
    if push_to_hub and outcome.passed and outcome.out_dir:
        _push(outcome.out_dir, push_to_hub, private, json_)
    if not outcome.passed:
        if not json_:
            missed = ", ".join(f"{c.name} ({_num(c.actual)} vs limit {_num(c.limit)})" for c in outcome.checks
                               if not c.passed)
            kept = f"outputs kept in {outcome.out_dir}" if outcome.out_dir else \
                "nothing written (pass --keep-failed to keep the outputs)"
            err.print(f"budget missed: {missed}; {kept}", markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_BUDGET_MISSED)


def _push(folder: Path, repo: str, private: bool, json_: bool) -> None:
    from .hub import push

    with user_errors(json_):
        url = push(folder, repo, private)
    if not json_:
        out.print(f"uploaded {folder} to {url}", markup=False)


def _num(v):
    return "n/a" if v is None else f"{v:.4g}"


def _summary(outcome) -> dict:
    r = outcome.report
    return {"status": "passed" if outcome.passed else "budget_missed", "exit_code": 0 if outcome.passed else 1,
            "out_dir": str(outcome.out_dir) if outcome.out_dir else None,
            "base_perplexity": r.base.perplexity, "perplexity": r.compressed.perplexity,
            "kl_divergence": r.compressed.kl_divergence, "top1_agreement": r.compressed.top1_agreement,
            "checkpoint_bytes": r.size.checkpoint_bytes,
            "bits_per_weight": r.size.compressed_layers_bits_per_weight,
            "onnx_file_bytes": r.size.onnx_file_bytes,
            "onnx_validation": r.onnx.validation.model_dump() if r.onnx and r.onnx.validation else None,
            "budgets": [c.model_dump() for c in r.budgets], "seconds": r.timing.total_seconds}


def _print_summary(outcome):
    r = outcome.report
    t = Table(title=f"{r.name} on {r.model.spec}", show_edge=False)
    for col in ("", "perplexity", "KL vs base", "top-1 agree", "size MB", "bits/weight"):
        t.add_column(col, justify="right")
    s = r.size
    t.add_row("base", f"{r.base.perplexity:.3f}", "", "", f"{s.base_fp16_bytes / 1e6:.1f}", "16 (fp16)")
    c = r.compressed
    t.add_row("compressed", f"{c.perplexity:.3f}", _num(c.kl_divergence), _num(c.top1_agreement),
              f"{s.checkpoint_bytes / 1e6:.1f}", f"{s.compressed_layers_bits_per_weight:.3f} (layers)")
    out.print(t)
    if outcome.checks:
        b = Table(title="budgets", show_edge=False)
        for col in ("budget", "limit", "actual", "result"):
            b.add_column(col)
        for chk in outcome.checks:
            b.add_row(chk.name, _num(chk.limit), _num(chk.actual),
                      "[green]pass[/]" if chk.passed else "[red]FAIL[/]")
        out.print(b)
    o = r.onnx
    if o and o.validation:
        v, nbytes = o.validation, o.size["file_bytes"]
        diff = max(v.max_logit_diff, v.decode_max_logit_diff)
        out.print(f"onnx: {nbytes / 1e6:.1f} MB ({nbytes / s.checkpoint_bytes:.3f}x the checkpoint), matches "
                  f"PyTorch on {v.windows}x{v.seq_len} tokens: max |logit diff| {diff:.1e}, top-1 "
                  f"{v.top1_agreement:.4f}, perplexity {v.perplexity_onnx:.3f} vs {v.perplexity_torch:.3f}",
                  markup=False, soft_wrap=True)
    if outcome.out_dir:
        out.print(f"wrote {outcome.out_dir} in {r.timing.total_seconds:.0f} s", markup=False)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None):
    """Check a recipe (schema, pass options, pass order) without loading a model."""
    from .pipeline import plan
    from .recipe import deprecations, load_recipe

    with user_errors():
        r = load_recipe(recipe, set_ or [])
        passes = plan(r.passes)
    for line in deprecations(r):
        err.print(f"deprecated: {line}", markup=False, soft_wrap=True)
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
    no_verify: NoVerifyOpt = False,
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
            model, tok = load_checkpoint(path, device=dev, verify=not no_verify)
        else:
            model, tok, _ = resolve(path)  # evaluated block by block: one block at a time on the device
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
    from .report.compare import COLUMNS, compare_rows, load_runs, mismatched_bases, write_comparison

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
    from .report import write_reports
    from .report.compare import load_runs

    with user_errors():
        r = load_runs([str(run_dir)])[0].report
    write_reports(r, run_dir)
    out.print(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.html'}", markup=False)


def _load_any(path: str, device, verify: bool = True):
    """(model, tokenizer): a compressed checkpoint, or any model spec (hub id, folder, .gguf)."""
    from .checkpoint import is_checkpoint, load_checkpoint
    from .models import resolve

    if is_checkpoint(path):
        return load_checkpoint(path, device=device, verify=verify)
    import torch

    model, tok, _ = resolve(path, dtype=torch.float32)
    return model.to(device), tok


@app.command()
def export(
    path: Annotated[str, typer.Argument(help="compressed checkpoint folder, or any model (exported as float32)")],
    out_dir: Annotated[Path, typer.Argument(help="folder to write the export into (model.onnx or safetensors, "
                                                  "export.json)")],
    format_: Annotated[str, typer.Option("--format", help="onnx; or from a checkpoint: "
                                         "compressed-tensors (vLLM, SGLang, transformers), gptq (transformers, vLLM, "
                                         "TGI, ExLlama), gguf (llama.cpp, Ollama)")] = "onnx",
    target: Annotated[str | None, typer.Option(help="compressed-tensors, gptq: vllm refuses layers vLLM's kernels "
                                               "or loaders do not take")] = None,
    max_shard_size: Annotated[str, typer.Option(help="compressed-tensors, gptq: largest safetensors shard")] = "5GB",
    weights: Annotated[str, typer.Option(help="fast (onnxruntime's kernels: MatMulNBits, GroupQueryAttention, fused "
                                         "norms) or portable (standard ops only)")] = "fast",
    int8_activations: Annotated[bool, typer.Option("--int8-activations", help="int8 activations (2- to 4-bit "
                                                   "grids in our GridMatMul where built, else MatMulNBits): "
                                                   "faster, less exact")] = False,
    custom_ops: Annotated[bool, typer.Option("--custom-ops/--no-custom-ops", help="fast: our operators where their "
                                             "library is built (--no-custom-ops: onnxruntime's kernels only)")
                          ] = True,
    prefill_chunk: Annotated[int, typer.Option(min=0, help="onnx: prompt tokens a prefill run takes in "
                                               "`compress generate` and onnxruntime-genai (0: the whole prompt)")
                             ] = PREFILL_CHUNK,
    validation: Annotated[bool, typer.Option("--validate/--no-validate", help="compare with PyTorch")] = True,
    windows: Annotated[int, typer.Option(help="held-out windows for the validation")] = 2,
    seq_len: Annotated[int, typer.Option(help="tokens per validation window")] = 256,
    max_logit_diff: Annotated[float | None, typer.Option(help="validation: max |logit difference| [default: 0.05; "
                                                         "5.0 with --int8-activations]")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    json_: Annotated[bool, typer.Option("--json", help="print export.json's summary as JSON")] = False,
    no_verify: NoVerifyOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
):
    """Export a checkpoint (or a plain model) to ONNX with its compression kept and check it in onnxruntime
    against PyTorch; or (--format compressed-tensors / gptq) write a checkpoint's codes for serving engines and
    check them read back. Exit codes: 2 bad input or a layer the format cannot hold, 3 the export
    disagrees with the compressed model beyond the tolerance (nothing is written)."""
    import torch

    from .checkpoint import DTYPES, is_checkpoint
    from .data import evaluation_windows
    from .export.onnx import Tolerance, export_to_folder

    def log(msg):
        if not json_:
            err.print(msg, markup=False)

    if push_to_hub:
        from .hub import check_push

        with user_errors(json_):
            check_push(push_to_hub)
    if format_ != "onnx":
        _export_for_engine(path, out_dir, format_, target, parse_size(max_shard_size, "--max-shard-size"),
                           validation, windows, seq_len, force, json_, no_verify)
        if push_to_hub:
            _push(out_dir, push_to_hub, private, json_)
        return
    with user_errors(json_):
        if weights not in ("fast", "portable"):
            from .errors import ExportError

            raise ExportError(f"unknown --weights '{weights}'", "use fast or portable")
        model, tok = _load_any(path, "cpu", not no_verify)
        dense = DTYPES[json.loads((Path(path) / "compress.json").read_text())["dense_dtype"]] \
            if is_checkpoint(path) else torch.float32
        data = evaluation_windows("pydoc", tok, seq_len, windows, calibration_spec="pydoc") if validation else None
        info = export_to_folder(model, tok, out_dir, force=force, source=Path(path), windows=data, weights=weights,
                                accuracy_level=4 if int8_activations else 0, dense_dtype=dense,
                                tolerance=Tolerance.for_export(int8_activations, max_logit_diff=max_logit_diff),
                                log=log, prefill_chunk=prefill_chunk, custom_ops=custom_ops)
    if push_to_hub:
        _push(out_dir, push_to_hub, private, json_)
    if json_:
        print(json.dumps({k: info[k] for k in ("size", "lowerings", "opset", "timing")} |
                         {"validation": info.get("validation"), "out_dir": str(out_dir)}, indent=1))
        return
    s = info["size"]
    out.print(f"wrote {out_dir}: {s['file_bytes'] / 1e6:.1f} MB (graph {s['graph_bytes'] / 1e6:.2f} MB + data "
              f"{s['data_bytes'] / 1e6:.1f} MB; onnxruntime-genai's graph {s['genai_graph_bytes'] / 1e6:.2f} MB); "
              "layers: " +
              ", ".join(f"{n} x {k}" for k, n in info["lowerings"].items()), markup=False)


def _export_for_engine(path, out_dir, format_, target, max_shard, validation, windows, seq_len, force, json_,
                       no_verify):
    from .data import evaluation_windows
    from .errors import ExportError
    from .export.engines import export_for_engine

    def log(msg):
        if not json_:
            err.print(msg, markup=False)

    with user_errors(json_):
        if target not in (None, "vllm"):
            raise ExportError(f"unknown --target '{target}'", "use vllm, or leave it out")
        data = None
        if validation:
            from transformers import AutoTokenizer

            from .checkpoint import is_checkpoint

            if not is_checkpoint(path):
                raise ExportError(f"{path} is not a compressed checkpoint", "pass the output folder of `compress run`")
            data = evaluation_windows("pydoc", AutoTokenizer.from_pretrained(path), seq_len, windows,
                                      calibration_spec="pydoc")
        info = export_for_engine(Path(path), out_dir, format_, data, force=force, verify=not no_verify,
                                 engine=target, max_shard_bytes=max_shard, log=log)
    if json_:
        print(json.dumps(info, indent=1))
        return
    out.print(f"wrote {out_dir}: {info['size']['file_bytes'] / 1e6:.1f} MB ({format_}, {info['layers']} compressed "
              "layers)", markup=False)


@app.command()
def generate(
    path: Annotated[str, typer.Argument(help="ONNX export folder, compressed checkpoint, or any model")],
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="tokens to generate")] = 64,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the tokenizer's chat template")] = False,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads")] = None,
    prefill_chunk: Annotated[int | None, typer.Option(min=0, help="onnxruntime: prompt tokens a prefill run takes "
                                                      "(default: the export's; 0: the whole prompt)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print tokens and timings as JSON")] = False,
    no_verify: NoVerifyOpt = False,
):
    """Greedy generation: with onnxruntime and the exported KV cache when PATH holds model.onnx,
    else with PyTorch."""
    from transformers import AutoTokenizer

    from .export.runtime import ONNX_FILE, OnnxCausalLM, eos_ids, torch_greedy

    with user_errors(json_):
        onnx_dir = Path(path)
        if (onnx_dir / ONNX_FILE).exists() or (onnx_dir / "export.json").exists():
            lm = OnnxCausalLM(onnx_dir, threads)
            tok = AutoTokenizer.from_pretrained(onnx_dir)
            runtime = "onnxruntime"

            def run_greedy(ids, n, eos):
                return lm.greedy(ids, n, eos, prefill_chunk)
        else:
            model, tok = _load_any(path, "cpu", not no_verify)
            runtime = "pytorch"

            def run_greedy(ids, n, eos):  # the PyTorch twin of the onnxruntime loop
                return torch_greedy(model, ids, n, eos)
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True) if chat else prompt
        ids = tok(text, add_special_tokens=not chat).input_ids
        if not ids:
            from .errors import DataError

            raise DataError("the prompt is empty: no token to continue from", "give the text to continue")
        gen = run_greedy(ids, max_new_tokens, eos_ids(tok))
    completion = tok.decode(gen.tokens, skip_special_tokens=True)
    if json_:
        print(json.dumps({"runtime": runtime, "prompt_tokens": len(ids), "tokens": gen.tokens, "text": completion,
                          "prefill_ms": 1000 * gen.prefill_seconds, "decode_ms_per_token": gen.ms_per_token}))
        return
    out.print(completion, markup=False)
    speed = f", {gen.ms_per_token:.1f} ms/token" if gen.ms_per_token else ""
    err.print(f"[{runtime}: {len(ids)} prompt tokens, {len(gen.tokens)} generated, prefill "
              f"{1000 * gen.prefill_seconds:.0f} ms{speed}]", markup=False)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
