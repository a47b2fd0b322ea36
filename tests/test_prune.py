"""Pruning passes on the real model and real text."""

import copy
import json

import pytest
import torch
from conftest import FIRST_BLOCKS, RECIPES, cli, compress_copy

import compress
from compress.data import calibration_batches, evaluation_windows
from compress.errors import RecipeError
from compress.evaluate import evaluate
from compress.formats import SparseWeight, format_from_saved
from compress.passes.pruning import select_mask
from compress.passes.sparsegpt import sparsegpt_prune
from compress.pipeline import fused_pairs, plan, run_passes
from compress.recipe import load_recipe, parse_recipe


@pytest.fixture(scope="module")
def data(smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 8, 256, seed=0, heldout_spec="pydoc")
    windows = evaluation_windows("pydoc", tok, 512, 2, "pydoc")
    _, ref = evaluate(model, windows, keep_logprobs=True)
    return calib, windows, ref



def sparse_layers(model):
    return {n: m.fmt for n, m in model.named_modules() if isinstance(getattr(m, "fmt", None), SparseWeight)}


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
def test_unstructured_masks_are_exact_per_row(sparsity):
    score = torch.rand(64, 576)
    mask = select_mask(score, sparsity)
    assert (mask.sum(1) == 576 - round(576 * sparsity)).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_keep_n_of_every_m(pattern):
    n, m = map(int, pattern.split(":"))
    mask = select_mask(torch.rand(32, 576), 0, pattern)
    assert (mask.reshape(32, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), (None, 0.6), ("2:4", 0.0)])
def test_sparsegpt_exact_pattern_and_reconstruction(smol, data, pattern, sparsity):
    model, _, _ = smol
    layer = model.model.layers[2].mlp.up_proj
    x = model.model.layers[2].post_attention_layernorm(model.model.embed_tokens(data[0][:2].flatten())).detach()
    h = x.t() @ x / x.shape[0]
    w = layer.weight.detach().float()
    pruned, mask, _ = sparsegpt_prune(w, h, sparsity, pattern)
    assert (pruned[~mask] == 0).all()
    if pattern:
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
    else:
        assert (mask.sum(1) == 576 - round(576 * sparsity)).all()
    # SparseGPT's reconstruction beats the same mask without weight update, on real activations
    err = lambda v: ((x @ (v - w).t()) ** 2).sum()  # noqa: E731
    assert err(pruned) < err(w * mask)


@pytest.mark.slow  # a quality comparison (bench/prune.py measures it); wanda's mechanics: test_cluster, test_run
def test_wanda_beats_magnitude(smol, data):
    model, _, _ = smol
    calib, windows, ref = data
    p = {"sparsity": 0.5, "targets": FIRST_BLOCKS}
    mag = evaluate(compress_copy(model, [{"type": "magnitude", **p}], calib), windows, reference=ref)[0]
    wanda = evaluate(compress_copy(model, [{"type": "wanda", **p}], calib), windows, reference=ref)[0]
    assert wanda.kl_divergence < mag.kl_divergence


@pytest.mark.slow  # test_sparse_plus_4bit_checkpoint covers the default suite
def test_pruned_weights_stay_zero_through_quantization(smol, data):
    model, _, _ = smol
    calib = data[0]
    for quant in ("rtn", "gptq"):
        m = compress_copy(model, [{"type": "wanda", "pattern": "2:4", "targets": ["model.layers.[0-1].*"]},
                                  {"type": quant, "bits": 4, "group_size": 64, "targets": ["model.layers.[0-1].*"]}],
                          calib)
        layers = sparse_layers(m)
        assert len(layers) == 14
        for fmt in layers.values():
            dense = fmt.dequantize()
            assert (dense[~fmt.mask] == 0).all()
            assert (fmt.mask.reshape(fmt.shape[0], -1, 4).sum(-1) == 2).all()
            assert fmt.values.describe().startswith("4-bit")
            again = format_from_saved(fmt.meta(), fmt.tensors())
            assert torch.equal(again.dequantize(), dense)


