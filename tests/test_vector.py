"""Vector code books with error feedback (GPTVQ) on a real layer of the real model and real text."""

import json

import pytest
import torch
from conftest import cli

import compress
from compress import vector_kmeans as vector_kmeans_module
from compress.errors import PlanError
from compress.formats import VectorWeight, format_from_saved
from compress.formats.base import LayoutError
from compress.hessian import output_error
from compress.kmeans import draw
from compress.passes.gptq import gptq_quantize
from compress.passes.gptvq import GPTVQ, GPTVQConfig, gptvq_quantize
from compress.quant import QuantSpec
from compress.vector_kmeans import assign, slot_sums, vector_kmeans


@pytest.fixture(scope="module")
def rows(layer):
    """The first 448 of the real layer's 1536 rows (16 code books of 28 rows at the default table size)."""
    return layer[0][:448], layer[1]


def test_vectors_beat_scalar_gptq_at_fewer_bits(rows):
    """GPTVQ's 2-dimensional code books at about 2.06 bits/weight against GPTQ's 2-bit g32 grid at 2.57, and at
    3 bits against 3-bit g64: a lower output error with fewer bits."""
    w, h = rows
    for bits, group, table_weights in ((2, 32, 16384), (3, 64, 32768)):
        scalar = gptq_quantize(w, h, QuantSpec(bits, group))
        vector = gptvq_quantize(w, h, GPTVQConfig(bits=bits, dim=2, table_weights=table_weights, iterations=10))
        assert vector.bits_per_weight() < scalar.bits_per_weight() - 0.15
        assert output_error(w, vector.dequantize(), h) < 0.9 * output_error(w, scalar.dequantize(), h)


def test_error_feedback_and_code_book_refit_each_lower_the_error(rows):
    w, h = rows
    cfg = GPTVQConfig(bits=2, dim=2, iterations=10, codebook_refit=0)
    swept = gptvq_quantize(w, h, cfg)
    refit = gptvq_quantize(w, h, cfg.model_copy(update={"codebook_refit": 20}))
    # no feedback: every vector to its nearest entry of the same code books, in the plain weighted metric
    flat = torch.eye(w.shape[1]) * torch.diagonal(h)
    nearest = gptvq_quantize(w, flat, cfg)
    errors = [output_error(w, f.dequantize(), h) for f in (nearest, swept, refit)]
    assert errors[1] < 0.9 * errors[0] and errors[2] <= errors[1], errors


