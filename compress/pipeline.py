"""The pass manager: plan the passes, then run them block by block through the decoder.

For each decoder block i:
  1. for each pass, when it asks for statistics (``Pass.requirements``), run the block on its captured
     inputs with hooks on the targeted linear layers to accumulate them (layers that read the
     same tensor, such as q/k/v, share one accumulator);
  2. let the pass compress the block's targeted layers;
  3. run the compressed block to produce the inputs of block i+1.
Only one block and its activations are on the compute device at a time, and every block is
compressed against the errors already made upstream (as in GPTQ and SparseGPT's drivers).
When no pass needs data, no calibration forward runs at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import distributed
from .blocks import (
    after_blocks,
    capture_block_inputs,
    input_device,
    on_compute,
    propagate,
    returns_tuple,
    run_block,
)
from .errors import PlanError
from .families import find_blocks
from .modules import CompressedLinear, dequantized_weights, embeddings_tied, linear_weight
from .passes.base import STAGES, BlockWork, LayerStats, Pass
from .passes.registry import get_pass
from .progress import Progress
from .residency import release_clean_pages, release_file_pages, return_freed_heap
from .sensitivity import output_fisher
from .stage import RunStage
from .teacher import Teacher

CHUNK = 4  # calibration sequences per forward (GPTQ, 32 x 512: 112 s and 1138 MB vs 117 s and 1193 MB with 8)


def plan(pass_configs) -> list[Pass]:
    """Instantiate the passes and check their order before any compute (which of them fuse is decided
    from the plan by :func:`fused_pairs`)."""
    passes = [get_pass(cfg.type)(cfg) for cfg in pass_configs]
    for i, (a, b) in enumerate(zip(passes, passes[1:], strict=False)):
        if STAGES.index(b.stage) < STAGES.index(a.stage):
            raise PlanError(
                f"pass {i + 1} ({b.name}, a {b.stage} pass) cannot follow pass {i} ({a.name}, a {a.stage} pass)",
                f"order passes as {' -> '.join(STAGES)}")
    for p in passes:
        p.check_plan(passes)
    return passes


def fused_pairs(passes: list[Pass]) -> dict[int, Pass]:
    """Pass index -> the following pass it is fused with (``Pass.fuses_with``: the first then does the second's
    work on the layers it finishes, and the pipeline hands those layers to the second no more)."""
    return {i: b for i, (a, b) in enumerate(zip(passes, passes[1:], strict=False)) if a.fuses_with(b)}


def check_resumable(passes: list[Pass]) -> None:
    """A resumed run recomputes the float model's activations through the float blocks; that gives the
    uninterrupted run's bytes only when the first pass to read them ("cross" statistics) sees the block as
    loaded, i.e. comes first."""
    crossing = [i for i, p in enumerate(passes) if "cross" in p.requirements().stats]
    if crossing and crossing[0] > 0:
        p = passes[crossing[0]]
        raise PlanError(f"--resume cannot rebuild the float activations pass {crossing[0] + 1} ({p.name}) reads "
                        f"after pass 1 ({passes[0].name}) changed the block",
                        "run again without --resume (it starts over)")


def check_distributable(passes: list[Pass], workers: int) -> None:
    """Passes that read a block's whole calibration input (``block_io``) or train through the whole model against
    the teacher (``teacher_top_k``) see one worker's share only: refused on a distributed run."""
    if workers > 1:
        for i, p in enumerate(passes):
            req = p.requirements()
            if req.block_io or req.teacher_top_k:
                what = "each block's" if req.block_io else "the model's"
                raise PlanError(f"pass {i + 1} ({p.name}) reads {what} whole calibration input and cannot be "
                                "spread over workers", "run it with --nproc 1")


def needs_calibration(passes: list[Pass]) -> bool:
    """Whether any pass reads calibration data (statistics, block inputs, or a model plan)."""
    return any(p.requirements().calibration for p in passes)


@dataclass
class LayerRecord:
    name: str
    shape: tuple
    passes: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


@dataclass
class PipelineResult:
    layers: dict[str, LayerRecord]
    pass_seconds: dict[str, float]
    calibration_seconds: float
    allocation: dict = field(default_factory=dict)  # pass -> layer -> chosen options


