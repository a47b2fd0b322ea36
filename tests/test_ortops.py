"""Our onnxruntime operators (``compress/ortops``) against numpy on every path of their kernels: widths 1-8,
palettes and code books, float16 and int8 tables, with and without row scales, a few tokens (row by row, the
4-bit palette's nibble-pair loop) and a prompt (16-row tiles), widths that leave tails at every step size.
Random codes and tables: these check arithmetic, not quality."""

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress import ortops
from compress.packing import pack_rows


@pytest.fixture(autouse=True, params=["native", "avx2"])
def kernels(request, monkeypatch):
    """Every test against both builds of the kernels the library holds: the one this CPU picks (AVX-512 where it
    has it) and the AVX2 one (chosen when a session loads its kernels)."""
    if request.param == "avx2":
        monkeypatch.setenv("COMPRESS_ORTOPS_ARCH", "avx2")
    return request.param


def _run(library, node, inits, k, n, x):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ortops.DOMAIN, 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


CASES = [  # (in, out, bits, dim, rows_per_table, int8 table, row scale)
    (576, 1536, 4, 1, 1, False, False), (600, 130, 4, 1, 1, False, True), (592, 70, 4, 1, 3, True, True),
    (580, 97, 3, 1, 1, False, False), (40, 33, 1, 1, 1, False, False), (72, 50, 2, 1, 50, False, True),
    (96, 40, 5, 1, 7, False, False), (104, 40, 6, 1, 1, True, True), (64, 45, 8, 1, 1, False, False),
    (128, 40, 8, 4, 40, False, True), (132, 40, 6, 2, 16, False, True), (96, 33, 8, 8, 1, False, True),
    (90, 20, 3, 3, 4, False, False), (576, 70, 4, 2, 8, False, True), (192, 33, 6, 2, 33, False, False),
    (212, 37, 8, 2, 5, True, True), (136, 30, 8, 4, 7, False, False), (576, 41, 6, 2, 29, False, True),
    (1548, 9, 6, 2, 4, False, False), (576, 21, 8, 2, 64, False, True), (584, 9, 8, 2, 2, False, False),
    (1536, 7, 8, 4, 3, False, False), (580, 11, 8, 4, 5, False, True),
    (576, 41, 6, 2, 15, True, True), (1548, 9, 6, 2, 6, True, True), (132, 40, 4, 2, 16, True, True),
    (576, 23, 8, 4, 6, True, True)]  # int8 books


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}bit-dim{c[3]}" + "-int8" * c[5])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 37])
@pytest.mark.parametrize("mapped", [False, True], ids=["rows_per_table", "row_tables"])
def test_lut_matmul_is_the_decoded_product(ortops_library, case, tokens, mapped):
    """Row n reads table n // rows_per_table, or the table ``row_tables`` names (packed siblings): any order."""
    k, n, bits, dim, per, int8, scaled = case
    rng = np.random.default_rng(k + n + bits)
    tables = -(-n // per) + 2 * mapped
    codes = rng.integers(0, 1 << bits, (n, k // dim))
    table = (rng.integers(-127, 128, (tables, 1 << bits, dim)).astype(np.int8) if int8
             else rng.standard_normal((tables, 1 << bits, dim)).astype(np.float16))
    scale = (rng.random(n) + 0.5).astype(np.float16)
    row_tables = rng.permutation(np.arange(n) % tables).astype(np.int32) if mapped else np.arange(n) // per
    inits = [numpy_helper.from_array(pack_rows(torch.tensor(codes), bits).numpy(), "codes"),
             numpy_helper.from_array(table, "table")] + ([numpy_helper.from_array(scale, "scale")] if scaled else [])
    inputs = ["x", "codes", "table"] + (["scale"] if scaled else [])
    if mapped:
        inputs += [""] * (4 - len(inputs)) + ["row_tables"]
        inits.append(numpy_helper.from_array(row_tables, "row_tables"))
    node = helper.make_node("LutMatMul", inputs, ["y"], domain=ortops.DOMAIN, K=k, N=n, bits=bits, dim=dim,
                            rows_per_table=per)
    w = table.astype(np.float32)[row_tables[:, None], codes].reshape(n, k)
    if scaled:
        w *= scale.astype(np.float32)[:, None]
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    got, want = _run(ortops_library, node, inits, k, n, x), x @ w.T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 49), (37, 20), (1536, 16)])
@pytest.mark.parametrize("tokens", [1, 4, 9])
def test_half_matmul_is_the_16_bit_product(ortops_library, dtype, shape, tokens):
    k, n = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(n)).numpy()
    raw = w.view(torch.int16).numpy().tobytes()
    init = helper.make_tensor("w", TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.BFLOAT16, [n, k],
                              raw, raw=True)
    node = helper.make_node("HalfMatMul", ["x", "w"], ["y"], domain=ortops.DOMAIN, K=k, N=n)
    got, want = _run(ortops_library, node, [init], k, n, x), x @ w.float().numpy().T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("width, tokens", [(1536, 1), (1536, 256), (13, 3), (8, 1)])
