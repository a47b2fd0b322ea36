"""CUDA kernels: every .cu compiles with nvcc for sm_80 and sm_90; the launch plans (what a kernel
reads for each format) compute the format's product when emulated in torch; no CuPy / no GPU falls
back to torch. The `gpu` tests compare the kernels themselves with the torch reference (needs an
NVIDIA GPU and CuPy: `pytest -m gpu`)."""

import re
import shutil
import subprocess
from functools import cache

import pytest
import torch

from compress import kernels
from compress.formats import DenseWeight, SparseWeight, compact, quantize_rtn
from compress.kmeans import nearest
from compress.modules import CompressedLinear
from compress.passes.gptvq import GPTVQConfig, gptvq_quantize
from compress.passes.kmeans import KMeansConfig, palettize
from compress.quant import QuantSpec


def _mask(w, pattern):
    if pattern == "2:4":
        keep = w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
        return torch.zeros(w.shape[0], w.shape[1] // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(w.shape)
    return torch.zeros(w.shape, dtype=torch.bool).scatter_(1, w.abs().topk(w.shape[1] * 3 // 8, dim=1).indices, True)


def formats(rows: int, cols: int, seed: int = 0):
    """(name, format) for every layout a kernel serves, on a weight of the given (odd) shape."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    out = []
    for bits in (2, 3, 4, 8):
        out.append((f"int{bits} asym g32", quantize_rtn(w, QuantSpec(bits, 32))))
        out.append((f"int{bits} sym per-row", quantize_rtn(w, QuantSpec(bits, None, symmetric=True))))
    out.append(("nf4 g64", quantize_rtn(w, QuantSpec(4, 64, grid="nf"))))
    out.append(("fp4 g32", quantize_rtn(w, QuantSpec(4, 32, grid="fp4"))))
    for bits, granularity in ((3, "channel"), (4, "tensor"), (2, "group")):
        cfg = KMeansConfig(type="kmeans", bits=bits, granularity=granularity, group_size=4, iterations=5)
        out.append((f"palette{bits} {granularity}", palettize(w, cfg)))
    out.append(("palette3 + outliers", palettize(w, KMeansConfig(type="kmeans", bits=3, outliers=0.02,
                                                                 table_dtype="int8", iterations=5))))
    # code books in shared memory (16 x 2, 64 x 2 floats: w3-frontier's 6-bit codes straddle bytes) or read in
    # place (256 x 4: w2-frontier; 256 x 2: w4-frontier); the last two left out where their k-means is slow
    vectors = [(2, 2), (2, 4)] + [(3, 2)] * (rows * cols <= 1 << 24) + [(4, 2)] * (rows * cols <= 1 << 20)
    for bits, dim in vectors:
        cfg = GPTVQConfig(bits=bits, dim=dim, table_weights=4 * cols, iterations=3, codebook_refit=0)
        out.append((f"vq{bits} d{dim}", gptvq_quantize(w, torch.eye(cols), cfg)))
    for dim in (2, 4):  # int8 books of pairs and of 4-vectors (as w3-frontier-table8 and w2-frontier store them)
        cfg = GPTVQConfig(bits=2, dim=dim, table_weights=4 * cols, iterations=3, codebook_refit=0,
                          codebook_dtype="int8")
        out.append((f"vq2 d{dim} int8 books", gptvq_quantize(w, torch.eye(cols), cfg)))
    if cols % 4 == 0:
        m = _mask(w, "2:4")
        out.append(("2:4 fp16", SparseWeight(m, DenseWeight(compact(w, m)), "2:4")))
        out.append(("2:4 + int4", SparseWeight(m, quantize_rtn(compact(w, m), QuantSpec(4, 16)), "2:4")))
    m = _mask(w, None)
    out.append(("bitmap fp16", SparseWeight(m, DenseWeight(compact(w, m)))))
    out.append(("bitmap + int3", SparseWeight(m, quantize_rtn(compact(w, m), QuantSpec(3, 16)))))
    out.append(("bitmap + palette + outliers", SparseWeight(m, palettize(
        w, KMeansConfig(type="kmeans", bits=3, outliers=0.02, iterations=5), mask=m))))
    return out


SHAPES = [(37, 100), (64, 576), (9, 1000)]


@cache
def cached_formats(rows: int, cols: int):
    return formats(rows, cols)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_plans_compute_the_formats_product(rows, cols):
    x = torch.randn(3, cols)
    for name, fmt in formats(rows, cols):
        plan = kernels.kernel_plan(fmt)
        assert plan is not None, name
        want = x @ fmt.dequantize().T
        torch.testing.assert_close(kernels.emulate(plan, x), want, rtol=1e-4, atol=1e-4, msg=name)


def test_plan_kinds():
    kinds = {name: kernels.kernel_plan(fmt) for name, fmt in formats(16, 64)}
    assert kinds["int4 asym g32"].kernel(torch.float16) == "gemv_f16_v0_c0"
    assert kinds["int3 sym per-row"].kernel(torch.bfloat16) == "gemv_bf16_v1_c0"
    assert kinds["nf4 g64"].value_mode == kernels.GRID
    assert kinds["palette3 channel"].value_mode == kernels.LUT
    assert kinds["2:4 + int4"].kernel(torch.float16) == "gemv_f16_v0_c1"
    assert kinds["2:4 fp16"].kernel(torch.float16) == "gemv_f16_v4_c1"
    assert kinds["bitmap + palette + outliers"].kernel(torch.float16) == "bitmap_gemv_f16_v3"
    assert kinds["palette3 + outliers"].outliers is not None
    assert kinds["vq2 d2"].kernel(torch.float16) == "gemv_f16_v5_c0" and kinds["vq2 d4"].kept == 16
    assert kernels.kernel_plan(DenseWeight(torch.randn(4, 8))) is None  # dense stays with cuBLAS
    fast = {name for name, plan in kinds.items() if kernels.takes_fast_path(plan)}
    assert fast == {name for name in kinds if not name.startswith(("2:4", "bitmap", "vq"))}
    assert not any(kernels.takes_fast_path(kernels.kernel_plan(fmt)) for _, fmt in formats(8, 100))  # K % 32 != 0


def test_every_kernel_name_a_plan_can_ask_for_exists_in_the_source():
    source = (kernels.CUDA_DIR / "compressed_gemv.cu").read_text()
    for _, fmt in formats(16, 64):
        plan = kernels.kernel_plan(fmt)
        for dtype in (torch.float16, torch.bfloat16):
            name = plan.kernel(dtype)
            prefix, _, rest = name.rpartition("_v")
            value = rest.split("_c")[0]
            macro = "BITMAP_ENTRY(T, TNAME, " if prefix.startswith("bitmap") else "GEMV_ENTRY(T, TNAME, "
            args = value if prefix.startswith("bitmap") else f"{value}, {rest.split('_c')[1]}"
            assert f"{macro}{args})" in source, name


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", kernels.SOURCES)
@pytest.mark.parametrize("arch", [pytest.param("sm_80", marks=pytest.mark.slow), "sm_90"])  # sm_80: slow
def test_cuda_sources_compile(source, arch, tmp_path):
    result = subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", f"-I{kernels.CUDA_DIR}", "-c",
                             str(kernels.CUDA_DIR / source),
                             "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out.o").stat().st_size > 1000


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", [pytest.param("sm_80", marks=pytest.mark.slow), "sm_90"])  # sm_80: slow
def test_every_quant_gemv_instance_compiles(arch, tmp_path):
    """quant_gemv.cu holds templates: compile each instance the launchers can ask for (value mode x bits,
    both activation types, the smallest and largest tile; the decoder for fp16 / bf16 / fp32 weights)."""
    signature = "const T*, const uint8_t*, const __half*, const uint8_t*, const float*, T*" + ", int" * 7
    decoder = "const uint8_t*, const __half*, const uint8_t*, const float*, O*" + ", int" * 6
    lines = ['#include "quant_gemv.cu"']
    for value in (kernels.INT_ASYM, kernels.INT_SYM, kernels.GRID, kernels.LUT):
        for bits in kernels.QUANT_BITS:
            for t in kernels.CUDA_TYPES.values():
                for rows, tile in ((4, 1), (2, 16)):
                    lines.append(f"template __global__ void quant_gemv<{t}, {value}, {bits}, {rows}, {tile}>"
                                 f"({signature.replace('T*', t + '*')});")
            for o in kernels.OUT_TYPES.values():
                lines.append(f"template __global__ void quant_dequant<{o}, {value}, {bits}>"
                             f"({decoder.replace('O*', o + '*')});")
    wrapper = tmp_path / "instances.cu"
    wrapper.write_text("\n".join(lines) + "\n")
    result = subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", f"-I{kernels.CUDA_DIR}", "-Xptxas", "-v", "-c",
                             str(wrapper), "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Compiling entry function") == len(lines) - 1
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert max(spills) <= 8, max(spills)  # registers hold the tile (one 8-bit code-book instance spills 4 B)


def test_cpu_and_no_cupy_fall_back_to_torch(monkeypatch):
    fmt = quantize_rtn(torch.randn(32, 64), QuantSpec(4, 32))
    assert kernels.compressed_matmul(fmt, torch.randn(2, 64)) is None  # CPU tensor
    assert kernels.dequantize(fmt, torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(kernels, "cupy_available", lambda: False)
    layer = CompressedLinear(fmt)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ fmt.dequantize().T)


def test_decoder_positions_and_outliers_on_cpu(monkeypatch):
    """What the GPU decoder does after decoding the kept values (scatter to a bitmap's or an N:M index's
    columns, outlier corrections), run on the CPU with the values decoded by torch."""
    from compress.formats import OutlierWeight

    def values_format(fmt):
        inner = fmt.values if isinstance(fmt, SparseWeight) else fmt
        return inner.inner if isinstance(inner, OutlierWeight) else inner

    checked = set()
    for name, fmt in cached_formats(64, 576):
        plan = kernels.launch.device_plan(fmt, torch.device("cpu"))
        if plan is None or not kernels.decodable(plan):
            continue
        decode = values_format(fmt).dequantize
        monkeypatch.setattr(kernels.launch, "_decode_values", lambda plan, bufs, device, dtype, f=decode: f().to(dtype))
        decoded = kernels.launch.decode_plan(plan, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(decoded, fmt.dequantize(), rtol=1e-6, atol=1e-7, msg=name)
        checked.add("bitmap" if plan.bitmap is not None else plan.col_mode)
        checked.add("outliers" if plan.outliers is not None else "exact")
    assert checked == {"bitmap", kernels.COL_NM, kernels.COL_DENSE, "outliers", "exact"}


def test_decoder_gathers_vector_code_books_on_the_device_it_is_given():
    """The GPU decoder's code-book path is torch on the plan's device buffers: run on the CPU, it gives each
    vector format's weights exactly (2-, 6- and 8-bit codes, 2- and 4-vectors, a book per 4 rows, float16 and int8
    books)."""
    seen = []
    for name, fmt in cached_formats(37, 100):
        plan = kernels.launch.device_plan(fmt, torch.device("cpu"))
        if plan.value_mode != kernels.VLUT:
            continue
        assert kernels.decodable(plan), name
        decoded = kernels.launch.decode_plan(plan, torch.device("cpu"), torch.float32)
        assert torch.equal(decoded, fmt.dequantize()), name
        seen.append(name)
    assert seen == ["vq2 d2", "vq2 d4", "vq3 d2", "vq4 d2", "vq2 d2 int8 books", "vq2 d4 int8 books"]


# ---- on a GPU ---------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _need_gpu():
    if not (torch.cuda.is_available() and kernels.cupy_available()):
        pytest.skip("needs an NVIDIA GPU and CuPy")


@gpu
@pytest.mark.parametrize("rows,cols", SHAPES + [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("batch", [1, 3, 16, 37])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_match_the_reference(rows, cols, batch, dtype):
    _need_gpu()
    x = torch.randn(batch, cols, device="cuda", dtype=dtype)
    for name, fmt in cached_formats(rows, cols):
        got = kernels.compressed_matmul(fmt, x)
        assert got is not None, name
        want = (x.float() @ fmt.dequantize().cuda().T)
        scale = want.abs().max().item() + 1e-6
        err = (got.float() - want).abs().max().item() / scale
        assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), (name, err)


@gpu
def test_compressed_linear_uses_the_kernel_on_cuda():
    _need_gpu()
    fmt = quantize_rtn(torch.randn(256, 512), QuantSpec(4, 64))
    layer = CompressedLinear(fmt, compute_dtype=torch.float16).cuda().half()
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    assert kernels.compressed_matmul(fmt, x) is not None
    want = x.float() @ fmt.dequantize().cuda().T
    # outputs near 20-60 have an fp16 spacing of 0.016-0.03: compare to the output scale, as above
    assert (layer(x).float() - want).abs().max() / want.abs().max() < 4e-3


@gpu
@pytest.mark.parametrize("rows,cols", [(64, 576), (11008, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_decoder_matches_the_format(rows, cols, dtype):
    """quant_dequant (prefill batches, float32 activations) gives the format's own weights, to the rounding
    of the type (float32: the same arithmetic; outliers are added as corrections, one rounding)."""
    _need_gpu()
    decoded = 0
    for name, fmt in cached_formats(rows, cols):
        got = kernels.dequantize(fmt, torch.device("cuda"), dtype)
        if got is None:  # codes the decoder does not read (16-wide groups, kept count not a multiple of 32)
            assert not kernels.decodable(kernels.kernel_plan(fmt)), name
            continue
        decoded += 1
        want = fmt.dequantize().cuda()
        assert got.dtype == dtype and got.shape == want.shape, name
        tol = {torch.float32: 2 ** -23, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[dtype]
        assert ((got.float() - want).abs() <= tol * want.abs() + 1e-7).all(), name
    assert decoded >= 16  # every dense integer / code-book / palette layout, outliers, sparse fp16 values


@gpu
def test_compressed_linear_float32_on_cuda_decodes_on_the_gpu(monkeypatch):
    _need_gpu()
    fmt = quantize_rtn(torch.randn(256, 512), QuantSpec(3, 64))
    layer = CompressedLinear(fmt).cuda()
    monkeypatch.setattr(type(fmt), "dequantize", lambda self: pytest.fail("decoded with torch on the CPU"))
    x = torch.randn(5, 512, device="cuda")
    got = layer(x)
    monkeypatch.undo()
    torch.testing.assert_close(got, x @ fmt.dequantize().cuda().T, rtol=1e-4, atol=1e-4)


@gpu
def test_kmeans_assignment_kernel_matches_searchsorted():
    _need_gpu()
    values = torch.randn(7, 5000, device="cuda")
    centroids = torch.randn(7, 16, device="cuda").sort(dim=1).values
    got = kernels.kmeans_assign(values, centroids).long()
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    assert torch.equal(got, torch.searchsorted(mids.contiguous(), values.contiguous()))
    assert torch.equal(nearest(values, centroids), got)


