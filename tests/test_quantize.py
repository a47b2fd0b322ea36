"""Quantization passes on the real model and real text: GPTQ, AWQ scaling, mixed precision."""

import copy

import pytest
import torch
from conftest import FIRST_BLOCKS, compress_copy

from compress.data import calibration_batches, evaluation_windows
from compress.evaluate import evaluate
from compress.families import find_blocks
from compress.formats import quantize_rtn
from compress.hessian import output_error
from compress.passes.gptq import gptq_quantize
from compress.pipeline import plan, run_passes
from compress.quant import FIT_ROWS, QuantSpec, fit_params, pad_to_groups
from compress.recipe import parse_recipe


@pytest.fixture(scope="module")
def data(smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 8, 256, seed=0, heldout_spec="pydoc")
    windows = evaluation_windows("pydoc", tok, 512, 2, "pydoc")
    base, ref = evaluate(model, windows, keep_logprobs=True)
    return calib, windows, base, ref



def real_hessian(model, tokens):
    """Input Hessian of layer 0's projections: RMS-normed real embeddings of real text."""
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens.flatten())).detach()
    return x.t() @ x / x.shape[0]


@pytest.mark.parametrize("spec", [QuantSpec(3, 64, clip_search=True), QuantSpec(4, 64, grid="nf", clip_search=True)])
def test_clip_search_in_row_chunks_fits_every_row_as_alone(smol, spec):
    mlp = smol[0].model.layers[0].mlp
    w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().float()  # the rows GPTQ fits in one go
    assert w.shape[0] > 2 * FIT_ROWS
    groups = pad_to_groups(w, 64).reshape(w.shape[0], -1, 64)
    scale, zero = fit_params(groups, spec)
    for rows in (slice(0, 7), slice(FIT_ROWS - 3, FIT_ROWS + 3), slice(w.shape[0] - 40, w.shape[0])):
        s, z = fit_params(groups[rows], spec)
        assert torch.equal(scale[rows], s)
        assert (zero is None) == (z is None) and (zero is None or torch.equal(zero[rows], z))


@pytest.mark.slow  # the layer-level GPTQ tests below and test_embeddings' head test cover the default suite
def test_gptq_beats_rtn_at_3_bits(smol, data):
    model, _, _ = smol
    calib, windows, base, ref = data
    q = {"bits": 3, "group_size": 64, "targets": FIRST_BLOCKS}
    rtn = evaluate(compress_copy(model, [{"type": "rtn", **q}], calib), windows, reference=ref)[0]
    gptq = evaluate(compress_copy(model, [{"type": "gptq", **q}], calib), windows, reference=ref)[0]
    assert gptq.perplexity < rtn.perplexity and gptq.kl_divergence < rtn.kl_divergence
    assert gptq.kl_divergence < 0.8 * rtn.kl_divergence


def test_gptq_lowers_output_error_on_odd_group_widths(smol, data):
    model, _, _ = smol
    h = real_hessian(model, data[0][:2])
    w = model.model.layers[0].mlp.gate_proj.weight.detach().float()
    for group in (100, 64, None):  # 576 = 5 x 100 + 76: last group shorter
        spec = QuantSpec(3, group, clip_search=True)
        fmt = gptq_quantize(w, h, spec)
        assert fmt.scales.shape[1] == spec.groups(576)
        from compress.formats import quantize_rtn

        assert output_error(w, fmt.dequantize(), h) < output_error(w, quantize_rtn(w, spec).dequantize(), h)


def test_refitting_scales_lowers_the_output_error_of_every_row(smol, data):
    """Least-squares scales for GPTQ's codes: never a worse row, a lower layer error, same codes."""
    from compress.passes.gptq import refit_scales

    model, _, _ = smol
    h = real_hessian(model, data[0][:2])
    w = model.model.layers[0].mlp.gate_proj.weight.detach().float()
    for spec in (QuantSpec(4, 64, clip_search=True), QuantSpec(3, 100, symmetric=True)):  # 576 = 5 x 100 + 76
        plain = gptq_quantize(w, h, spec, refit=False)
        codes, scale, zero = plain.unpacked()
        new = refit_scales(w, h, codes, scale, zero, spec)
        refit = gptq_quantize(w, h, spec, refit=True)
        torch.testing.assert_close(refit.scales.float(), new)
        assert torch.equal(refit.unpacked()[0], codes)

        def row_error(fmt):
            d = w - fmt.dequantize()
            return ((d @ h) * d).sum(1)

        assert (row_error(refit) <= row_error(plain) * (1 + 1e-5)).all()
        assert output_error(w, refit.dequantize(), h) < 0.99 * output_error(w, plain.dequantize(), h)