class _StatsDone(Exception):
    """Raised by the statistics hooks once a batch reached every hooked layer."""


def _add_to_sum(total: torch.Tensor | None, part: torch.Tensor, rows_at_once: int = 1024) -> torch.Tensor:
    """``total + part`` in place, ``total`` a float64 sum (created at the first part). Added a slice of rows at a
    time: a mixed-dtype ``add_`` first makes a float64 copy of the whole float32 part (1.6 GB for an 8B model's
    down projection, measured as the run's peak)."""
    if total is None:
        return part.double()
    for r in range(0, part.shape[0], rows_at_once):
        total[r:r + rows_at_once].add_(part[r:r + rows_at_once])
    return total


class StatsCollector:
    """Forward pre-hooks that accumulate input statistics of linear layers.

    ``reference`` (for "cross"): the same layers' inputs in the float model on the same batch, set
    per batch; ``cross`` accumulates ``X_float^T X`` against them."""

    def __init__(self, layers: dict[str, nn.Module], needs: frozenset[str]):
        self.stats: dict[str, LayerStats] = {}
        self.needs = needs
        self.reference: dict[str, torch.Tensor] = {}
        self.paused = False  # while the float model's forward runs through the same layers
        self._seen: dict[int, tuple] = {}
        self._fired: list[str] = []  # hooked layers in the order the current batch reached them
        self._last_call: int | None = None  # after the first batch: how many hook calls a batch makes
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def fn(_module, args):
            if self.paused:
                return
            self._fired.append(name)
            x = args[0]
            key = x.data_ptr()
            if key in self._seen:  # another layer already accumulated this very tensor
                self.stats.setdefault(name, self._seen[key][1])
            else:
                st = self.stats.setdefault(name, LayerStats())
                self._seen[key] = (x, st)  # holding x keeps its address from being reused
                self._accumulate(st, x.detach().reshape(-1, x.shape[-1]).float(), self.reference.get(name))
            if self._last_call is not None and len(self._fired) == self._last_call:
                raise _StatsDone  # nothing after the last hooked layer's input is needed
        return fn

    def _accumulate(self, st: LayerStats, x: torch.Tensor, reference: torch.Tensor | None):
        st.tokens += x.shape[0]
        if "hessian" in self.needs:
            st.hessian = _add_to_sum(st.hessian, x.t() @ x)
        if "cross" in self.needs:
            assert reference is not None, "cross statistics need the float model's inputs"
            st.cross = _add_to_sum(st.cross, reference.reshape(-1, x.shape[-1]).float().t() @ x)
        elif "sq_sum" in self.needs:
            st.sq_sum = _add_to_sum(st.sq_sum, (x * x).sum(0))
        if "x_sum" in self.needs:
            st.x_sum = _add_to_sum(st.x_sum, x.sum(0))

    def end_batch(self):
        self._seen.clear()
        if self._last_call is None:
            self._last_call = len(self._fired) or None
        self._fired.clear()

    def close(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def _collect_stats(block, layers, needs, inputs, device, float_inputs=None) -> dict[str, LayerStats]:
    """Accumulate ``needs`` over the calibration batches. With "cross", ``float_inputs`` (the float
    model's activations at this block) run through the block first, batch by batch: the layers'
    float inputs are the reference of the cross statistics, and each batch is replaced in place by
    the block's output (the float stream moves on one block)."""
    collector = StatsCollector(layers, needs)
    with dequantized_weights(block):
        for k, (hidden, kwargs) in enumerate(inputs):  # batches after the first stop at the last hooked layer
            if "cross" in needs:
                collector.paused = True
                collector.reference, out = _layer_inputs(block, layers, float_inputs[k], device)
                collector.paused = False
                float_inputs[k] = (out, float_inputs[k][1])
            try:
                run_block(block, (hidden, kwargs), device)
            except _StatsDone:
                pass
            collector.end_batch()
            collector.reference = {}
    collector.close()
    _sum_over_workers(collector.stats)
    for st in {id(st): st for st in collector.stats.values()}.values():
        st.settle()
    return_freed_heap()
    return collector.stats


def _sum_over_workers(stats: dict[str, LayerStats]) -> None:
    """On a distributed run, every statistic summed over the workers' calibration shares, in place (each shared
    accumulator once, in the order of the layers' names, which every worker agrees on)."""
    world = distributed.WORLD
    if world.size == 1:
        return
    distinct: list[LayerStats] = []
    for name in sorted(stats):
        if all(stats[name] is not st for st in distinct):
            distinct.append(stats[name])
    tokens = torch.tensor([float(st.tokens) for st in distinct], dtype=torch.float64)
    world.all_reduce([tokens, *[t for st in distinct for t in (st.hessian, st.sq_sum, st.x_sum, st.cross)
                                if t is not None]], "statistics")
    for st, n in zip(distinct, tokens.tolist(), strict=True):
        st.tokens = int(n)


def _layer_inputs(block, layers, batch, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``block`` on one batch: (the input of every layer in ``layers``, the block's output)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0].detach()))
               for n, m in layers.items()]
    try:
        out = run_block(block, batch, device)
    finally:
        for h in handles:
            h.remove()
    return seen, out.detach()


def _shape(layer: nn.Module) -> tuple[int, int]:
    """[out, in] of a linear layer, compressed or not."""
    if isinstance(layer, CompressedLinear):
        return layer.fmt.shape
    w = linear_weight(layer)
    return int(w.shape[0]), int(w.shape[1])


def _linear_layers(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    return {f"{prefix}.{n}": m for n, m in block.named_modules()
            if isinstance(m, nn.Linear | CompressedLinear)}


def run_passes(model, passes: list[Pass], calibration: torch.Tensor | None, device,
               progress: Progress | None = None, stage: RunStage | None = None) -> PipelineResult:
    """Apply ``passes`` to ``model`` in place, block by block. With a ``stage``, each finished block is written
    there and its tensors become views of the written file (memory holds one block), and blocks the stage
    already holds (a resumed run) are read back instead of compressed again."""
    prefix, blocks = find_blocks(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    records: dict[str, LayerRecord] = {}
    seconds = {f"{i}:{p.name}": 0.0 for i, p in enumerate(passes)}
    reqs = [p.requirements() for p in passes]
    needs_data = any(r.calibration for r in reqs)
    t0 = time.perf_counter()
    for p in passes:  # model-wide changes (a rotation of the embeddings) come before any calibration forward
        p.prepare(model)
    allocation = plan_globally(model, blocks, prefix, passes, calibration, device, progress)
    captured = capture_block_inputs(model, blocks, distributed.WORLD.share(calibration), CHUNK) \
        if needs_data and calibration is not None else None
    # until each block's turn, no weight is read: an evaluation before, or the embeddings just now, made
    # them resident (SmolLM2: 113 MB of embeddings, 538 MB after an evaluation); the file has them
    release_clean_pages([p.data for p in model.parameters()])
    # the compressed model's stream, for passes that look at a block's inputs or the head's
    wants_stream = any(r.stats or r.block_io or r.head_inputs for r in reqs)
    # the float model's, for passes that match its outputs (GPTQ's asymmetric calibration) and for the teacher
    teacher_k = max(r.teacher_top_k for r in reqs) if reqs else 0
    wants_float = bool(teacher_k) or any("cross" in r.stats or r.float_outputs for r in reqs)
    inputs = captured if wants_stream else None
    float_inputs = None if captured is None or not wants_float else \
        [(h.clone(), kw) for h, kw in captured] if wants_stream else captured
    del captured
    calib_s = time.perf_counter() - t0
    wants_head = inputs is not None and any(r.head_inputs for r in reqs)
    task = progress.add("compressing blocks", total=len(blocks)) if progress else None
    for i, block in enumerate(blocks):
        block_prefix = f"{prefix}.{i}"
        loaded_weights = [p.data for p in block.parameters()]
        done = stage.finished(i) if stage is not None else None
        if stage is not None and done is not None:  # a resumed run: the stage holds this block
            if float_inputs is not None:
                with on_compute(block, device):
                    _data_free_transforms(i, block, block_prefix, model_type, passes, reqs, device)
                    float_inputs = propagate(block, float_inputs, device)
            stage.load(i, block)
            _restore_block(done, passes, i, records, seconds)
        else:
            with on_compute(block, device, keep_changes=True):  # a transform's changes stay
                float_inputs = _compress_block(i, block, block_prefix, model_type, passes, reqs, records, seconds,
                                               inputs, float_inputs, device)
            if stage is not None:
                stage.commit(i, block, block_prefix, _block_entry(block_prefix, passes, i, records, seconds))
        if inputs is not None and (i + 1 < len(blocks) or wants_head):  # the last block's outputs feed the head only
            with on_compute(block, device):
                inputs = propagate(block, inputs, device)
        _release_replaced(block, loaded_weights)
        del loaded_weights
        return_freed_heap()
        if progress is not None and task is not None:
            progress.advance(task)
    head_stats = _head_input_stats(model, blocks, inputs, calibration, device) if wants_head else None
    del inputs
    teacher = _teacher(model, blocks, float_inputs, calibration, device, teacher_k) \
        if teacher_k and float_inputs is not None else None
    del float_inputs
    for j, p in enumerate(passes):
        t = time.perf_counter()
        with torch.no_grad():
            ends = p.compress_ends(model, head_stats)
        seconds[f"{j}:{p.name}"] += time.perf_counter() - t
        for name, note in ends.items():
            records[name] = LayerRecord(name, tuple(model.get_submodule(name).fmt.shape), [p.name], note)
    for j, p in enumerate(passes):
        info = p.finalize(model)
        if info:
            records = _renumber(records, prefix, info.pop("kept_blocks", None))
            allocation[f"{j}:{p.name}"] = info
    for j, p in enumerate(passes):
        t = time.perf_counter()
        info = p.tune_model(model, teacher, device)
        seconds[f"{j}:{p.name}"] += time.perf_counter() - t
        if info:
            allocation[f"{j}:{p.name}"] = info
    return PipelineResult(records, seconds, calib_s, allocation)


def _after_blocks(model, blocks, outputs, calibration, device):
    """The model's forward on each chunk of (this worker's share of) ``calibration`` with the blocks replaced by
    ``outputs`` (the last block's outputs, chunk by chunk): what the model's own code computes after the blocks,
    yielded chunk by chunk (a hook may stop a chunk early by raising _StatsDone: None is yielded then)."""
    with on_compute(blocks[-1], device):
        as_tuple = returns_tuple(blocks[-1], outputs[0], device)
    embeddings = model.get_input_embeddings()
    with after_blocks(blocks, [h for h, _ in outputs], as_tuple), \
            on_compute(model, device, skip=() if embeddings_tied(model) else (embeddings,)):
        for part in distributed.WORLD.share(calibration).split(CHUNK):
            try:
                yield model(input_ids=part.to(input_device(model)), use_cache=False)
            except _StatsDone:
                yield None


@torch.no_grad()
def _head_input_stats(model, blocks, outputs, calibration, device) -> LayerStats:
    """The Hessian of the output head's inputs over the calibration: the last block's ``outputs`` (chunk by chunk)
    through what the model's own forward runs after the blocks, stopped at the head (no logits are computed)."""
    st = LayerStats()

    def grab(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        st.tokens += x.shape[0]
        st.hessian = _add_to_sum(st.hessian, x.t() @ x)
        raise _StatsDone

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        for _ in _after_blocks(model, blocks, outputs, calibration, device):
            pass
    finally:
        handle.remove()
    _sum_over_workers({"head": st})
    st.settle()
    return st


@torch.no_grad()
def _teacher(model, blocks, float_outputs, calibration, device, k: int) -> Teacher:
    """The float model's top-``k`` next-token distribution over the calibration, from the float stream's last
    block outputs (before the head is compressed)."""
    logits = (out.logits.cpu() for out in _after_blocks(model, blocks, float_outputs, calibration, device))
    return Teacher.from_logits(calibration, logits, k)


def _data_free_transforms(i, block, block_prefix, model_type, passes, reqs, device) -> None:
    """Block ``i`` as the float stream reads it on a resumed run: the transforms that read no data (a rotation)
    applied. The others (AWQ's scales) keep the float model's function in the stream's basis: they can be left out."""
    for p, req in zip(passes, reqs, strict=True):
        if p.stage == "transform" and not req.calibration:
            with torch.no_grad():
                p.apply(BlockWork(i, block, block_prefix, model_type, {}, device=device), lambda *_: None)


def _compress_block(i, block, block_prefix, model_type, passes, reqs, records, seconds, inputs, float_inputs,
                    device):
    """Run every pass on block ``i`` (on the compute device); returns the float stream, moved past the block
    when a pass needed it."""
    fused = fused_pairs(passes)
    all_layers = _linear_layers(block, block_prefix)
    for name, m in all_layers.items():
        records.setdefault(name, LayerRecord(name, _shape(m)))
    # statistics a transform pass handed on
    stats: dict[str, LayerStats] = {}
    stats_kinds: frozenset[str] = frozenset()
    float_moved = False  # the float stream advances once per block, at the first "cross" statistics
    # or else once the block is the float model's own: after the transforms, which keep its function but may
    # turn the stream (a rotation), before anything that changes it
    ahead = float_inputs is not None and not any("cross" in r.stats and any(map(p.cfg.applies_to, all_layers))
                                                 for p, r in zip(passes, reqs, strict=True))
    finished: set[str] = set()  # layers the previous pass, fused with this one, already did
    for j, (p, req) in enumerate(zip(passes, reqs, strict=True)):
        if ahead and not float_moved and p.stage != "transform":
            float_inputs, float_moved = propagate(block, float_inputs, device), True
        layers = {n: m for n, m in _linear_layers(block, block_prefix).items()
                  if p.cfg.applies_to(n) and n not in finished}
        for name in finished:
            records[name].passes.append(p.name)
            records[name].notes.update({"quantized_by": f"joint sweep with {passes[j - 1].name}"})
        finished = set()
        if not layers and not req.block_io:
            continue
        t = time.perf_counter()
        work = BlockWork(i, block, block_prefix, model_type, layers, inputs=inputs, device=device,
                         float_outputs=float_inputs if float_moved else None, fused=fused.get(j))
        if req.stats and not (req.stats <= stats_kinds and set(layers) <= set(stats)):
            needs = req.stats - {"cross"} if float_moved else req.stats
            stats, stats_kinds = _collect_stats(block, layers, needs, inputs, device, float_inputs), needs
            float_moved = float_moved or "cross" in needs
        work.stats = stats
        with torch.no_grad():
            if req.layer_parallel and distributed.WORLD.size > 1:
                _apply_shared(p, work, partial(_replace, block, block_prefix))
            else:
                p.apply(work, partial(_replace, block, block_prefix))
        if not req.preserves_stats:
            stats, stats_kinds = {}, frozenset()
        seconds[f"{j}:{p.name}"] += time.perf_counter() - t
        for name, note in work.notes.items():
            records[name].passes.append(p.name)
            records[name].notes.update(note)
        if work.fused is not None:
            finished = work.finished
    if ahead and not float_moved:  # transforms only
        float_inputs = propagate(block, float_inputs, device)
    for name, m in _linear_layers(block, block_prefix).items():  # structured pruning shrinks layers
        records[name].shape = _shape(m)
    for m in block.modules():  # e.g. dense copies kept for mask refinement live one block only
        if isinstance(m, CompressedLinear):
            m.fmt.drop_block_scratch()
    return float_inputs


def _apply_shared(p: Pass, work: BlockWork, replace) -> None:
    """A layer-parallel pass on a distributed run: this worker solves its share of the layers (layers that read
    one input stay together; shares balanced by a solve's cost, rows x columns^2), then every worker takes in
    every solved layer, its notes and the layers a fused pass finished."""
    world = distributed.WORLD
    groups: dict[int, list[str]] = {}
    for name in work.layers:
        groups.setdefault(id(work.stats.get(name)) if name in work.stats else id(name), []).append(name)
    names = list(groups.values())
    costs = [float(sum(math.prod(_shape(work.layers[n])) * _shape(work.layers[n])[1] for n in g)) for g in names]
    mine = {n for g in world.assign(names, costs) for n in g}
    everything = work.layers
    work.layers = {n: m for n, m in everything.items() if n in mine}
    solved: dict[str, nn.Module] = {}

    def keep(name: str, new: nn.Module) -> None:
        solved[name] = new
        replace(name, new)

    p.apply(work, keep)
    work.layers = everything
    for part in world.all_gather((solved, work.notes, work.finished), "layers"):
        theirs, notes, finished = part
        for name, new in theirs.items():
            if name not in mine:
                replace(name, new)
        work.notes.update(notes)
        work.finished |= finished


def _block_entry(block_prefix: str, passes: list[Pass], i: int, records: dict, seconds: dict) -> dict:
    """What the stage keeps of a finished block besides its tensors."""
    return {"records": {n: {"shape": list(r.shape), "passes": r.passes, "notes": r.notes}
                        for n, r in records.items() if n.startswith(block_prefix + ".")},
            "seconds": {k: v for k, v in seconds.items()},
            "pass_state": {str(j): p.block_state(i) for j, p in enumerate(passes)}}


def _restore_block(done: dict, passes: list[Pass], i: int, records: dict, seconds: dict) -> None:
    """A block a resumed run reads back: its records, the passes' seconds so far, and the passes' state."""
    for n, r in done["records"].items():
        records[n] = LayerRecord(n, tuple(r["shape"]), list(r["passes"]), dict(r["notes"]))
    seconds.update(done["seconds"])
    for j, p in enumerate(passes):
        p.restore_block_state(i, done["pass_state"].get(str(j), {}))


def _release_replaced(block: nn.Module, loaded_weights: list[torch.Tensor]) -> None:
    """Give back the pages of the block's loaded weights that no parameter uses any more (layers
    replaced by their compressed form, or weights rewritten into new tensors), and the unchanged pages
    of those it keeps: with a memory-mapped checkpoint they would otherwise stay resident to the end
    (GPTQ on SmolLM2, 128 x 512: 425 MB)."""
    in_use = {p.data_ptr() for p in block.parameters()}
    release_file_pages([w for w in loaded_weights if w.data_ptr() not in in_use])
    release_clean_pages([p.data for p in block.parameters()])  # kept unchanged: read again from the file


def _renumber(records: dict, prefix: str, kept: dict | None) -> dict:
    """Records of the blocks kept, under their new block numbers."""
    if kept is None:
        return records
    out = {}
    for name, rec in records.items():
        index, _, rest = name[len(prefix) + 1:].partition(".")
        if int(index) in kept:
            rec.name = f"{prefix}.{kept[int(index)]}.{rest}"
            out[rec.name] = rec
    return out


@torch.no_grad()
def plan_globally(model, blocks, prefix, passes, calibration, device, progress) -> dict:
    """A float sweep over a few calibration sequences for passes that decide per layer from a
    model-wide view (mixed precision): score every targeted layer, then let the pass choose."""
    planners = [(p, p.requirements().model_plan) for p in passes]
    planners = [(p, mp) for p, mp in planners if mp is not None]
    if not planners:
        return {}
    samples = max(mp.samples for _, mp in planners)
    targeted = [n for i, b in enumerate(blocks) for n in _linear_layers(b, f"{prefix}.{i}")
                if any(p.cfg.applies_to(n) for p, _ in planners)]
    fisher = output_fisher(model, targeted, calibration[:samples], device) \
        if any(mp.fisher for _, mp in planners) else {}
    inputs = capture_block_inputs(model, blocks, calibration[:samples], CHUNK)
    scores: dict[int, dict] = {id(p): {} for p, _ in planners}
    task = progress.add("ranking layers", total=len(blocks)) if progress else None
    for i, block in enumerate(blocks):
        with on_compute(block, device):
            for p, mp in planners:
                layers = {n: m for n, m in _linear_layers(block, f"{prefix}.{i}").items() if p.cfg.applies_to(n)}
                stats = _collect_stats(block, layers, mp.stats, inputs, device)
                scores[id(p)].update({n: p.score_layer(n, m, stats.get(n), fisher.get(n))
                                      for n, m in layers.items()})
            inputs = propagate(block, inputs, device)
        if task is not None:
            progress.advance(task)
    return {f"{passes.index(p)}:{p.name}": p.plan_model(scores[id(p)]) for p, _ in planners}


def _replace(block: nn.Module, block_prefix: str, name: str, new: nn.Module):
    """Put a pass's compressed layer in place; the heap its work freed goes back to the OS now, before
    the next layer's work piles on top (GPTQ's clip search left ~80 MB behind per layer on SmolLM2)."""
    rel = name[len(block_prefix) + 1:]
    parent_name, _, child = rel.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)
    return_freed_heap()