def test_silu_gate_is_the_gated_activation(ortops_library, width, tokens):
    """SiluGate of packed [gate | up] against float64 numpy, beside onnxruntime's own Split, Sigmoid and Mul: as
    exact as they are (its e^x within a few float32 ulps), saturating cleanly at large |gate|; a prompt's rows
    spread over threads."""
    rng = np.random.default_rng(width + tokens)
    x = (8 * rng.standard_normal((tokens, 2 * width))).astype(np.float32)
    x[0, :3] = [-100.0, 100.0, 0.0]
    node = helper.make_node("SiluGate", ["x"], ["y"], domain=ortops.DOMAIN)
    got = _run(ortops_library, node, [], 2 * width, width, x)
    gate, up = x[:, :width].astype(np.float64), x[:, width:].astype(np.float64)
    want = gate / (1 + np.exp(-gate)) * up
    assert got.shape == (tokens, width) and np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want) + 1e-20)


@pytest.mark.parametrize("row_tables, error", [(np.array([0, 1, 2], np.int32), "table smaller"),
                                               (np.array([0, -1, 1], np.int32), "negative row table"),
                                               (np.array([0, 1], np.int32), "fewer than N"),
                                               (np.array([0, 1, 1], np.int64), "int64.*row_tables")])
def test_lut_matmul_refuses_row_tables_outside_its_tables(ortops_library, row_tables, error):
    inits = [numpy_helper.from_array(np.zeros((3, 4), np.uint8), "codes"),
             numpy_helper.from_array(np.zeros((2, 16, 1), np.float16), "table"),
             numpy_helper.from_array(row_tables, "row_tables")]
    node = helper.make_node("LutMatMul", ["x", "codes", "table", "", "row_tables"], ["y"], domain=ortops.DOMAIN,
                            K=8, N=3, bits=4, dim=1, rows_per_table=2)
    with pytest.raises(Exception, match=error):
        _run(ortops_library, node, inits, 8, 3, np.ones((1, 8), np.float32))


def test_silu_gate_refuses_an_odd_width(ortops_library):
    node = helper.make_node("SiluGate", ["x"], ["y"], domain=ortops.DOMAIN)
    with pytest.raises(Exception, match="odd"):
        _run(ortops_library, node, [], 7, 3, np.zeros((1, 7), np.float32))


def _outlier_add(library, y0, x, counts, columns, corrections):
    k, n = x.shape[-1], y0.shape[-1]
    graph = helper.make_graph(
        [helper.make_node("OutlierAdd", ["y0", "x", "counts", "columns", "corrections"], ["y"], domain=ortops.DOMAIN)],
        "g", [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [None, n]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(counts, "counts"), numpy_helper.from_array(columns, "columns"),
         numpy_helper.from_array(corrections, "corrections")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ortops.DOMAIN, 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"y0": y0, "x": x})[0]


@pytest.mark.parametrize("shape, count_type, column_type", [((40, 33), np.uint8, np.uint8),
                                                            ((576, 1536), np.uint8, np.uint16),
                                                            ((70000, 9), np.uint16, np.int32)], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 300])
