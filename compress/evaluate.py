"""Quality of a model on held-out text: perplexity, and against the base model the KL divergence
of next-token distributions and top-1 agreement, all on the same token windows."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import distributed
from .blocks import after_blocks, capture_block_inputs, input_device, on_compute, propagate, returns_tuple
from .families import find_blocks
from .modules import dequantized_weights, embeddings_tied
from .progress import Progress
from .report.model import Quality

EVAL_BATCH = 2  # windows per forward


class SpilledLogprobs:
    """The base model's log-probs, one float16 tensor per evaluation batch, kept in a temporary folder
    instead of memory: 16 x 512 tokens of a 49k vocabulary are 0.8 GB, which would otherwise stay
    resident through the whole compression that runs between the base and the compressed evaluation.
    Indexable like a list; the folder goes with the object (or with ``close``)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="compress-logprobs-")
        self._count = 0

    def _path(self, i: int) -> Path:
        return Path(self._dir.name) / f"{i}.pt"

    def append(self, logprobs: torch.Tensor) -> None:
        torch.save(logprobs, self._path(self._count))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._count:
            raise IndexError(i)
        return torch.load(self._path(i), weights_only=True)

    def close(self) -> None:
        self._dir.cleanup()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device="cpu", reference: Sequence[torch.Tensor] | None = None,
             keep_logprobs: bool = False, progress: Progress | None = None, label: str = "evaluating"):
    """Evaluate ``model`` on ``windows`` [n, seq_len], one decoder block at a time: every window passes through
    block 0, then block 1, ... (as calibration does), so evaluating needs the memory of one block and the
    windows' activations, not of the model; what follows the last block runs through the model's own forward
    (:func:`blocks.after_blocks`).

    ``reference``: the base model's log-probs per batch (from ``keep_logprobs=True``, or a list), to measure
    KL(base || model) and top-1 agreement. Returns (Quality, kept log-probs or None); kept
    log-probs are spilled to disk (:class:`SpilledLogprobs`).
    """
    t0 = time.perf_counter()
    _, blocks = find_blocks(model)
    task = progress.add(label, total=len(blocks) + 1) if progress else None
    total_windows = windows.shape[0]
    windows = distributed.WORLD.share(windows)  # a distributed run: this worker's windows; the sums are reduced
    hidden = capture_block_inputs(model, blocks, windows, EVAL_BATCH)
    as_tuple = False
    for i, block in enumerate(blocks):
        with on_compute(block, device):
            if i == len(blocks) - 1:
                as_tuple = returns_tuple(block, hidden[0], device)
            hidden = propagate(block, hidden, device)
        if progress is not None and task is not None:
            progress.advance(task)
    nll_sum, count, kl_sum, agree = 0.0, 0, 0.0, 0.0
    kept = SpilledLogprobs() if keep_logprobs else None
    embeddings = model.get_input_embeddings()
    tied = embeddings_tied(model)
    with after_blocks(blocks, [h for h, _ in hidden], as_tuple), \
            on_compute(model, device, skip=() if tied else (embeddings,)):
        del hidden
        for b, batch in enumerate(windows.split(EVAL_BATCH)):
            logits = model(input_ids=batch.to(input_device(model)), use_cache=False).logits[:, :-1]
            ref_batch = reference[b] if reference is not None else None
            parts = []
            # one window at a time: over a 128k vocabulary each [seq, vocab] float32 temporary is 130 MB per window
            for i in range(logits.shape[0]):
                logp = torch.log_softmax(logits[i].float(), dim=-1)
                targets = batch[i, 1:].to(logp.device)
                nll_sum -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
                count += targets.numel()
                if ref_batch is not None:
                    ref = ref_batch[i].to(logp.device).float()
                    agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                    diff = ref - logp
                    kl_sum += ref.exp_().mul_(diff).sum().item()  # sum p_ref (log p_ref - log p)
                    del ref, diff
                if kept is not None:
                    parts.append(logp.half().cpu())
                del logp
            del logits
            if kept is not None:
                kept.append(torch.stack(parts))
    if progress is not None and task is not None:
        progress.advance(task)
    sums = torch.tensor([nll_sum, count, kl_sum, agree], dtype=torch.float64)
    distributed.WORLD.all_reduce([sums], "evaluation")
    nll_sum, kl_sum, agree = sums[0].item(), sums[2].item(), sums[3].item()
    count = int(sums[1].item())
    nll = nll_sum / count
    compared = reference is not None
    result = Quality(perplexity=math.exp(nll), nll=nll, tokens=count, windows=total_windows,
                     seq_len=windows.shape[1], seconds=time.perf_counter() - t0,
                     kl_divergence=kl_sum / count if compared else None,
                     top1_agreement=agree / count if compared else None)
    return result, kept


@torch.no_grad()
def decode_latency(model, prompt: torch.Tensor, new_tokens: int = 32, device="cpu", warmup: int = 3) -> float:
    """Milliseconds per generated token, batch 1, greedy, with the KV cache: the median over
    ``new_tokens`` decode steps after ``warmup`` untimed ones (prefill excluded). Compressed layers
    run their forward as in evaluation (weights dequantized once)."""
    times = []
    with dequantized_weights(model):
        out = model(input_ids=prompt.reshape(1, -1).to(device), use_cache=True)
        for step in range(warmup + new_tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            if step >= warmup:
                times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]
