"""Peak RSS of one GPTQ layer solve (4-bit g64, act-order, clip search, refit) at a given shape: random weights and
a random positive-definite Hessian (memory and time only; the codes mean nothing).

    python bench/layer_solve_memory.py 4096 14336    # an 8B model's down projection
    python bench/layer_solve_memory.py 28672 4096    # its gate and up projections, solved stacked

Prints the RSS before the solve, the peak, and the seconds; run each shape in a process of its own.
"""

import resource
import sys
import time

import torch

from compress.hessian import output_error
from compress.passes.gptq import gptq_quantize
from compress.quant import QuantSpec


def main():
    rows, cols = map(int, sys.argv[1:3])
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    x = torch.randn(2048, cols)
    h = x.t() @ x / 2048
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t = time.perf_counter()
    fmt = gptq_quantize(w, h, QuantSpec(4, 64, clip_search=True), 128, 0.01, True, refit=True)
    output_error(w, fmt.dequantize(), h)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"| {rows} x {cols} | {before:.2f} GB | {peak:.2f} GB | +{peak - before:.2f} GB | "
          f"{time.perf_counter() - t:.0f} s |")


if __name__ == "__main__":
    main()