def test_awq_scaling_keeps_the_float_model_exact(smol, data):
    model, _, _ = smol
    calib, windows, _, _ = data
    awq = {"type": "awq", "search_bits": 3, "search_group_size": 64, "targets": ["model.layers.[0-1].*"]}
    scaled = compress_copy(model, [awq], calib)
    changed = (scaled.model.layers[0].input_layernorm.weight - model.model.layers[0].input_layernorm.weight).abs()
    assert changed.max() > 1e-3, "AWQ chose no scaling at all"
    # grouped-query attention (9 query heads, 3 KV heads): v_proj -> o_proj is scaled too, tied per KV head
    v_scaled = [i for i in range(2) if not torch.equal(scaled.model.layers[i].self_attn.v_proj.weight,
                                                       model.model.layers[i].self_attn.v_proj.weight)]
    assert v_scaled, "no v_proj -> o_proj scaling under GQA"
    with torch.no_grad():
        a = model(input_ids=windows[:1]).logits
        b = scaled(input_ids=windows[:1]).logits
    assert (a - b).abs().max() < 1e-3 * a.abs().max()


@pytest.mark.slow  # test_awq_scaling_keeps_the_float_model_exact covers the default suite
def test_awq_then_rtn_beats_rtn(smol, data):
    model, _, _ = smol
    calib, windows, _, ref = data
    q = {"type": "rtn", "bits": 3, "group_size": 64, "targets": FIRST_BLOCKS}
    plain = evaluate(compress_copy(model, [q], calib), windows, reference=ref)[0]
    awq = evaluate(compress_copy(model, [{"type": "awq", "targets": FIRST_BLOCKS}, q], calib), windows,
                   reference=ref)[0]
    assert awq.kl_divergence < plain.kl_divergence


@pytest.mark.parametrize("target", [pytest.param(3.25, marks=pytest.mark.slow), 4.1])  # each: minutes
def test_mixed_precision_never_exceeds_its_target(smol, data, target):
    model, _, _ = smol
    calib = data[0]
    m = copy.deepcopy(model)
    result = run_passes(m, plan(parse_recipe({"passes": [
        {"type": "rtn", "target_bits_per_weight": target, "sensitivity_samples": 4,
         "targets": ["model.layers.[0-3].*"]}]}).passes), calib, "cpu")  # four blocks: the sensitivities cost
    fmts = [mod.fmt for mod in find_blocks(m)[1].modules() if hasattr(mod, "fmt")]
    bits = 8 * sum(f.nbytes() for f in fmts) / sum(f.numel for f in fmts)
    assert bits <= target
    chosen = {(v["bits"], v["group_size"]) for v in result.allocation["0:rtn"].values()}
    assert len(chosen) > 1, "a mixed allocation mixes"
    assert bits > target - 0.15, "the budget is used, not wasted"


def test_layers_sharing_an_input_are_quantized_in_one_sweep_with_the_same_result(smol, data):
    """q/k/v and gate/up share a Hessian and go through GPTQ stacked; every layer must get what
    gptq_quantize gives it alone (codes equal up to float-rounding ties, same output error)."""
    from compress.blocks import capture_block_inputs
    from compress.pipeline import _collect_stats, _linear_layers

    model, _, _ = smol
    calib = data[0][:4]
    _, blocks = find_blocks(model)
    layers = _linear_layers(blocks[0], "model.layers.0")
    stats = _collect_stats(blocks[0], layers, frozenset({"hessian"}), capture_block_inputs(model, blocks, calib, 4),
                           "cpu")
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.v_proj"]  # shared input
    spec = QuantSpec(3, 64, clip_search=True)
    stacked = compress_copy(model, [{"type": "gptq", "bits": 3, "group_size": 64, "clip_search": True,
                                     "targets": ["model.layers.0.*"]}], calib)
    for name, module in layers.items():
        h = stats[name].mean_hessian()
        alone = gptq_quantize(module.weight.detach().float(), h, spec, refit=True)
        got = stacked.get_submodule(name).fmt
        same = (got.unpacked()[0] == alone.unpacked()[0]).float().mean()
        assert same > 0.999, (name, same)
        torch.testing.assert_close(got.scales, alone.scales)
        w = module.weight.detach().float()
        e_got, e_alone = output_error(w, got.dequantize(), h), output_error(w, alone.dequantize(), h)
        assert abs(e_got - e_alone) <= 1e-3 * e_alone, name