@pytest.mark.parametrize("book_dtype", ["float16", "int8"])
def test_codes_and_code_books_round_trip_exactly_and_count_every_byte(rows, book_dtype):
    w, h = rows
    fmt = gptvq_quantize(w, h, GPTVQConfig(bits=3, dim=2, table_weights=10000, iterations=5,
                                           codebook_dtype=book_dtype))
    rows, cols = w.shape
    per = round(10000 / cols)
    assert fmt.rows_per_table == per and fmt.codebook.shape == (-(-rows // per), 64, 2)
    assert fmt.codebook_dtype == book_dtype and fmt.codebook.dtype == getattr(torch, book_dtype)
    again = format_from_saved(json.loads(json.dumps(fmt.meta())), {k: v.clone() for k, v in fmt.tensors().items()})
    assert torch.equal(again.dequantize(), fmt.dequantize())
    codes_bytes = rows * -(-cols // 2 * 6 // 8)
    assert fmt.nbytes() == codes_bytes + fmt.codebook.numel() * fmt.codebook.element_size() + rows * 2
    # every row holds only its own code book's vectors, times its scale
    deq = fmt.dequantize().reshape(rows, cols // 2, 2) / fmt.row_scale.float().reshape(rows, 1, 1)
    book = fmt.codebook.float()[0]
    assert torch.cdist(deq[:per].reshape(-1, 2), book).min(1).values.max() < 1e-3 * book.abs().max()
    if book_dtype == "int8":  # each book's step went into its rows' scales: its entries span the int8 range
        assert (fmt.codebook.abs().amax((1, 2)) >= 100).all()
    broken = dict(fmt.tensors(), codebook=fmt.codebook[:-1])
    with pytest.raises(LayoutError, match="codebook"):
        format_from_saved(fmt.meta(), broken)


def test_a_checkpoint_from_before_int8_books_still_loads(rows):
    """Vector layouts saved before ``codebook_dtype`` existed name none: their books are float16."""
    w, h = rows
    fmt = gptvq_quantize(w, h, GPTVQConfig(bits=2, dim=2, iterations=3, codebook_refit=0))
    old = {k: v for k, v in fmt.meta().items() if k != "codebook_dtype"}
    assert torch.equal(format_from_saved(old, fmt.tensors()).dequantize(), fmt.dequantize())
    with pytest.raises(LayoutError, match="codebook"):  # and an int8 layout refuses float16 books
        format_from_saved(dict(old, codebook_dtype="int8"), fmt.tensors())


def test_int8_code_books_cost_little_and_twice_as_many_beat_float16_books_at_the_same_bits(rows):
    """Rounding the books to int8 (their step folded into the row scales) barely moves the output error; spending
    the saved bits on twice as many books lowers it below float16 books at no more bits per weight."""
    w, h = rows
    cfg = GPTVQConfig(bits=3, dim=2, table_weights=16384, iterations=10)
    half = gptvq_quantize(w, h, cfg)
    int8 = gptvq_quantize(w, h, cfg.model_copy(update={"codebook_dtype": "int8"}))
    more = gptvq_quantize(w, h, cfg.model_copy(update={"codebook_dtype": "int8", "table_weights": 8192}))
    assert int8.bits_per_weight() < half.bits_per_weight() - 0.05 and more.bits_per_weight() <= half.bits_per_weight()
    errors = [output_error(w, f.dequantize(), h) for f in (half, int8, more)]
    assert errors[1] < 1.01 * errors[0] and errors[2] < errors[0], errors


def test_draw_picks_each_index_in_proportion_to_its_weight_and_never_a_zero_one():
    p = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0]).expand(40000, 5)
    counts = torch.bincount(draw(p, torch.Generator().manual_seed(0)), minlength=5)
    assert counts[0] == counts[2] == counts[4] == 0
    assert abs(counts[3] / 40000 - 0.75) < 0.01


def test_vector_kmeans_matches_a_plain_reference():
    x = torch.randn(3, 300, 2, generator=torch.Generator().manual_seed(1))
    centroids, codes = vector_kmeans(x, 8, iterations=200, seed=0)
    assert torch.equal(codes, torch.cdist(x, centroids).argmin(-1))  # assignments are the nearest centroids
    for t in range(3):  # and every centroid is its vectors' mean (a fixed point of Lloyd's iteration)
        for j in codes[t].unique():
            assert torch.allclose(centroids[t, j], x[t][codes[t] == j].mean(0), atol=1e-5)


def test_assignment_in_chunks_and_slot_sums_equal_the_plain_products(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, w, c = torch.randn(2, 1000, 2, generator=gen), torch.rand(2, 1000, 2, generator=gen), torch.randn(2, 16, 2)
    weighted = torch.cat([w, w * x], 2)
    nearest = (w.unsqueeze(2) * (x.unsqueeze(2) - c.unsqueeze(1)).pow(2)).sum(-1).argmin(-1)
    monkeypatch.setattr(vector_kmeans_module, "CHUNK_ELEMENTS", 2 * 16 * 300)  # 300 vectors a chunk: a short last one
    assert torch.equal(assign(weighted, c), nearest)
    slot = torch.randint(0, 40, (5000,), generator=gen)
    values = torch.randn(5000, 3, generator=gen)
    plain = torch.zeros(40, 3, dtype=torch.float64).index_add_(0, slot, values.double())
    assert torch.equal(slot_sums(slot, values, 40), plain)


def test_a_gptvq_recipe_runs_saves_and_loads(tmp_path, write_recipe):
    out = tmp_path / "vq"
    recipe = write_recipe("passes:\n  - type: gptvq\n    iterations: 5\n    targets: ['model.layers.0.*']\n")
    result = cli("run", recipe, "smollm2-135m", "--out", out, "--quiet", "--set", "calibration.samples=4",
                 "--set", "calibration.seq_len=128", "--set", "evaluate.max_windows=1", "--set", "evaluate.seq_len=128")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    vq = [x for x in report["layers"] if "vectors of 2" in x["format"]]
    assert len(vq) == 7
    loaded, _ = compress.load(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj.fmt, VectorWeight)


def test_a_dim_that_does_not_divide_the_inputs_is_refused_before_any_compute(smol):
    with pytest.raises(PlanError) as e:
        GPTVQ(GPTVQConfig(dim=7, bits=1)).check_model(smol[0])
    assert "576 inputs" in e.value.message and "dim" in e.value.hint


@pytest.mark.parametrize("book_dtype", ["float16", "int8"])
def test_trained_code_books_and_row_scales_store_what_the_forward_computed(rows, book_dtype):
    """A :class:`TrainableCodebook` starts at the stored weight, trains its code books and row scales (here on the
    layer's output error), and stores exactly what its forward computes, codes untouched (int8 books: the forward
    rounds them, straight through)."""
    from compress.modules import CompressedLinear
    from compress.passes.trainable_grid import trainable_grids

    w, h = rows
    fmt = gptvq_quantize(w, h, GPTVQConfig(iterations=5, codebook_refit=0, codebook_dtype=book_dtype))
    layer = CompressedLinear(fmt)
    (t,) = trainable_grids({"layer": layer}, "cpu").values()
    assert torch.equal(t.weight().detach(), fmt.dequantize())
    params = [t.log_factor, *t.value_parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        d = w - t.weight()
        ((d @ h) * d).sum().backward()
        optimizer.step()
    done = t.result()
    assert torch.equal(done.indices, fmt.indices) and not torch.equal(done.codebook, fmt.codebook)
    assert done.codebook.dtype == fmt.codebook.dtype
    assert torch.allclose(done.dequantize(), t.weight().detach(), rtol=2e-3, atol=1e-4)  # float16 storage only
    assert output_error(w, done.dequantize(), h) < output_error(w, fmt.dequantize(), h)


@pytest.mark.slow  # two runs of the pipeline; test_trained_code_books... covers the trainable code book
def test_block_tuning_trains_code_books_and_row_scales_with_the_codes_fixed(smol):
    """``tune`` after ``gptvq``: the code book entries and row scales move, the codes stay, the held-out block error
    drops; what is stored is what the tuned forward computed (float16 values)."""
    import copy

    from compress.data import calibration_batches
    from compress.pipeline import plan, run_passes
    from compress.recipe import parse_recipe

    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 5, 128, seed=0, heldout_spec="pydoc")
    vq = {"type": "gptvq", "iterations": 3, "targets": ["model.layers.0.mlp.*"]}
    plain, tuned = copy.deepcopy(model), copy.deepcopy(model)
    run_passes(plain, plan(parse_recipe({"passes": [vq]}).passes), calib, "cpu")
    result = run_passes(tuned, plan(parse_recipe({"passes": [vq, {"type": "tune", "targets": vq["targets"]}]}).passes),
                        calib, "cpu")
    notes = {n: r.notes for n, r in result.layers.items() if "tuned" in r.notes}
    assert len(notes) == 3 and all(n["tuned"] for n in notes.values())
    assert all(n["block_error_after"] < n["block_error_before"] for n in notes.values())
    for name in notes:
        a, b = plain.get_submodule(name).fmt, tuned.get_submodule(name).fmt
        assert isinstance(b, VectorWeight) and torch.equal(a.indices, b.indices)
        assert not torch.equal(a.codebook, b.codebook) and not torch.equal(a.row_scale, b.row_scale)