def test_outlier_add_is_the_sparse_product(ortops_library, shape, count_type, column_type, tokens):
    """y0 + x @ S.T for S in compressed sparse rows (counts, columns as a checkpoint stores them), rows with no
    outlier included; a prompt's tokens spread over threads."""
    k, n = shape
    rng = np.random.default_rng(k + n + tokens)
    mask = rng.random((n, k)) < 0.01
    mask[0] = False
    rows, columns = mask.nonzero()
    corrections = rng.standard_normal(rows.size).astype(np.float32)
    s = np.zeros((n, k), np.float32)
    s[rows, columns] = corrections
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    y0 = rng.standard_normal((tokens, n)).astype(np.float32)
    got = _outlier_add(ortops_library, y0, x, mask.sum(1).astype(count_type), columns.astype(column_type), corrections)
    want = y0 + x.astype(np.float64) @ s.T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_outlier_add_refuses_rows_that_do_not_fit(ortops_library):
    """A damaged file (counts that do not add up to the columns, a column outside x, an index type it does not
    read) fails with a message, never reads past x."""
    y0, x = np.zeros((1, 3), np.float32), np.zeros((1, 8), np.float32)
    one = np.ones(1, np.float32)
    with pytest.raises(Exception, match="add up"):
        _outlier_add(ortops_library, y0, x, np.array([1, 1, 0], np.uint8), np.array([2], np.uint8), one)
    with pytest.raises(Exception, match="outside x"):
        _outlier_add(ortops_library, y0, x, np.array([1, 0, 0], np.uint8), np.array([8], np.uint8), one)
    with pytest.raises(Exception, match="add up"):  # a negative count would send a row before the first column
        _outlier_add(ortops_library, y0, x, np.array([-1, 2, 0], np.int32), np.array([2], np.uint8), one)
    with pytest.raises(Exception, match="outside x"):
        _outlier_add(ortops_library, y0, x, np.array([1, 0, 0], np.uint8), np.array([-3], np.int32), one)
    with pytest.raises(Exception, match="uint8, uint16 or int32"):
        _outlier_add(ortops_library, y0, x, np.array([1, 0, 0], np.int64), np.array([2], np.uint8), one)


def test_bad_attributes_are_refused_when_the_session_loads(ortops_library):
    codes = numpy_helper.from_array(np.zeros((4, 5), np.uint8), "codes")
    table = numpy_helper.from_array(np.zeros((4, 16, 1), np.float16), "table")
    node = helper.make_node("LutMatMul", ["x", "codes", "table"], ["y"], domain=ortops.DOMAIN, K=10, N=4, bits=9,
                            dim=1, rows_per_table=1)
    with pytest.raises(Exception, match="bits 1..8"):
        _run(ortops_library, node, [codes, table], 10, 4, np.zeros((1, 10), np.float32))


def test_tensors_smaller_than_the_attributes_say_are_refused(ortops_library):
    """A damaged file whose codes or table are shorter than its attributes imply fails with a message, never reads
    past them."""
    codes = numpy_helper.from_array(np.zeros((4, 4), np.uint8), "codes")  # 4 rows of 10 4-bit codes need 5 bytes
    table = numpy_helper.from_array(np.zeros((4, 16, 1), np.float16), "table")
    node = helper.make_node("LutMatMul", ["x", "codes", "table"], ["y"], domain=ortops.DOMAIN, K=10, N=4, bits=4,
                            dim=1, rows_per_table=1)
    with pytest.raises(Exception, match="indices smaller"):
        _run(ortops_library, node, [codes, table], 10, 4, np.zeros((1, 10), np.float32))
    node = helper.make_node("HalfMatMul", ["x", "w"], ["y"], domain=ortops.DOMAIN, K=10, N=4)
    with pytest.raises(Exception, match="weight smaller"):
        _run(ortops_library, node, [numpy_helper.from_array(np.zeros((3, 10), np.float16), "w")], 10, 4,
             np.zeros((1, 10), np.float32))


