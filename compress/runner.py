"""`compress run`: recipe + model -> compressed checkpoint, report, and a budget verdict.

Everything is written into a hidden temporary folder next to the output folder and renamed into
place at the very end, so an interrupted or failed run never leaves a half-written model.
"""

from __future__ import annotations

import platform
import random
import re
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__, distributed
from .blocks import on_compute
from .budgets import BudgetCheck, check_budgets, measures_latency
from .checkpoint import DTYPES, checkpoint_content, round_to_storage, save_checkpoint
from .data import calibration_batches, evaluation_windows, resolve_source
from .errors import CompressError, OutputError
from .evaluate import decode_latency, evaluate
from .families import find_blocks
from .models import check_source, gguf_tokenizer_pre, resolve, torch_dtype
from .modules import parameter_count
from .pipeline import check_distributable, check_resumable, needs_calibration, plan, run_passes
from .progress import Progress
from .recipe import Recipe, deprecations, load_recipe
from .report import REPORT_SCHEMA_VERSION, write_reports
from .report.card import run_card
from .report.model import Layer, ModelInfo, OnnxReport, PassTime, Report, Size, Timing
from .resources import check_resources
from .shards import DEFAULT_MAX_SHARD
from .stage import RunStage, stage_folder
from .staging import output_lock, staged_folder
from .tasks import check_tasks_available, task_accuracy


@dataclass
class RunOutcome:
    report: Report
    out_dir: Path | None       # None when nothing was kept (budget missed), and on workers other than 0
    checks: list[BudgetCheck]
    worker: int = 0            # which worker of a distributed run this is (only worker 0 reports)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def pick_device(device: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda``; a worker of a distributed run on GPUs takes GPU ``LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available() and distributed.WORLD.size > 1:
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise CompressError(f"unknown device '{device}'", "use auto, cpu or cuda")
    return torch.device(device)


