"""Weight clustering (k-means palettization) on the real model and real text."""

import json

import pytest
import torch
from conftest import FIRST_BLOCKS, RECIPES, cli, compress_copy

import compress
from compress.data import calibration_batches, evaluation_windows
from compress.errors import PlanError, RecipeError
from compress.evaluate import evaluate
from compress.formats import OutlierWeight, PalettizedWeight, SparseWeight, format_from_saved
from compress.kmeans import kmeans_pp_init, lloyd, weighted_kmeans
from compress.passes.kmeans import KMeansConfig, palettize
from compress.pipeline import plan
from compress.recipe import load_recipe


def weighted_error(w, fmt, h):
    d = w - fmt.dequantize()
    return float(((d @ h) * d).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_channel_uses_at_most_2_to_the_bits_values(layer, bits):
    w, h = layer
    fmt = palettize(w, KMeansConfig(bits=bits), torch.diagonal(h).unsqueeze(0))
    deq = fmt.dequantize()
    assert max(len(torch.unique(row)) for row in deq) <= 2 ** bits
    assert fmt.bits_per_weight() == pytest.approx(bits + 16 * 2 ** bits / w.shape[1])


def test_lloyd_matches_a_plain_reference_and_uniform_weights_equal_none():
    x = torch.randn(6, 400, generator=torch.Generator().manual_seed(1))
    init = kmeans_pp_init(x, torch.ones_like(x), 8, torch.Generator().manual_seed(0))
    ours = lloyd(x, torch.ones_like(x), init, iterations=200)
    ref = init.clone()  # textbook Lloyd: full distance matrix, argmin, plain means
    for _ in range(200):
        assign = (x.unsqueeze(-1) - ref.unsqueeze(1)).abs().argmin(-1)
        new = torch.stack([torch.stack([x[t][assign[t] == j].mean() if (assign[t] == j).any() else ref[t, j]
                                        for j in range(8)]) for t in range(6)]).sort(1).values
        if torch.allclose(new, ref):
            break
        ref = new
    assert torch.allclose(ours, ref, atol=1e-5)
    plain = weighted_kmeans(x, 8, None, seed=3)
    uniform = weighted_kmeans(x, 8, torch.full_like(x, 2.5), seed=3)
    assert torch.equal(plain[0], uniform[0]) and torch.equal(plain[1], uniform[1])


def test_sensitivity_weighting_lowers_the_output_error(layer):
    w, h = layer
    plain = palettize(w, KMeansConfig(bits=3, sensitivity="none"))
    weighted = palettize(w, KMeansConfig(bits=3), torch.diagonal(h).unsqueeze(0))
    feedback = palettize(w, KMeansConfig(bits=3, error_feedback=True), torch.diagonal(h).unsqueeze(0), h)
    assert weighted_error(w, weighted, h) < weighted_error(w, plain, h)
    assert weighted_error(w, feedback, h) < weighted_error(w, weighted, h)


@pytest.mark.parametrize("options", [
    {"granularity": "tensor", "bits": 6},
    {"granularity": "group", "channels_per_table": 7, "table_dtype": "int8"},  # 1536 rows: a shorter last group
    {"outliers": "0.5%", "error_feedback": True},
])
def test_tables_indices_and_outliers_round_trip_exactly(layer, options):
    w, h = layer
    fmt = palettize(w, KMeansConfig(**options), torch.diagonal(h).unsqueeze(0), h)
    again = format_from_saved(json.loads(json.dumps(fmt.meta())), {k: v.clone() for k, v in fmt.tensors().items()})
    assert torch.equal(again.dequantize(), fmt.dequantize())
    assert again.nbytes() == fmt.nbytes()
    if "outliers" in options:
        assert isinstance(fmt, OutlierWeight) and fmt.values.numel() == round(0.005 * w.numel())
        assert torch.equal(fmt.dequantize()[fmt.outlier_mask()], fmt.values.float())


def test_same_seed_same_bytes_other_seed_other_tables(layer):
    w, _ = layer
    cfg = KMeansConfig(granularity="tensor")
    a, b, c = palettize(w, cfg, seed=5), palettize(w, cfg, seed=5), palettize(w, cfg, seed=6)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert not torch.equal(a.table, c.table)


def test_pruned_then_clustered_keeps_zeros_and_loads(tmp_path, smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 4, 256, seed=0, heldout_spec="pydoc")
    targets = ["model.layers.[0-1].*"]
    m = compress_copy(model, [{"type": "wanda", "sparsity": 0.5, "targets": targets},
                              {"type": "kmeans", "bits": 3, "outliers": 0.01, "error_feedback": True,
                               "targets": targets}], calib)
    fmt = m.model.layers[1].mlp.down_proj.fmt
    assert isinstance(fmt, SparseWeight) and isinstance(fmt.values, OutlierWeight)
    assert isinstance(fmt.values.inner, PalettizedWeight)
    dense = fmt.dequantize()
    assert (dense[~fmt.mask] == 0).all() and (fmt.mask.sum(1) == fmt.shape[1] // 2).all()
    again = format_from_saved(fmt.meta(), fmt.tensors())
    assert torch.equal(again.dequantize(), dense)


@pytest.mark.slow  # the k-means tests above cover the format; the whole recipe is minutes
def test_palettize_recipe_runs_and_beats_plain_kmeans(tmp_path, smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 8, 256, seed=0, heldout_spec="pydoc")
    windows = evaluation_windows("pydoc", tok, 512, 2, "pydoc")
    _, ref = evaluate(model, windows, keep_logprobs=True)
    p = {"type": "kmeans", "bits": 3, "targets": FIRST_BLOCKS}
    plain = evaluate(compress_copy(model, [{**p, "sensitivity": "none"}], calib), windows, reference=ref)[0]
    sensitive = evaluate(compress_copy(model, [p], calib), windows, reference=ref)[0]
    assert sensitive.kl_divergence < plain.kl_divergence
    out = tmp_path / "p"
    result = cli("run", RECIPES / "palettize4-channel.yaml", "smollm2-135m", "--out", out, "--quiet",
                 "--set", "calibration.samples=4", "--set", "calibration.seq_len=128",
                 "--set", "evaluate.max_windows=2", "--set", "passes.0.targets=['model.layers.[0-3].*']")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    clustered = [x for x in report["layers"] if "palette" in x["format"]]
    assert len(clustered) == 28
    loaded, _ = compress.load(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj.fmt, PalettizedWeight)


@pytest.mark.parametrize("pass_type, option, needle", [
    ("kmeans", "bits: 0", "greater than or equal to 1"),
    ("kmeans", "bits: 9", "less than or equal to 8"),
    ("kmeans", "outliers: 60%", "less than or equal to 0.1"),
    ("kmeans", "granularity: row", "tensor"),
    ("gptvq", "bits: 3\n    dim: 4", "at most 8 bits"),
    ("gptvq", "dim: 0", "greater than or equal to 1"),
    ("gptvq", "codebook_dtype: int4", "'float16' or 'int8'"),
])
def test_bad_clustering_options_are_rejected_at_validation(write_recipe, pass_type, option, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(f"passes:\n  - type: {pass_type}\n    {option}\n"))
    assert needle in e.value.message


def test_quantizing_after_clustering_is_refused_with_a_hint(write_recipe):
    with pytest.raises(PlanError) as e:
        plan(load_recipe(write_recipe("passes:\n  - type: kmeans\n  - type: rtn\n")).passes)
    assert "table_dtype: int8" in e.value.hint