@pytest.mark.parametrize("pattern", [None, (2, 4), (1, 4), (4, 8), (1, 2)], ids=str)
@pytest.mark.parametrize("shape", [(576, 40), (100, 33)])
@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_sparse_matmul_is_the_pruned_product(ortops_library, pattern, shape, tokens):
    """Kept values at the positions of their bitmap (N:M patterns too), zeros elsewhere."""
    from compress.formats import DenseWeight, SparseWeight, compact

    k, n = shape
    if pattern and k % pattern[1]:
        pytest.skip("N:M needs whole groups")
    gen = torch.Generator().manual_seed(k + n)
    w, mask = torch.randn(n, k, generator=gen), _keep_mask(n, k, pattern, gen)
    fmt = SparseWeight(mask, DenseWeight(compact(w, mask), torch.float16), None if pattern is None else
                       f"{pattern[0]}:{pattern[1]}")
    positions = pack_rows(mask.to(torch.uint8), 1).numpy()
    values = fmt.values.weight.view(torch.int16).numpy().tobytes()
    inits = [numpy_helper.from_array(positions, "positions"),
             helper.make_tensor("values", TensorProto.FLOAT16, [n, fmt.kept_per_row], values, raw=True)]
    node = helper.make_node("SparseMatMul", ["x", "positions", "values"], ["y"], domain=ortops.DOMAIN, K=k, N=n,
                            kept=fmt.kept_per_row)
    x = torch.randn(tokens, k, generator=gen).numpy()
    got, want = _run(ortops_library, node, inits, k, n, x), x @ fmt.dequantize().numpy().T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _keep_mask(n: int, k: int, pattern, gen) -> torch.Tensor:
    if pattern is None:  # every row keeps the same count, anywhere
        keep = torch.rand(n, k, generator=gen).argsort(1)[:, : k * 3 // 8]
        return torch.zeros(n, k, dtype=torch.bool).scatter_(1, keep, True)
    keep_n, m = pattern
    top = torch.rand(n, k // m, m, generator=gen).argsort(-1)[..., :keep_n]
    return torch.zeros(n, k // m, m, dtype=torch.bool).scatter_(2, top, True).reshape(n, k)


@pytest.mark.parametrize("spec", [(4, 64, False), (3, 12, True), (8, 32, False), (2, 16, False), (5, 7, False)],
                         ids=lambda s: f"{s[0]}bit-g{s[1]}{'-sym' if s[2] else ''}")
@pytest.mark.parametrize("shape", [(576, 40), (100, 33)])
@pytest.mark.parametrize("tokens", [1, 9])
def test_sparse_matmul_reads_kept_values_on_an_integer_grid(ortops_library, spec, shape, tokens):
    """Kept values quantized in groups of kept values (codes, float16 scales, packed zero points as the checkpoint
    stores them; symmetric: none), decoded while the row is expanded; group sizes that split the 8-code steps."""
    from compress.formats import SparseWeight, compact, quantize_rtn
    from compress.quant import QuantSpec

    k, n = shape
    gen = torch.Generator().manual_seed(k + n + spec[0])
    w, mask = torch.randn(n, k, generator=gen), _keep_mask(n, k, None, gen)
    fmt = SparseWeight(mask, quantize_rtn(compact(w, mask), QuantSpec(*spec)))
    stored = fmt.values.tensors()
    names = ["codes", "scales"] + (["zeros"] if "zeros" in stored else [])
    inits = [numpy_helper.from_array(pack_rows(mask.to(torch.uint8), 1).numpy(), "positions")] + [
        numpy_helper.from_array(stored[name].numpy(), name) for name in names]
    node = helper.make_node("SparseMatMul", ["x", "positions", *names], ["y"], domain=ortops.DOMAIN, K=k, N=n,
                            kept=fmt.kept_per_row, bits=spec[0], group_size=spec[1])
    x = torch.randn(tokens, k, generator=gen).numpy()
    got, want = _run(ortops_library, node, inits, k, n, x), x @ fmt.dequantize().numpy().T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("grid", ["gguf-q4_k", "gguf-q3_k", "gguf-q6_k", "gguf-q2_k", "gguf-q5_k", "nf3", "nf4", "nf5",
                                  "nf3-g48", "nf3-g40", "nf2-g48"])
@pytest.mark.parametrize("tokens", [1, 2, 4, 23])
def test_grid_matmul_is_the_decoded_product(ortops_library, grid, tokens):
    """llama.cpp's k-quants (scales and minima multiplied out) and NormalFloat grids (their code book as the table) in
    our grid operator, through the exporter's lowering, against the format's own decode; 2- and 3-bit groups of 48
    over 560 inputs leave a partial group and a 16-code tail after the 32-code steps, groups of 40 take the 8-code
    loop."""
    from compress.export.graph import FLOAT, Graph
    from compress.export.weights import WeightLowering
    from compress.formats import quantize_rtn
    from compress.formats.kquant import spec_of
    from compress.quant import QuantSpec

    name, _, group = grid.partition("-g")
    k = 560 if group else 512
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(tokens))
    spec = spec_of(grid) if grid.startswith("gguf") else QuantSpec(int(name[2:]), int(group or 64), grid="nf")
    fmt = quantize_rtn(w, spec)
    g = Graph()
    low = WeightLowering(g, "fast")
    g.output(low.linear(g.input("x", FLOAT, [None, k]), fmt, None, "layer"), "y", FLOAT, [None, 40])
    assert low.layers["layer"].lowering.startswith("GridMatMul")
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ortops_library))
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(7)).numpy()
    got = ort.InferenceSession(g.model(low.opset).SerializeToString(), options).run(None, {"x": x})[0]
    want = x @ fmt.dequantize().numpy().T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# (4, 64, 100) and (3, 64, 120): AVX-512's 32-codes-a-step loops end inside the last group; (b, 128, 576): they end
