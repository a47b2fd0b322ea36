"""Kernel bench (needs an NVIDIA GPU and CuPy): compressed GEMV/GEMM against torch's fp16 matmul.

    python bench/kernels.py [--peak-gbs 3350] [--copies 8] [--iters 50]

For each weight shape (out x in) 4096x4096, 11008x4096, 4096x11008 and batch 1, 4, 16, and for each
format (4/3/2-bit int g128, 4-bit palette per channel, the frontier recipes' GPTVQ code books: 3-bit 2-vectors
with 64-entry books, 2-bit 4-vectors and 4-bit 2-vectors with 256-entry books; 2:4 + 4-bit, 50% bitmap + fp16),
prints the median time of one product, the bytes the kernel must read (weights + activations + output) per
second, that as a share of the GPU's peak memory bandwidth (--peak-gbs, H100 SXM: 3350 GB/s), and the
speed-up over ``x @ W.T`` in fp16. ``--copies`` distinct weight copies are cycled so each call reads
its weights from HBM, not from L2 (50 MB on an H100). The calls over the copies are captured in a CUDA
graph and replayed, so times are device times without Python's launch cost.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from compress import kernels  # noqa: E402
from compress.formats import DenseWeight, SparseWeight, compact, quantize_rtn  # noqa: E402
from compress.formats.vector import VectorWeight  # noqa: E402
from compress.passes.gptvq import GPTVQConfig  # noqa: E402
from compress.passes.kmeans import KMeansConfig, palettize  # noqa: E402
from compress.quant import QuantSpec  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 4, 16]


def make_formats(w: torch.Tensor) -> dict:
    keep24 = w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
    m24 = torch.zeros(w.shape[0], w.shape[1] // 4, 4, dtype=torch.bool).scatter_(2, keep24, True).reshape(w.shape)
    m50 = torch.zeros(w.shape, dtype=torch.bool).scatter_(1, w.abs().topk(w.shape[1] // 2, dim=1).indices, True)
    return {
        "int4 g128": quantize_rtn(w, QuantSpec(4, 128)),
        "int3 g128": quantize_rtn(w, QuantSpec(3, 128)),
        "int2 g128": quantize_rtn(w, QuantSpec(2, 128)),
        "palette4 channel": palettize(w, KMeansConfig(type="kmeans", bits=4, iterations=3)),
        **{f"gptvq{cfg.bits} d{cfg.dim} ({recipe})": code_book_layout(w.shape, cfg)
           for recipe in ("w3-frontier", "w3-frontier-table8", "w2-frontier", "w4-frontier")
           for cfg in [GPTVQConfig(**common.recipe_pass(recipe, "gptvq"))]},
        "2:4 + int4 g64": SparseWeight(m24, quantize_rtn(compact(w, m24), QuantSpec(4, 64)), "2:4"),
        "50% bitmap + fp16": SparseWeight(m50, DenseWeight(compact(w, m50))),
    }


def code_book_layout(shape, cfg: GPTVQConfig) -> VectorWeight:
    """A GPTVQ weight of ``cfg``'s layout (a frontier recipe's) with random codes and code books: the kernel reads
    the same bytes whatever they hold, and GPTVQ's k-means on the CPU would take minutes at these shapes."""
    rows, cols = shape
    bits, dim, book_dtype = cfg.bits, cfg.dim, cfg.codebook_dtype
    rpt = min(cfg.rows_per_table(cols), rows)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << (bits * dim), (rows, cols // dim), generator=g)
    spread = 40 if book_dtype == "int8" else 1  # int8 entries span the integers; the row scales undo it
    books = torch.randn(-(-rows // rpt), 1 << (bits * dim), dim, generator=g) * spread
    scale = (torch.rand(rows, generator=g) * 0.02 + 0.01) / spread
    return VectorWeight.from_codes(codes, books, scale, bits * dim, rpt, book_dtype)


def timed(fn, iters: int, copies: int) -> float:
    """Median device time of one ``fn(i)``: ``copies`` calls (one per weight copy) are captured in a CUDA
    graph and replayed, so the Python launch cost stays out of the number; without graph capture, the
    calls are timed back to back."""
    for i in range(copies):  # warm-up: compile, upload the buffers
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for i in range(copies):
                fn(i)
        run = graph.replay
    except Exception as error:  # noqa: BLE001 - fall back to plain launches, say so once
        print(f"graph capture failed ({error}); timing plain launches", file=sys.stderr)
        torch.cuda.synchronize()

        def run():
            for i in range(copies):
                fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for it in range(iters + 3):
        start.record()
        run()
        end.record()
        end.synchronize()
        if it >= 3:
            times.append(start.elapsed_time(end) / 1000 / copies)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """GB/s (bytes read + written) of a large device-to-device copy: what this GPU's memory really gives."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda i: dst.copy_(src), 20, 1)
    return 2 * src.numel() / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="e.g. 4096x4096,11008x4096")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="e.g. 1,4")
    ap.add_argument("--rows-per-block", default="", help="override tile:rows, e.g. 1:2,4:2 (kernels.ROWS_PER_BLOCK)")
    ap.add_argument("--gemv-max-rows", type=int, default=kernels.GEMV_MAX_ROWS,
                    help="batches above this decode W on the GPU and use cuBLAS (kernels.GEMV_MAX_ROWS)")
    ap.add_argument("--sparse-gemv-max-rows", type=int, default=kernels.SPARSE_GEMV_MAX_ROWS,
                    help="the same for sparse layouts (kernels.SPARSE_GEMV_MAX_ROWS)")
    a = ap.parse_args()
    kernels.GEMV_MAX_ROWS, kernels.SPARSE_GEMV_MAX_ROWS = a.gemv_max_rows, a.sparse_gemv_max_rows
    for item in filter(None, a.rows_per_block.split(",")):
        tile, rows = map(int, item.split(":"))
        kernels.ROWS_PER_BLOCK[tile] = rows
    if not (torch.cuda.is_available() and kernels.cupy_available()):
        sys.exit("bench/kernels.py needs an NVIDIA GPU and CuPy (pip install 'compress[cuda]')")
    copy_gbs = copy_bandwidth()
    rows = []
    for n, k in (map(int, shape.split("x")) for shape in a.shapes.split(",")):
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(a.copies)]
        first = make_formats(dense[0].float().cpu())  # distinct objects, so distinct device buffers
        fmts = [first] + [copy.deepcopy(first) for _ in range(a.copies - 1)]
        for batch in map(int, a.batches.split(",")):
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
            t_fp16 = timed(lambda i, x=x, dense=dense: x @ dense[i % a.copies].T, a.iters, a.copies)
            for name in fmts[0]:
                t = timed(lambda i, name=name, x=x, fmts=fmts: kernels.compressed_matmul(fmts[i % a.copies][name], x),
                          a.iters, a.copies)
                moved = fmts[0][name].nbytes() + 2 * batch * (k + n)
                gbs = moved / t / 1e9
                rows.append({"shape": f"{n}x{k}", "batch": batch, "format": name, "us": 1e6 * t,
                             "GB/s": gbs, "% peak": 100 * gbs / a.peak_gbs, "fp16 us": 1e6 * t_fp16,
                             "speed-up vs fp16": t_fp16 / t})
                print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{torch.cuda.get_device_name()}; peak bandwidth taken as {a.peak_gbs:.0f} GB/s; {a.copies} weight copies "
          f"cycled; median of {a.iters}; rows per block by tile {kernels.ROWS_PER_BLOCK}; batches over "
          f"{kernels.GEMV_MAX_ROWS} ({kernels.SPARSE_GEMV_MAX_ROWS} sparse): GPU decode + cuBLAS; a 256 MB "
          f"device-to-device copy moves {copy_gbs:.0f} GB/s (read + write)")
    common.print_table(["shape", "batch", "format", "us", "GB/s", "% peak", "fp16 us", "speed-up vs fp16"], rows)


if __name__ == "__main__":
    main()