@pytest.mark.slow  # the joint sparse + quantized sweep tests cover the default suite
def test_sparse_plus_4bit_checkpoint_is_small_and_keeps_zeros(tmp_path, smol):
    out = tmp_path / "s"
    result = cli("run", RECIPES / "2of4-w4.yaml", "smollm2-135m", "--out", out, "--quiet",
                 "--set", "calibration.samples=4", "--set", "calibration.seq_len=128",
                 "--set", "evaluate.max_windows=2", "--set", "passes.0.targets=['model.layers.[0-3].*']",
                 "--set", "passes.1.targets=['model.layers.[0-3].*']")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    sparse = [layer for layer in report["layers"] if layer["format"].startswith("2:4")]
    assert len(sparse) == 28
    # 2:4 + 4-bit: 1 bit of indices + 4 bits per kept value (half) + scales, about 3.3 bits per weight
    assert all(2.9 < layer["bits_per_weight"] < 3.5 for layer in sparse)
    model, _ = compress.load(out)
    fmt = model.model.layers[0].self_attn.q_proj.fmt
    assert isinstance(fmt, SparseWeight) and (fmt.dequantize()[~fmt.mask] == 0).all()


@pytest.mark.parametrize("option, needle", [
    ("type: wanda\n    sparsity: 1.5", "sparsity"),
    ("type: wanda\n    pattern: '3:2'", "0 < N < M"),
    ("type: magnitude\n    targets: ['model.embed_tokens']", "embeddings"),
    ("type: sparsegpt\n    pattern: 'half'", "N:M"),
])
def test_bad_pruning_options_are_rejected_at_validation(write_recipe, option, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(f"passes:\n  - {option}\n"))
    assert needle in e.value.message


def test_pruning_after_quantization_is_refused(write_recipe):
    from compress.errors import PlanError

    recipe = load_recipe(write_recipe("passes:\n  - type: rtn\n  - type: wanda\n"))
    with pytest.raises(PlanError, match="cannot follow"):
        plan(recipe.passes)


@pytest.mark.slow  # OWL scores every layer of the model
def test_owl_spreads_sparsity_and_keeps_the_total(smol, data):
    model, _, _ = smol
    calib = data[0]
    m = copy.deepcopy(model)
    result = run_passes(m, plan(parse_recipe({"passes": [
        {"type": "wanda", "sparsity": 0.6, "layerwise": "owl", "owl_samples": 4}]}).passes), calib, "cpu")
    ratios = [v["sparsity"] for v in result.allocation["0:wanda"].values()]
    assert len(ratios) == 30 and max(ratios) - min(ratios) > 0.1
    assert abs(sum(ratios) / len(ratios) - 0.6) < 1e-4  # reported rounded to 4 digits
    assert max(ratios) - min(ratios) <= 2 * 0.08 + 1e-4  # a band 2 lambda wide around the mean target


@pytest.mark.slow  # DSnoT over every block: minutes
def test_dsnot_lowers_error_and_keeps_row_counts(smol, data):
    model, _, _ = smol
    calib, windows, ref = data
    p = {"type": "wanda", "sparsity": 0.6, "targets": FIRST_BLOCKS}
    before_model = compress_copy(model, [p], calib)
    after_model = compress_copy(model, [p, {"type": "dsnot", "targets": FIRST_BLOCKS}], calib)
    for name, fmt in sparse_layers(after_model).items():
        assert (fmt.mask.sum(1) == fmt.shape[1] - round(fmt.shape[1] * 0.6)).all(), name
    before = evaluate(before_model, windows, reference=ref)[0]
    after = evaluate(after_model, windows, reference=ref)[0]
    assert after.kl_divergence < before.kl_divergence


def test_dsnot_must_follow_an_unstructured_pruning_pass(write_recipe):
    from compress.errors import PlanError

    with pytest.raises(PlanError, match="dsnot refines"):
        plan(load_recipe(write_recipe("passes:\n  - type: dsnot\n  - type: rtn\n")).passes)
    with pytest.raises(PlanError):
        plan(load_recipe(write_recipe("passes:\n  - type: wanda\n    pattern: '2:4'\n  - type: dsnot\n")).passes)


