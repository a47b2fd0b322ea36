"""Decode speed on a GPU: tokens/s of greedy decoding, fp16 model vs compressed checkpoints whose layers
run through the CuPy kernels (needs an NVIDIA GPU and CuPy).

    python bench/decode.py MODEL CHECKPOINT [CHECKPOINT ...] [--tokens 128] [--prefill 512]

MODEL is any model spec (smollm2-135m, a .gguf, a folder) loaded in fp16; each CHECKPOINT is an output
folder of `compress run`, loaded in fp16 (its compressed layers stay compressed). The prompt is 32 held-out
pydoc tokens. Two timings per row: "eager" (one Python forward per token, what `generate` does) and
"graph" (the decode step captured once in a CUDA graph over a static KV cache, then replayed: launch costs
gone, so the weights' bytes and the kernels decide). "agree" is the share of greedy tokens equal to the
fp16 model's. "prefill ms" is one forward over a --prefill-token prompt (batches of rows that large
decode the weights on the GPU and use cuBLAS).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from compress.checkpoint import is_checkpoint, load_checkpoint  # noqa: E402
from compress.data import evaluation_windows  # noqa: E402
from compress.models import resolve  # noqa: E402


def load(spec: str):
    if is_checkpoint(spec):
        return load_checkpoint(spec, device="cuda", dtype=torch.float16)
    model, tok, _ = resolve(spec)
    return model.half().cuda().eval(), tok


@torch.no_grad()
def eager_decode(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    out = model(input_ids=prompt, use_cache=True)
    cache, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    torch.cuda.synchronize()
    return tokens, (n - 1) / (time.perf_counter() - start)


@torch.no_grad()
def graph_decode(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    from transformers import StaticCache

    p = prompt.shape[1]

    def prefilled():
        cache = StaticCache(config=model.config, max_cache_len=p + n + 4)
        out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device="cuda"),
                    use_cache=True)
        return cache, out.logits[:, -1:].argmax(-1)

    spare, tok = prefilled()
    pos = torch.tensor([p], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a spare cache (a static cache advances its own length)
        for _ in range(2):
            model(input_ids=tok, past_key_values=spare, cache_position=pos, use_cache=True)
    torch.cuda.current_stream().wait_stream(stream)
    del spare
    cache, tok = prefilled()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
    tokens = [int(tok)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n - 1):
        graph.replay()
        tok.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)
        tokens.append(int(tok))  # the sync a real server makes to stream the token out
    torch.cuda.synchronize()
    return tokens, (n - 1) / (time.perf_counter() - start)


@torch.no_grad()
def prefill_ms(model, prompt: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of one forward over the whole prompt (batch 1), in milliseconds."""
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=prompt, use_cache=False)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times[1:])[repeats // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+", help="MODEL (fp16 baseline) then compressed checkpoints")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill timing")
    ap.add_argument("--gemv-max-rows", type=int, default=None, help="override kernels.GEMV_MAX_ROWS and "
                    "SPARSE_GEMV_MAX_ROWS (e.g. 100000: every batch through the GEMV kernels, no GPU decode)")
    a = ap.parse_args()
    if a.gemv_max_rows is not None:
        from compress import kernels

        kernels.GEMV_MAX_ROWS = kernels.SPARSE_GEMV_MAX_ROWS = a.gemv_max_rows
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    rows, reference = [], None
    for spec in a.specs:
        model, tok = load(spec)
        prompt = evaluation_windows("pydoc", tok, 32, 1, calibration_spec="pydoc")[0][None].cuda()
        long_prompt = evaluation_windows("pydoc", tok, a.prefill, 1, calibration_spec="pydoc")[0][None].cuda()
        prefill = prefill_ms(model, long_prompt)
        torch.cuda.reset_peak_memory_stats()
        eager_tokens, eager = eager_decode(model, prompt, a.tokens)
        try:
            graph_tokens, graph = graph_decode(model, prompt, a.tokens)
        except Exception as error:  # noqa: BLE001 - report the eager number alone
            print(f"{spec}: graph capture failed: {error}", file=sys.stderr)
            graph_tokens, graph = eager_tokens, float("nan")
        reference = reference or eager_tokens
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            m.fmt.nbytes() for m in model.modules() if hasattr(m, "fmt"))
        rows.append({"model": Path(spec).name, "weights MB": weights / 1e6,
                     "prefill ms": prefill, "eager tok/s": eager, "graph tok/s": graph,
                     "agree": sum(x == y for x, y in zip(eager_tokens, reference, strict=True)) / len(reference),
                     "graph = eager": graph_tokens == eager_tokens,
                     "peak GPU MB": torch.cuda.max_memory_allocated() / 1e6})
        print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
        del model
        torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r["eager vs fp16"] = r["eager tok/s"] / base["eager tok/s"]
        r["graph vs fp16"] = r["graph tok/s"] / base["graph tok/s"]
    print(f"{torch.cuda.get_device_name()}; greedy decoding of {a.tokens} tokens after a 32-token prompt, batch 1; "
          f"prefill: one forward over {a.prefill} tokens (median of 5)")
    common.print_table(["model", "weights MB", "prefill ms", "eager tok/s", "graph tok/s", "eager vs fp16",
                        "graph vs fp16", "agree", "graph = eager", "peak GPU MB"], rows)


if __name__ == "__main__":
    main()