def default_out_dir(recipe_name: str, model_spec: str) -> Path:
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_spec).stem if model_spec.endswith(".gguf") else
                   model_spec.rstrip("/").split("/")[-1])
    return Path("reports") / f"{recipe_name}-{model}"


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunLog:
    """Log lines of a run, with seconds since its start: shown on stderr (unless quiet) and written
    to ``run.log`` in the output folder."""

    def __init__(self, echo=None):
        self.t0 = time.perf_counter()
        self.lines: list[str] = []
        self.echo = echo

    def __call__(self, msg: str):
        self.detail(msg)
        if self.echo:
            self.echo(msg)

    def detail(self, msg: str):
        """A line for run.log only."""
        self.lines.append(f"[{time.perf_counter() - self.t0:8.1f}s] {msg}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _quality(model, tokenizer, windows, dev, recipe, progress, label, log, reference=None):
    """Perplexity (+ KL vs ``reference``), latency and task accuracy of one model, as the recipe asks."""
    ev = recipe.evaluate
    result, logprobs = evaluate(model, windows, dev, reference=reference, keep_logprobs=ev.kl and reference is None,
                                progress=progress, label=f"evaluating {label}")
    if (measures_latency(recipe) or ev.tasks) and distributed.WORLD.main:  # the whole model at once, in memory
        with on_compute(model, dev):
            if measures_latency(recipe):
                result.latency_ms = decode_latency(model, windows[0, :64], ev.latency_tokens, dev)
            if ev.tasks:
                result.tasks = task_accuracy(model, tokenizer, ev.tasks, ev.tasks_limit, dev)
    log(f"{label}: perplexity {result.perplexity:.4f}" +
        (f", KL {result.kl_divergence:.4f}" if result.kl_divergence is not None else "") +
        (f", {result.latency_ms:.2f} ms/token" if result.latency_ms is not None else "") +
        (f", tasks {result.tasks}" if result.tasks else ""))
    return result, logprobs


@dataclass
class LoadOptions:
    """How the model is read and the output written: ``dtype`` (``auto``: the checkpoint's own), ``resume`` from
    the stage a stopped run left, ``max_shard_bytes`` of the checkpoint's files."""

    dtype: str = "auto"
    resume: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD
    allow_pickle: bool = False
    revision: str | None = None        # hub ids: a branch, tag or commit
    trust_remote_code: bool = False    # run the model's own Python code (off: such a model is refused)


@dataclass
class CheckedRun:
    """A run's inputs once checked (before any model is loaded)."""

    recipe: Recipe
    passes: list
    needs_data: bool
    out_dir: Path


def check_run(recipe_path, model_spec: str, out: str | None, overrides=(), seed: int | None = None,
              force: bool = False, options: LoadOptions | None = None, workers: int = 1) -> CheckedRun:
    """Every check that needs no model: recipe, plan, data sources, tasks, MODEL's spelling, options, the output
    folder. A distributed run does them once, before starting its workers."""
    recipe = load_recipe(recipe_path, list(overrides))
    if seed is not None:
        recipe.seed = seed
    passes = plan(recipe.passes)
    check_distributable(passes, workers)
    needs_data = needs_calibration(passes)
    if needs_data:
        resolve_source(recipe.calibration.dataset)
        if recipe.calibration.samples < workers:
            raise CompressError(f"{workers} workers need at least {workers} calibration samples "
                                f"(the recipe has {recipe.calibration.samples})", "raise calibration.samples")
        for i, p in enumerate(passes):
            if recipe.calibration.samples < (need := p.requirements().min_samples):
                raise CompressError(f"pass {i + 1} ({p.name}) needs at least {need} calibration samples (the recipe "
                                    f"has {recipe.calibration.samples})", "raise calibration.samples or lower the "
                                    "pass's held-out share")
    resolve_source(recipe.evaluate.dataset)
    if recipe.evaluate.max_windows < workers:
        raise CompressError(f"{workers} workers need at least {workers} evaluation windows "
                            f"(the recipe has {recipe.evaluate.max_windows})", "raise evaluate.max_windows")
    check_tasks_available(recipe.evaluate.tasks)
    options = options or LoadOptions()
    check_source(model_spec, options.revision, options.trust_remote_code)
    torch_dtype(options.dtype)
    if options.resume:
        check_resumable(passes)
    for key, cfg in recipe.export.served().items():
        from .export.engines import RECIPE_KEYS, WRITERS

        if not recipe.export.checkpoint:
            raise CompressError(f"export.{key} is written from the checkpoint", "set export.checkpoint: true")
        WRITERS[RECIPE_KEYS[key]].check_passes(passes, cfg.target)
    out_dir = Path(out) if out else default_out_dir(recipe.name or Path(recipe_path).stem, model_spec)
    if out_dir.exists() and not force:
        raise OutputError(f"output folder {out_dir} already exists", "pass --force to replace it, or --out DIR")
    return CheckedRun(recipe, passes, needs_data, out_dir)


def run(recipe_path, model_spec: str, out: str | None = None, device: str = "auto", overrides=(),
        seed: int | None = None, force: bool = False, quiet: bool = False, keep_failed: bool = False,
        log=print, allow_pickle: bool = False, ignore_resource_check: bool = False,
        options: LoadOptions | None = None) -> RunOutcome:
    """One worker's run. In a distributed run (the environment torchrun or ``--nproc`` set up) worker 0 takes the
    output lock, checks resources and writes the outputs; every worker compresses and evaluates its share."""
    t_start = time.perf_counter()
    options = options or LoadOptions()
    options.allow_pickle = options.allow_pickle or allow_pickle
    world = distributed.join_from_environment(device)
    log = RunLog(log if world.main else None)
    try:
        checked = check_run(recipe_path, model_spec, out, overrides, seed, force, options, world.size)
        out_dir = checked.out_dir
        with output_lock(out_dir) if world.main else nullcontext():  # one run writes an output folder at a time
            if out_dir.exists() and not force:
                raise OutputError(f"output folder {out_dir} already exists", "pass --force to replace it, or --out DIR")
            dev = pick_device(device)
            if not ignore_resource_check and world.main:
                need = check_resources(model_spec, checked.recipe, out_dir, dev, checked.needs_data,
                                       max((p.requirements().teacher_top_k for p in checked.passes), default=0))
                if need is not None:
                    log(f"estimated need: {need.memory / 1e9:.1f} GB memory, {need.disk / 1e9:.1f} GB disk")
            folder = stage_folder(out_dir)
            if not world.main:
                folder = folder.with_name(f"{folder.name}-worker{world.rank}")
            stage = RunStage(folder, _stage_key(checked.recipe, model_spec, options, world.size),
                             checked.recipe.export.dense_dtype, options.resume)
            return _staged(stage, lambda: _execute(checked, model_spec, dev, quiet, keep_failed, log, t_start,
                                                   options, stage), log)
    finally:
        distributed.leave()


def _staged(stage: RunStage, work, log):
    """``work()``, keeping the stage's finished blocks when the run is killed, interrupted or crashes (for
    ``--resume``) and removing them when it ends, or stops on bad input."""
    try:
        outcome = work()
    except CompressError:
        stage.remove()
        raise
    except BaseException:
        if stage.blocks:
            log(f"{len(stage.blocks)} finished block(s) kept in {stage.folder}: run again with --resume")
        else:
            stage.remove()
        raise
    stage.remove()
    return outcome


def _stage_key(recipe, model_spec: str, options: LoadOptions, workers: int) -> dict:
    """What must be equal for a stage to be resumed."""
    return {"recipe_hash": recipe.digest(), "model": model_spec, "revision": options.revision, "dtype": options.dtype,
            "workers": workers, "compress_version": __version__}


def _execute(checked: CheckedRun, model_spec, dev, quiet, keep_failed, log, t_start, options: LoadOptions,
             stage: RunStage) -> RunOutcome:
    """Load, compress, evaluate, gate and write: the work of :func:`run` once its input was checked."""
    recipe, passes, needs_data, out_dir = checked.recipe, checked.passes, checked.needs_data, checked.out_dir
    world = distributed.WORLD
    seed_everything(recipe.seed)

    with Progress(enabled=not quiet and world.main) as progress:
        t = time.perf_counter()
        log(f"loading model {model_spec}" + (f" (resuming after {len(stage.blocks)} finished blocks)"
                                             if stage.blocks else ""))
        model, tokenizer, info = resolve(model_spec, dtype=torch_dtype(options.dtype),
                                         allow_pickle=options.allow_pickle, revision=options.revision,
                                         trust_remote_code=options.trust_remote_code)
        base_params = parameter_count(model)
        load_s = time.perf_counter() - t
        for p in passes:  # a pass the model's family does not take: refused before any compute
            p.check_model(model)
        if recipe.export.onnx is not None:  # a family the ONNX builder cannot export: refused before any compute
            from .export.llama import check_exportable

            check_exportable(model)

        cal, ev = recipe.calibration, recipe.evaluate
        windows = evaluation_windows(ev.dataset, tokenizer, ev.seq_len, ev.max_windows, cal.dataset)
        t = time.perf_counter()
        log(f"{info.family} model, {base_params:,} parameters; evaluating on {windows.shape[0]} x "
            f"{windows.shape[1]} tokens of {ev.dataset}")
        base, reference = _quality(model, tokenizer, windows, dev, recipe, progress, "base", log)
        calibration = None
        if needs_data:
            calibration = calibration_batches(cal.dataset, tokenizer, cal.samples, cal.seq_len, recipe.seed,
                                              ev.dataset)
        eval_s = time.perf_counter() - t

        t = time.perf_counter()
        for line in deprecations(recipe):
            log(f"deprecated: {line}")
        log(f"running {len(passes)} pass(es): {', '.join(p.name for p in passes) or 'none'}")
        result = run_passes(model, passes, calibration, dev, progress, stage)
        round_to_storage(model, recipe.export.dense_dtype)
        compress_s = time.perf_counter() - t
        for key, sec in result.pass_seconds.items():  # with the plain facts a pass reported (held-out KL, ...)
            facts = {k: v for k, v in result.allocation.get(key, {}).items() if isinstance(v, (bool, int, float, str))}
            log(f"pass {key}: {sec:.1f} s" + "".join(f", {k.replace('_', ' ')} {_short(v)}" for k, v in facts.items()))
        for name, rec in result.layers.items():
            if rec.notes:
                log.detail(f"  {name}: " + ", ".join(f"{k} {_short(v)}" for k, v in rec.notes.items()))

        t = time.perf_counter()
        comp, _ = _quality(model, tokenizer, windows, dev, recipe, progress, "compressed", log, reference)
        eval_s += time.perf_counter() - t
    if reference is not None:
        reference.close()

    content = checkpoint_content(model, recipe.export.dense_dtype)
    report = _build_report(recipe, info, model, content, base, comp, result, dev,
                           dict(base_parameters=base_params, load_seconds=load_s,
                                compress_seconds=compress_s, evaluate_seconds=eval_s))
    checks = check_budgets(recipe.budgets, report)
    report.budgets = checks
    report.budgets_passed = all(c.passed for c in checks)
    report.timing.total_seconds = time.perf_counter() - t_start
    for c in checks:
        log(f"budget {c.name}: {'pass' if c.passed else 'FAIL'} (actual {c.actual}, limit {c.limit})")

    report.workers, report.communication_bytes = world.size, dict(world.traffic)
    keep = report.budgets_passed or keep_failed
    if not keep or not world.main:
        return RunOutcome(report, None, checks, world.rank)
    with staged_folder(out_dir) as tmp:
        if recipe.export.checkpoint:
            save_checkpoint(model, tokenizer, tmp, recipe.export.dense_dtype, content=content,
                            extra={"recipe_hash": recipe.digest(), "compress_version": __version__,
                                   **({"gguf_tokenizer_pre": pre} if (pre := gguf_tokenizer_pre(info)) else {})},
                            max_shard_bytes=options.max_shard_bytes)
            report.size.checkpoint_file_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        if recipe.export.onnx is not None:
            with on_compute(model, "cpu"):
                report.onnx = _export_onnx(model, tokenizer, tmp / "onnx", recipe, windows, log)
            report.size.onnx_file_bytes = report.onnx.size["file_bytes"]
        if recipe.export.served():
            report.served = _export_served(tmp, recipe, windows, log)  # assigned: report.json keeps fields set
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_reports(report, tmp)
        (tmp / "README.md").write_text(run_card(report, _folder_entries(recipe)))
        (tmp / "run.log").write_text(log.text())
    return RunOutcome(report, out_dir, checks)


def _export_onnx(model, tokenizer, folder, recipe, windows, log) -> OnnxReport:
    from .export.onnx import Tolerance, export_onnx

    cfg = recipe.export.onnx
    log(f"exporting ONNX ({cfg.weights} weights) to {folder.name}/")
    tol = Tolerance.for_export(cfg.int8_activations, max_logit_diff=cfg.max_logit_diff,
                               min_top1_agreement=cfg.min_top1_agreement, max_perplexity_diff=cfg.max_perplexity_diff)
    check = windows[: cfg.windows, : cfg.seq_len] if cfg.validation else None
    info = export_onnx(model, tokenizer, folder, check, cfg.weights, 4 if cfg.int8_activations else 0,
                       DTYPES[recipe.export.dense_dtype], tol, log, cfg.prefill_chunk, cfg.custom_ops)
    return OnnxReport.model_validate({k: info[k] for k in ("size", "lowerings", "opset", "weights", "timing")} |
                                     {"validation": info.get("validation")})


def _folder_entries(recipe) -> list[str]:
    """What a run's output folder holds, as the model card's load instructions name it."""
    from .export.engines import RECIPE_KEYS

    return ((["checkpoint"] if recipe.export.checkpoint else []) + (["onnx"] if recipe.export.onnx else []) +
            [RECIPE_KEYS[k] for k in recipe.export.served()])


def _export_served(checkpoint: Path, recipe, windows, log) -> dict:
    from .export.engines import RECIPE_KEYS, export_for_engine
    from .export.served import ServedTolerance

    done = {}
    for key, cfg in recipe.export.served().items():
        target = RECIPE_KEYS[key]
        log(f"exporting {target} to {target}/{' for vLLM' if cfg.target else ''}")
        check = windows[: cfg.windows, : cfg.seq_len] if cfg.validation else None
        done[target] = export_for_engine(checkpoint, checkpoint / target, target, check, verify=False,
                                         engine=cfg.target, tolerance=ServedTolerance(cfg.max_perplexity_diff),
                                         source_label="..", log=log)
    return done


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _build_report(recipe, info, model, content, base, comp, result, dev, timing) -> Report:
    _, blocks = find_blocks(model)
    layers = []
    compressed_bytes = compressed_numel = 0
    for name, rec in result.layers.items():
        module = model.get_submodule(name)
        fmt = getattr(module, "fmt", None)
        dense_bytes = DTYPES[recipe.export.dense_dtype].itemsize
        nbytes = fmt.nbytes() if fmt is not None else module.weight.numel() * dense_bytes
        numel = rec.shape[0] * rec.shape[1]
        if fmt is not None:
            compressed_bytes += nbytes
            compressed_numel += numel
        layers.append(Layer.model_validate({
            "name": name, "shape": list(rec.shape), "passes": rec.passes,
            "format": fmt.describe() if fmt is not None else f"dense {recipe.export.dense_dtype}",
            "bytes": nbytes, "bits_per_weight": 8 * nbytes / numel, **rec.notes}))
    base_params = timing.pop("base_parameters")
    total_bytes = content.nbytes()
    return Report(
        schema_version=REPORT_SCHEMA_VERSION,
        compress_version=__version__,
        recipe=recipe.to_dict(),
        recipe_hash=recipe.digest(),
        model=ModelInfo(spec=info.spec, source=info.source, path=str(info.path), family=info.family,
                        blocks=len(blocks), parameters=base_params, parameters_after=parameter_count(model)),
        device=str(dev),
        base=base,
        compressed=comp,
        size=Size(
            base_fp16_bytes=base_params * 2,
            checkpoint_bytes=total_bytes,
            model_bits_per_weight=8 * total_bytes / base_params,
            compressed_layers_bytes=compressed_bytes,
            compressed_layers_params=compressed_numel,
            compressed_layers_bits_per_weight=8 * compressed_bytes / compressed_numel if compressed_numel else 16.0,
            compression_ratio_vs_fp16=base_params * 2 / total_bytes,
        ),
        passes=[PassTime(index=int(k.split(":")[0]), type=k.split(":")[1], seconds=v)
                for k, v in result.pass_seconds.items()],
        layers=layers,
        allocation=result.allocation,
        timing=Timing(**timing, calibration_capture_seconds=result.calibration_seconds),
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        versions=_versions(),
    )


def _versions() -> dict:
    import transformers

    v = {"compress": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v