@pytest.mark.parametrize("pattern,sparsity,group",
                         [(None, 0.5, 64), pytest.param(None, 0.6, 32, marks=pytest.mark.slow),
                          pytest.param(None, 0.5, None, marks=pytest.mark.slow)])
def test_joint_sparsegpt_quantization_in_one_sweep(smol, data, pattern, sparsity, group):
    """SparseGPT's joint mode prunes and quantizes in one sweep: exact pattern, codes decode to the
    kept weights, and the layer's output error is below pruning then quantizing the kept weights."""
    from compress.formats import compact as compact_kept
    from compress.hessian import output_error
    from compress.passes.gptq import gptq_quantize
    from compress.passes.sparsegpt import joint_block_size
    from compress.quant import QuantSpec

    model, _, _ = smol
    layer = model.model.layers[2].mlp.up_proj
    x = model.model.layers[2].post_attention_layernorm(model.model.embed_tokens(data[0][:2].flatten())).detach()
    h = x.t() @ x / x.shape[0]
    w = layer.weight.detach().float()
    spec = QuantSpec(3, group)
    block = joint_block_size(sparsity, pattern, group, w.shape[1])
    assert block is not None
    pruned, mask, values = sparsegpt_prune(w, h, sparsity, pattern, block, spec=spec)
    fmt = SparseWeight(mask, values, pattern)
    assert torch.equal(fmt.dequantize(), pruned)  # the sweep's weights are exactly what is stored
    if pattern:
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
    else:
        assert (mask.sum(1) == 576 - round(576 * sparsity)).all()
    two_step, mask2, _ = sparsegpt_prune(w, h, sparsity, pattern)
    sequential = SparseWeight(mask2, gptq_quantize(two_step, h, spec, mask=mask2), pattern)
    assert output_error(w, fmt.dequantize(), h) < output_error(w, sequential.dequantize(), h)
    assert compact_kept(pruned, mask).shape[1] == values.shape[1]


@pytest.mark.slow  # the joint sweep tests above cover the fused solve
def test_sparsegpt_then_gptq_runs_as_one_sweep(smol, data):
    model, _, _ = smol
    calib, windows, ref = data
    p = {"targets": FIRST_BLOCKS}
    passes = [{"type": "sparsegpt", "sparsity": 0.5, "joint_quantization": True, **p},
              {"type": "gptq", "bits": 4, "group_size": 64, **p}]
    steps = plan(parse_recipe({"passes": passes}).passes)
    assert fused_pairs(steps) == {0: steps[1]}
    joint = copy.deepcopy(model)
    result = run_passes(joint, steps, calib, "cpu")
    notes = result.layers["model.layers.0.mlp.up_proj"].notes
    assert notes.get("joint_quantization") and "50% sparse + 4-bit g64" in notes["format"]
    assert result.layers["model.layers.0.mlp.up_proj"].passes == ["sparsegpt", "gptq"]
    assert notes["quantized_by"] == "joint sweep with sparsegpt"
    fmt = joint.model.layers[0].mlp.up_proj.fmt
    assert isinstance(fmt, SparseWeight) and (fmt.dequantize()[~fmt.mask] == 0).all()
    assert evaluate(joint, windows, reference=ref)[0].kl_divergence < 0.5
    nm = plan(parse_recipe({"passes": [{**passes[0], "pattern": "2:4"}, passes[1]]}).passes)
    assert fused_pairs(nm) == {}  # N:M keeps two sweeps (see sparsegpt.py)
    asym = plan(parse_recipe({"passes": [passes[0], {**passes[1], "float_target_strength": 0.125}]}).passes)
    assert fused_pairs(asym) == {}  # gptq keeps its asymmetric calibration
    assert asym[1].requirements().stats == {"hessian", "cross"}
    default = plan(parse_recipe({"passes": [{k: v for k, v in passes[0].items() if k != "joint_quantization"},
                                            passes[1]]}).passes)
    assert fused_pairs(default) == {}  # two sweeps unless asked