def test_statistics_forwards_that_stop_early_equal_full_forwards(smol, data):
    """Batches after the first stop at the last hooked layer's input: Hessians and squared sums must
    equal hooks on full forwards of the same real block and text."""
    from compress.blocks import capture_block_inputs
    from compress.pipeline import _collect_stats, _linear_layers

    model, _, _ = smol
    calib = data[0]
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calib[:4], 4) + capture_block_inputs(model, blocks, calib[4:], 4)
    assert len(inputs) == 2  # the early stop only acts from the second batch on
    layers = _linear_layers(blocks[0], "b")
    full = {n: torch.zeros(m.in_features, m.in_features) for n, m in layers.items()}

    def accumulate(_module, args, name):
        x = args[0].reshape(-1, args[0].shape[-1])
        full[name].add_(x.t() @ x)  # returns None: a pre-hook's return value would replace the input

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: accumulate(mod, a, n)) for n, m in layers.items()]
    with torch.no_grad():
        for hidden, kwargs in inputs:
            blocks[0](hidden, **kwargs)
    for h in hooks:
        h.remove()
    stats = _collect_stats(blocks[0], layers, frozenset({"hessian"}), inputs, "cpu")
    sq = _collect_stats(blocks[0], layers, frozenset({"sq_sum"}), inputs, "cpu")
    for name in layers:
        torch.testing.assert_close(stats[name].hessian * stats[name].tokens, full[name], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(sq[name].sq_sum, torch.diagonal(full[name]), rtol=1e-5, atol=1e-3)


def _stats_seen_by_gptq(monkeypatch) -> dict:
    """Record the statistics every GPTQ pass is handed, per layer."""
    from compress.passes.gptq import GPTQ

    seen, apply = {}, GPTQ.apply

    def recording(self, work, replace):
        seen.update(work.stats)
        return apply(self, work, replace)

    monkeypatch.setattr(GPTQ, "apply", recording)
    return seen


def _layer_inputs(model, name, calib):
    x = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: x.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for chunk in calib.split(4):
            model(input_ids=chunk, use_cache=False)
    hook.remove()
    return torch.cat(x).double()


def test_asymmetric_gptq_targets_the_float_models_outputs(smol, data, monkeypatch):
    """Block 0 rounded by RTN, block 1 by GPTQ with asymmetric calibration: the cross statistics of
    block 1 must be X_float^T X of the real activations, and the full-step target weights must fit the
    float model's layer outputs from the quantized model's inputs better than the weights themselves."""
    from compress.passes.gptq import float_target

    model, _, _ = smol
    calib = data[0]
    seen = _stats_seen_by_gptq(monkeypatch)
    quantized = compress_copy(model, [{"type": "rtn", "bits": 3, "group_size": 64, "targets": ["model.layers.0.*"]},
                                      {"type": "gptq", "bits": 3, "group_size": 64, "float_target_strength": 0.125,
                                       "targets": ["model.layers.1.*"]}], calib)
    name = "model.layers.1.self_attn.q_proj"  # its input does not depend on block 1's own quantized layers
    x_float, x = _layer_inputs(model, name, calib), _layer_inputs(quantized, name, calib)
    stats = seen[name]
    assert stats.tokens == len(x)
    torch.testing.assert_close(stats.mean_cross().double(), x_float.t() @ x / len(x), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(stats.mean_cross(), stats.mean_hessian(), rtol=1e-3, atol=1e-4)  # the streams differ

    w = model.get_submodule(name).weight.detach().double()
    target = float_target(w.float(), stats, 1e-4, 1.0).double()
    misfit = lambda v: float(((x_float @ w.t() - x @ v.t()) ** 2).sum())  # noqa: E731
    assert misfit(target) < 0.9 * misfit(w)


@pytest.mark.slow  # block tuning: minutes
def test_tuning_keeps_the_codes_and_lowers_the_held_out_block_error(smol, data):
    from compress.pipeline import plan

    model, _, _ = smol
    calib = data[0]
    q = {"type": "gptq", "bits": 3, "group_size": 64, "targets": ["model.layers.[0-1].*"]}
    plain = compress_copy(model, [q], calib)
    m = copy.deepcopy(model)
    tune = {"type": "tune", "targets": ["model.layers.[0-1].*"]}
    result = run_passes(m, plan(parse_recipe({"passes": [q, tune]}).passes), calib, "cpu")
    notes = {n: r.notes for n, r in result.layers.items() if "tuned" in r.notes}
    assert len(notes) == 14  # every quantized layer of the two blocks
    changed = 0
    for name, note in notes.items():
        a, b = plain.get_submodule(name).fmt, m.get_submodule(name).fmt
        if ".layers.0." in name:  # block 1's inputs, and so its codes, moved with block 0's tuning
            assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros)
            changed += not torch.equal(a.scales, b.scales)
        if note["tuned"]:
            assert note["block_error_after"] < note["block_error_before"]
    assert changed == 7 and notes["model.layers.0.mlp.down_proj"]["tuned"], "block 0 keeps tuned scales"
    with pytest.raises(Exception, match="no quantizing pass before it"):
        plan(parse_recipe({"passes": [{"type": "tune"}, q]}).passes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_rounding_stores_exactly_the_weight_it_trains(layer, symmetric):
    from compress.passes.signround import LearnedRounding

    w, _ = layer
    spec = QuantSpec(2, 64, symmetric)
    t = LearnedRounding(w[:, :560], spec, [], "cpu", clip=True)  # 560 columns: a short last group
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained state: offsets anywhere in range, ranges clipped
        t.offset.copy_(torch.rand(t.offset.shape, generator=g) - 0.5)
        for p in (t.clip_lo, t.clip_hi):
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
    trained, stored = t.weight().detach(), t.result()
    assert torch.equal(stored.dequantize(), trained)
    assert stored.shape == (w.shape[0], 560) and stored.spec == spec
    nearest = LearnedRounding(w[:, :560], spec, [], "cpu", clip=True).result()  # the start: round to nearest
    assert torch.equal(nearest.dequantize(), quantize_rtn(w[:, :560], spec).dequantize())


def test_signround_lowers_the_models_error_below_round_to_nearest(smol, data):
    model, _, _ = smol
    calib, windows, _, ref = data
    q = {"bits": 2, "group_size": 64, "targets": ["model.layers.[0-1].*"]}
    m = copy.deepcopy(model)
    result = run_passes(m, plan(parse_recipe({"passes": [{"type": "signround", "steps": 12, "checks": 3, **q}]})
                                .passes), calib, "cpu")
    notes = {n: r.notes for n, r in result.layers.items() if "block_error" in r.notes}
    assert len(notes) == 14  # every layer of the two blocks
    for note in notes.values():
        assert note["block_error"] < 0.8 * note["block_error_rtn"] and note["best_step"] > 0
    rtn = compress_copy(model, [{"type": "rtn", **q}], None)
    assert all(not torch.equal(rtn.get_submodule(n).fmt.codes, m.get_submodule(n).fmt.codes) for n in notes)
    rounded = evaluate(m, windows, reference=ref)[0]
    nearest = evaluate(rtn, windows, reference=ref)[0]
    assert rounded.kl_divergence < 0.8 * nearest.kl_divergence
    with pytest.raises(Exception, match="rounds float weights"):
        plan(parse_recipe({"passes": [{"type": "gptq", **q}, {"type": "signround", **q}]}).passes)
    with pytest.raises(Exception, match="integer grid"):
        parse_recipe({"passes": [{"type": "signround", "grid": "nf", **q}]})
    with pytest.raises(Exception, match="drop clip_search"):
        parse_recipe({"passes": [{"type": "signround", "clip_search": True, **q}]})
