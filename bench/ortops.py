"""Our onnxruntime operators (``compress/ortops``) beside onnxruntime's own kernels, one token at a time: a chain of
40 layers alternating 576 x 1536 and 1536 x 576 (SmolLM2-135M's MLP shapes) on random weights (speed only), each
kernel in its own process (onnxruntime's spinning threads of two sessions in one process slow each other).

    python bench/ortops.py [--threads 2] [--tokens 1] [--runs 40] [--kernels native|avx2] [--layers 40]

``--layers``: the chain's length; 40 layers' weights fit in a large L3 cache, a whole model's do not (SmolLM2-135M
decodes from memory): 200 or more measure the kernels reading their weights from memory.

``--kernels avx2``: our operators' AVX2 build (the library holds it beside the AVX-512 one, which a CPU that has
AVX-512 gets by default).

Prints microseconds per layer (median over the runs) and stores the rows with the commit in
``bench/results/ortops.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ortops.jsonl"
# bench/onnx.py would shadow the onnx package: keep this folder off the import path (common.py is loaded by path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
LAYERS = 40
# name -> (operator, bits, vector length (GridMatMul: 1 a code book, 0 per-group offsets), group size (LutMatMul: rows
# per table, 0 for 1))
KERNELS = {
    "MatMulNBits 4-bit block 64 (onnxruntime)": ("nbits", 4, 1, 64),
    "MatMul float32 (onnxruntime)": ("fp32", 0, 1, 0),
    "LutMatMul 4-bit palette per channel": ("lut", 4, 1, 0),
    "LutMatMul 3-bit palette per channel": ("lut", 3, 1, 0),
    "LutMatMul 2-bit palette per channel": ("lut", 2, 1, 0),
    "LutMatMul 2-bit code book of 2-vectors": ("lut", 4, 2, 0),
    "LutMatMul 2-bit code book of 4-vectors": ("lut", 8, 4, 0),
    "LutMatMul 3-bit code book of 2-vectors, a table per 64 rows (GPTVQ 3-bit)": ("lut", 6, 2, 64),
    "LutMatMul 3-bit int8 code book of 2-vectors, a table per 16 rows (GPTVQ 3-bit, int8 books)": ("lut", 6, 2, 16),
    "LutMatMul 4-bit code book of 2-vectors, a table per 64 rows (GPTVQ 4-bit)": ("lut", 8, 2, 64),
    "LutMatMul 2-bit code book of 4-vectors, a table per 64 rows (w2-frontier)": ("lut", 8, 4, 64),
    "LutMatMul 2-bit int8 code book of 4-vectors, a table per 32 rows (w2-frontier, int8 books)": ("lut", 8, 4, 32),
    "HalfMatMul float16": ("half", 0, 1, 0),
    "GridMatMul NF4 g64 (code book, float32 group scales)": ("grid", 4, 1, 64),
    "GridMatMul 4-bit g32 with offsets (Q4_K's layout)": ("grid", 4, 0, 32),
    "GridMatMul NF3 g64": ("grid", 3, 1, 64),
    "GridMatMul 3-bit g16 with offsets (Q3_K's layout)": ("grid", 3, 0, 16),
    "GridMatMul 2-bit g16 with offsets (Q2_K's layout)": ("grid", 2, 0, 16),
    "MatMulNBits 4-bit block 32, int8 activations (onnxruntime)": ("nbits8", 4, 1, 32),
    "GridMatMul 4-bit g32, int8 activations": ("grid8", 4, 1, 32),
    "MatMulNBits 2-bit block 32, int8 activations (onnxruntime)": ("nbits8", 2, 1, 32),
    "GridMatMul 2-bit g32, int8 activations": ("grid8", 2, 1, 32),
    "MatMulNBits 2-bit block 32 with zero points, int8 activations (onnxruntime)": ("nbits8", 2, 0, 32),
    "GridMatMul 2-bit g32 with zero points, int8 activations": ("grid8", 2, 0, 32),
    "MatMulNBits 4-bit block 128 with zero points, int8 activations (onnxruntime)": ("nbits8", 4, 0, 128),
    "GridMatMul 4-bit g128 with zero points, int8 activations": ("grid8", 4, 0, 128),
    "GridMatMul 3-bit g128 with zero points, int8 activations": ("grid8", 3, 0, 128),
    "MatMulNBits 4-bit block 64, int8 activations (onnxruntime)": ("nbits8", 4, 1, 64),
    "GridMatMul 4-bit g64, int8 activations": ("grid8", 4, 1, 64),
    "GridMatMul 3-bit g64, int8 activations": ("grid8", 3, 1, 64),
}
INT8_TABLES = {name for name in KERNELS if "int8 code book" in name}  # int8 entries times a float16 row scale


def _middle_zeros(rng, bits: int, rows: int, groups: int):
    """Zero points packed at ``bits`` ``[rows, ceil(groups * bits / 8)]``, around the middle of the grid, as a
    weight's zero points fall."""
    import torch

    from compress.packing import pack_rows

    return pack_rows(torch.tensor(rng.integers((1 << bits) // 4, 3 * (1 << bits) // 4 + 1, (rows, groups))),
                     bits).numpy()


def _session(kind: str, bits: int, dim: int, group: int, threads: int, layers: int = LAYERS, int8: bool = False):
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from compress import ortops
    from compress.packing import pack_rows

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        k, n = (576, 1536) if i % 2 == 0 else (1536, 576)
        y = f"h{i}"
        gain = 1 / np.sqrt(k)  # weights of standard deviation 1/sqrt(k): the activations keep their size down the
        # chain (a chain that shrinks them reaches denormal floats, which every kernel computes many times slower)
        if kind == "lut":
            codes = rng.integers(0, 1 << bits, (n, k // dim))
            per_table = group or 1
            shape = (-(-n // per_table), 1 << bits, dim)
            table = rng.integers(-127, 128, shape).astype(np.int8) if int8 else \
                (rng.standard_normal(shape) * gain).astype(np.float16)
            inits += [numpy_helper.from_array(pack_rows(torch.tensor(codes), bits).numpy(), f"c{i}"),
                      numpy_helper.from_array(table, f"t{i}")]
            inputs = [x, f"c{i}", f"t{i}"]
            if int8:  # entries of standard deviation about 73: the row scales bring them to the gain
                inits.append(numpy_helper.from_array(np.full(n, gain / 73, np.float16), f"s{i}"))
                inputs.append(f"s{i}")
            nodes.append(helper.make_node("LutMatMul", inputs, [y], domain=ortops.DOMAIN, K=k, N=n,
                                          bits=bits, dim=dim, rows_per_table=per_table))
        elif kind == "grid":  # dim 1: an NF code book; dim 0: codes, scales and offsets
            codes = rng.integers(0, 1 << bits, (n, k))
            spread = 1.0 if dim else (1 << bits) / np.sqrt(12)  # NF code book ~ N(0, 1); codes - 2^(bits-1)
            scales = ((0.5 + rng.random((n, k // group))) * gain / spread).astype(np.float32)
            inits += [numpy_helper.from_array(pack_rows(torch.tensor(codes), bits).numpy(), f"c{i}"),
                      numpy_helper.from_array(scales, f"s{i}")]
            extra = [f"o{i}"] if not dim else ["", f"t{i}"]
            book = np.sort(rng.standard_normal(1 << bits))
            inits.append(numpy_helper.from_array(-scales * ((1 << (bits - 1)) - 0.5), f"o{i}") if not dim else
                         numpy_helper.from_array((book - book.mean()).astype(np.float32), f"t{i}"))
            nodes.append(helper.make_node("GridMatMul", [x, f"c{i}", f"s{i}", *extra], [y], domain=ortops.DOMAIN,
                                          K=k, N=n, bits=bits, group_size=group))
        elif kind == "grid8":  # an integer grid, int8 activations: symmetric (dim 1), or zero points (dim 0)
            codes = rng.integers(0, 1 << bits, (n, k))
            groups = -(-k // group)  # (576 inputs in groups of 128: a last group of 64)
            scales = ((0.5 + rng.random((n, groups))) * gain / ((1 << bits) / np.sqrt(12))).astype(np.float32)
            inits += [numpy_helper.from_array(pack_rows(torch.tensor(codes), bits).numpy(), f"c{i}"),
                      numpy_helper.from_array(scales, f"s{i}")]
            zeros = [] if dim else ["", "", f"z{i}"]
            if zeros:
                inits.append(numpy_helper.from_array(_middle_zeros(rng, bits, n, groups), f"z{i}"))
            nodes.append(helper.make_node("GridMatMul", [x, f"c{i}", f"s{i}", *zeros], [y], domain=ortops.DOMAIN,
                                          K=k, N=n, bits=bits, group_size=group,
                                          zero=0.0 if zeros else float(1 << (bits - 1)), accuracy_level=4))
        elif kind == "half":
            inits.append(numpy_helper.from_array((rng.standard_normal((n, k)) * gain).astype(np.float16), f"w{i}"))
            nodes.append(helper.make_node("HalfMatMul", [x, f"w{i}"], [y], domain=ortops.DOMAIN, K=k, N=n))
        elif kind == "fp32":
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * gain).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        else:  # nbits (float activations), nbits8 (int8): codes around the default zero point 2^(bits-1)
            block, blocks = group, -(-k // group)  # (the last block padded where it does not divide k)
            codes = rng.integers(0, 1 << bits, (n, blocks * block))
            packed = pack_rows(torch.tensor(codes), bits).numpy().reshape(n, blocks, block * bits // 8)
            scales = ((0.5 + rng.random(n * blocks)) * gain / ((1 << bits) / np.sqrt(12))).astype(np.float32)
            inits += [numpy_helper.from_array(packed, f"q{i}"), numpy_helper.from_array(scales, f"s{i}")]
            zeros = [] if dim else [f"z{i}"]
            if zeros:
                inits.append(numpy_helper.from_array(_middle_zeros(rng, bits, n, blocks).reshape(-1), f"z{i}"))
            nodes.append(helper.make_node("MatMulNBits", [x, f"q{i}", f"s{i}", *zeros], [y], domain="com.microsoft",
                                          K=k, N=n,
                                          bits=bits, block_size=block, accuracy_level=4 if kind == "nbits8" else 0))
        x = y
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 576])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, 576])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ortops.DOMAIN, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(ortops.build()))
    return ort.InferenceSession(model.SerializeToString(), options)


def time_kernel(name: str, threads: int, tokens: int, runs: int, layers: int) -> float:
    """Median microseconds per layer of the chain for ``tokens`` tokens."""
    import numpy as np

    sess = _session(*KERNELS[name], threads, layers, int8=name in INT8_TABLES)
    x = np.random.default_rng(1).standard_normal((tokens, 576)).astype(np.float32)
    sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return 1e6 * sorted(times)[len(times) // 2] / layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--layers", type=int, default=LAYERS, help="layers in the chain (200: more than an L3 cache holds)")
    ap.add_argument("--only", default=None, help="the kernels whose names start with this ('|' between several)")
    ap.add_argument("--kernels", choices=["native", "avx2"], default="native",
                    help="which build of our kernels the sessions load (avx2: COMPRESS_ORTOPS_ARCH=avx2)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(time_kernel(a.child, a.threads, a.tokens, a.runs, a.layers)))
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", HERE / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    commit = common.current_commit()
    env = {**os.environ, **({"COMPRESS_ORTOPS_ARCH": "avx2"} if a.kernels == "avx2" else {})}
    suffix = ("" if a.kernels == "native" else f", {a.kernels} kernels") + ("" if a.layers == LAYERS
                                                                             else f", {a.layers} layers")
    names = [n for n in KERNELS if not a.only or n.startswith(tuple(a.only.split("|")))]
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(a.threads), "--tokens",
                              str(a.tokens), "--runs", str(a.runs), "--layers", str(a.layers)], capture_output=True,
                             text=True, check=True, env=env)
        rows.append({"kernel": name, "us / layer": json.loads(out.stdout.strip().splitlines()[-1])})
        common.append_result(RESULTS, f"{name}, {a.tokens} token(s){suffix}", {
            **rows[-1], "threads": a.threads, "tokens": a.tokens, "kernels": a.kernels, "layers": a.layers,
            "commit": commit, "measured": time.strftime("%Y-%m-%d %H:%M")})
    base = next((r for r in rows if r["kernel"].startswith("MatMulNBits")), rows[0])["us / layer"]
    for r in rows:
        r["vs MatMulNBits"] = r["us / layer"] / base
    print(f"{a.layers} layers 576 x 1536 / 1536 x 576, random weights, {a.tokens} token(s), {a.threads} threads, "
          f"{a.kernels} kernels, "
          f"median of {a.runs} runs, at {commit}")
    common.print_table(["kernel", "us / layer", "vs MatMulNBits"], rows)


if __name__ == "__main__":
    main()