# with the last, partial group (64 of 128), done
@pytest.mark.parametrize("bits, group, k", [(2, 32, 576), (2, 48, 560), (3, 64, 576), (4, 32, 100), (4, 64, 100),
                                            (3, 64, 120), (2, 128, 576), (3, 128, 576), (4, 128, 576)], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 23])
def test_grid_matmul_reads_integer_zero_points_as_stored(ortops_library, bits, group, k, tokens):
    """An asymmetric integer grid with its zero points packed at the grid's width (as MatMulNBits and the
    checkpoint store them): W = (code - zero) * scale, per group, on every path (wide steps, tails, tiles)."""
    n, groups = 40, -(-k // group)
    rng = np.random.default_rng(bits + group + tokens)
    codes = rng.integers(0, 1 << bits, (n, k))
    zeros = rng.integers(0, 1 << bits, (n, groups))
    scales = (rng.random((n, groups)) + 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(pack_rows(torch.tensor(codes), bits).numpy(), "codes"),
             numpy_helper.from_array(scales, "scales"),
             numpy_helper.from_array(pack_rows(torch.tensor(zeros), bits).numpy(), "zeros")]
    node = helper.make_node("GridMatMul", ["x", "codes", "scales", "", "", "zeros"], ["y"], domain=ortops.DOMAIN, K=k,
                            N=n, bits=bits, group_size=group)
    per_input = np.arange(k) // group
    w = (codes - zeros[:, per_input]) * scales[:, per_input]
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    got, want = _run(ortops_library, node, inits, k, n, x), x @ w.T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()



def _int8_product(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """x @ w.T with each token quantized symmetrically to int8 per group of inputs (scale max |x| / 127), as
    GridMatMul's int8 activations (and MatMulNBits' accuracy_level 4) define it."""
    xq = np.zeros(x.shape)
    for start in range(0, x.shape[1], group):
        part = x[:, start:start + group].astype(np.float64)
        most = np.abs(part).max(-1, keepdims=True)
        xq[:, start:start + group] = np.rint(part * (127 / np.where(most > 0, most, 1))) * (most / 127)
    return xq @ w.T


# AVX-512 takes 64 codes a step where it can: (4, 64, 576) 9 groups of two 32-code chunks, (4, 128, 576) a last group
# of 64, (4, 576, 576) one group a row; the 256-bit loop where it cannot: (2, 32, 96) an odd count of 32-code groups,
# (4, 128, 608) a last group of 96, (2, 64, 96) one of 32; 3-bit codes (12 bytes a 32, crossing byte boundaries)
# always the 256-bit loop, the last row's last 12 bytes at the end of the tensor
@pytest.mark.parametrize("bits, group, k", [(4, 32, 576), (4, 64, 576), (4, 256, 1536), (2, 32, 1536), (2, 32, 96),
                                            (2, 128, 640), (4, 32, 96), (4, 128, 576), (4, 576, 576), (4, 128, 608),
                                            (2, 64, 96), (3, 32, 576), (3, 64, 96), (3, 128, 608), (3, 576, 576),
                                            (3, 128, 1536)], ids=str)
@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero-points"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 9])
def test_grid_matmul_with_int8_activations_is_the_int8_product(ortops_library, bits, group, k, zero_points, tokens):
    """``accuracy_level`` 4: a decode step's tokens (up to 4) quantized to int8 per group and multiplied with the
    2-, 3- or 4-bit codes as stored, exactly the int8 product; a prompt (9 tokens) keeps float activations."""
    n, groups = 40, -(-k // group)
    rng = np.random.default_rng(bits + group + k + tokens)
    codes = rng.integers(0, 1 << bits, (n, k))
    zeros = rng.integers(0, 1 << bits, (n, groups)) if zero_points else np.full((n, groups), 1 << (bits - 1))
    scales = (rng.random((n, groups)) + 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(pack_rows(torch.tensor(codes), bits).numpy(), "codes"),
             numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "codes", "scales"]
    if zero_points:
        inits.append(numpy_helper.from_array(pack_rows(torch.tensor(zeros), bits).numpy(), "zeros"))
        inputs += ["", "", "zeros"]
    node = helper.make_node("GridMatMul", inputs, ["y"], domain=ortops.DOMAIN, K=k, N=n, bits=bits, group_size=group,
                            zero=0.0 if zero_points else float(1 << (bits - 1)), accuracy_level=4)
    per_input = np.arange(k) // group
    w = (codes - zeros[:, per_input]) * scales[:, per_input]
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    x[0, :group if groups > 1 else 0] = 0.0  # a group of zeros: scale 0, no division by it
    got = _run(ortops_library, node, inits, k, n, x)
    want = _int8_product(x, w, group) if tokens <= 4 else x @ w.T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    if tokens <= 4:  # and int8 is not float: the rounding shows
        assert np.abs(got - x @ w.T).max() > 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("attrs, message", [
    (dict(bits=5, group_size=32), "2-, 3- or 4-bit"), (dict(bits=4, group_size=48), "multiples of 32"),
    (dict(bits=4, group_size=32, K=1528), "multiples of 32"),
    (dict(bits=4, group_size=64, accuracy_level=1), "0 .float"),
])
def test_grid_matmul_refuses_int8_activations_it_cannot_run(ortops_library, attrs, message):
    attrs = dict(attrs)  # (the parameters are shared by both kernel builds' runs)
    k = attrs.pop("K", 1536)
    inits = [numpy_helper.from_array(np.zeros((4, k * attrs["bits"] // 8), np.uint8), "codes"),
             numpy_helper.from_array(np.ones((4, k // 32), np.float32), "scales")]
    node = helper.make_node("GridMatMul", ["x", "codes", "scales"], ["y"], domain=ortops.DOMAIN, K=k, N=4,
                            **{"accuracy_level": 4, **attrs})
    with pytest.raises(Exception, match=message):
        _run(ortops_library, node, inits, k, 4, np.zeros((1, k), np.float32))


def test_an_export_rebuilds_a_library_older_than_its_sources(monkeypatch, tmp_path):
    """A checkout that changed a kernel: the exporter builds the library again instead of decoding in the graph;
    where that build fails, or the library was never built, it gets None (and decodes in the graph)."""
    library, source = tmp_path / "lib.so", tmp_path / "decode.c"
    library.write_bytes(b"old")
    source.write_text("new")
    os.utime(library, (1, 1))
    monkeypatch.setattr(ortops, "LIBRARY", library)
    monkeypatch.setattr(ortops, "SOURCES", [source])
    builds = []
    monkeypatch.setattr(ortops, "build", lambda force=False: builds.append(force) or library)
    assert ortops.library() is None
    assert ortops.current() == library and builds == [False]

    def no_compiler(force=False):
        raise ortops.BuildError("no C compiler")

    monkeypatch.setattr(ortops, "build", no_compiler)
    assert ortops.current() is None
    library.unlink()
    monkeypatch.setattr(ortops, "build", lambda force=False: builds.append(force) or library)
    assert ortops.current() is None and builds == [False]


def test_without_the_library_a_fast_export_decodes_in_the_graph_and_counts_it(monkeypatch):
    """No compiler or network at set-up: look-up, pruned and NormalFloat layers fall back to the in-graph decode
    (counted, so the exporter can say so; NF4 to onnxruntime's bitsandbytes kernel), 16-bit dense layers to a float32
    MatMul; nothing refers to our operators."""
    from compress.export.graph import FLOAT, Graph
    from compress.export.weights import WeightLowering
    from compress.formats import DenseWeight, SparseWeight, compact, quantize_rtn
    from compress.passes.kmeans import KMeansConfig, palettize
    from compress.quant import QuantSpec

    monkeypatch.setattr(ortops, "current", lambda: None)
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(24, 32, dtype=torch.bool).scatter_(1, w.abs().topk(16, dim=1).indices, True)
    g = Graph()
    low = WeightLowering(g, "fast")
    x = g.input("x", FLOAT, [1, 32])
    formats = [palettize(w, KMeansConfig(type="kmeans", bits=3, iterations=3)), DenseWeight(w),
               SparseWeight(mask, DenseWeight(compact(w, mask))), quantize_rtn(w, QuantSpec(4, 16, grid="nf")),
               quantize_rtn(w, QuantSpec(3, 16, grid="nf"))]
    for i, fmt in enumerate(formats):
        low.linear(x, fmt, None, f"layer{i}")
    assert [low.layers[f"layer{i}"].lowering.split(" (")[0] for i in range(5)] == [
        "in-graph decode", "dense float16", "in-graph decode", "MatMulBnb4 NF4 block 16", "in-graph decode"]
    assert low.decoded_without_ortops == 3 and not low.custom_ops_used
    assert not any(node.domain == ortops.DOMAIN for node in g.nodes)
