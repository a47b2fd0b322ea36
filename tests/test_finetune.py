"""End-to-end fine-tuning against the float model (the `peqa`, `l4q` and `pv_tuning` passes): the teacher the
pipeline builds is the float model's own top-k distribution, tuning lowers the held-out KL on the real model and
stores it exactly, a result that is no better than the input is never stored, and bad plans are refused before any
compute."""

import copy

import pytest
import torch
from conftest import cli

from compress.data import calibration_batches
from compress.formats import QuantizedWeight, VectorWeight, quantize_rtn
from compress.modules import CompressedEmbedding, CompressedLinear
from compress.passes.peqa import _held_out_kl, _split, _step_size_factor
from compress.passes.trainable_grid import TrainableCodebook, TrainableGrid
from compress.pipeline import plan, run_passes
from compress.quant import QuantSpec
from compress.recipe import parse_recipe
from compress.stage import RunStage
from compress.teacher import Teacher, topk_kl

# RTN 3-bit on blocks 0-1 (asymmetric g64) and the tied table (4-bit g32 RTN): 12 x 96 tokens of pydoc, 2 held out
PASSES = [{"type": "rtn", "bits": 3, "group_size": 64, "targets": ["model.layers.[01].*"]},
          {"type": "embeddings", "method": "rtn", "clip_search": False}]
PEQA = {"type": "peqa", "epochs": 1, "lr": 0.01, "zeros": True, "batch": 2, "held_out": 2, "top_k": 32,
        "targets": ["model.layers.[01].*", "lm_head", "model.embed_tokens"]}


def _kl_full(student, teacher_logits):
    p = torch.log_softmax(teacher_logits.double(), -1)
    return (p.exp() * (p - torch.log_softmax(student.double(), -1))).sum(-1).mean()


def test_topk_kl_is_the_full_kl_with_every_token_and_never_above_it_with_fewer():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 5, 40, generator=g) * 3, torch.randn(3, 5, 40, generator=g) * 3
    full = _kl_full(student, teacher)
    every = Teacher.from_logits(torch.zeros(3, 5), [teacher], 40)
    assert float(topk_kl(student, every.indices, every.logprobs)) == pytest.approx(float(full), rel=1e-5)
    for k in (1, 8, 39):
        some = Teacher.from_logits(torch.zeros(3, 5), [teacher], k)
        assert 0 < float(topk_kl(student, some.indices, some.logprobs)) <= float(full) + 1e-6
        assert abs(float(topk_kl(teacher, some.indices, some.logprobs))) < 1e-6


# plain PEQA in the slow suite only: "peqa-cosine-norms" runs the same pass with more of it, and l4q and pv_tuning
# run its constant schedule without norms
@pytest.fixture(scope="module", params=[pytest.param("peqa", marks=pytest.mark.slow), "peqa-cosine-norms", "l4q",
                                        "pv_tuning"])
def tuned(smol, request):
    """SmolLM2 compressed by PASSES then tuned end to end (PEQA: scales and zero points; L4Q: with rank-4 adapters
    too; PV-Tuning: scales, then a discrete step on the codes) through run_passes; the teacher the pass was
    handed. "peqa-cosine-norms": PEQA's step sizes falling by a cosine, every norm's gain trained too. Every variant
    runs with ``bfloat16: auto`` (bfloat16 autocast where this CPU has bfloat16 matrix instructions: emulated, it
    would take minutes)."""
    model, tok, _ = smol
    calibration = calibration_batches("pydoc", tok, 12, 96, seed=0, heldout_spec="pydoc")
    m = copy.deepcopy(model)
    # L4Q re-rounds every weight when a scale moves: it wants smaller scale steps than PEQA
    kind = request.param.split("-")[0]
    # (PV-Tuning's discrete step follows the gradients of 4 of the 10 training sequences: each is a backward pass)
    tuner = {**PEQA, "type": kind} | ({"rank": 4, "lr": 0.001, "adapter_lr": 0.01} if kind == "l4q" else {}) | (
        {"schedule": "cosine", "norms": True, "norm_lr": 0.01} if request.param.endswith("cosine-norms") else {}) | (
        {"code_samples": 4} if kind == "pv_tuning" else {})
    passes = plan(parse_recipe({"passes": [*PASSES, tuner]}).passes)
    handed = {}
    tune_model = type(passes[-1]).tune_model

    def spy(self, model, teacher, device):
        handed["teacher"] = teacher
        handed["formats"] = {n: mod.fmt for n, mod in model.named_modules()
                             if isinstance(mod, CompressedLinear | CompressedEmbedding)}
        return tune_model(self, model, teacher, device)

    passes[-1].tune_model = spy.__get__(passes[-1])
    result = run_passes(m, passes, calibration, "cpu")
    return m, result.allocation[f"2:{kind}"], handed, calibration


def test_the_teacher_is_the_float_models_top_k(tuned, smol):
    _, _, handed, calibration = tuned
    teacher = handed["teacher"]
    with torch.no_grad():
        logits = smol[0](input_ids=calibration[:4], use_cache=False).logits
    want = Teacher.from_logits(calibration[:4], [logits], 32)
    assert teacher.k == 32 and torch.equal(teacher.tokens, calibration)
    assert (teacher.logprobs[:4] - want.logprobs).abs().max() < 1e-3
    assert (teacher.indices[:4] == want.indices).float().mean() > 0.99  # ties among near-equal logits may swap


def test_tuning_lowers_the_held_out_kl_and_stores_what_it_measured(tuned, request):
    model, info, handed, _ = tuned
    merges_adapters = "l4q" in request.node.callspec.id
    moves_codes = merges_adapters or "pv_tuning" in request.node.callspec.id
    assert info["kept"] and info["tables"] == 15  # 2 blocks x 7 linear layers, and lm_head with the embedding
    # (the embedding is one tied table); 5 steps on 10 x 96 tokens
    assert info["held_out_kl_after"] < (0.99 if merges_adapters else 0.9) * info["held_out_kl_before"]
    teacher = handed["teacher"]
    _, held = _split(len(teacher.tokens), 2)
    assert _held_out_kl(model, teacher, held, "cpu") == pytest.approx(info["held_out_kl_after"], rel=1e-6)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.fmt is head.fmt  # the tied table is still one format object
    moved = []
    for name, before in handed["formats"].items():
        after = model.get_submodule(name).fmt
        assert isinstance(after, QuantizedWeight) and after.spec == before.spec
        moved.append(not torch.equal(after.codes, before.codes))
        if name.startswith("model.layers.1."):
            assert not torch.equal(after.scales, before.scales)
    assert any(moved) == moves_codes  # PEQA never moves a code; L4Q's adapters are merged into them
    gains = [(n, p) for n, p in model.named_parameters() if "norm" in n]
    float_gains = dict(smol_float_gains(request))
    changed = [not torch.equal(p, float_gains[n]) for n, p in gains]
    if "norms" in request.node.callspec.id:  # every gain (2 per block and the final norm's) trained, stored as a
        assert info["norms"] == 61 and all(changed)  # parameter of the model again
        assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0])._parameters["weight"], torch.nn.Parameter)
                   for n, _ in gains)
    else:
        assert info["norms"] == 0 and not any(changed)
    if "pv_tuning" in request.node.callspec.id:  # the discrete step was kept: it lowered the held-out KL
        (step,) = info["discrete_steps"]
        assert step["kept"] and 0 < step["codes_moved"] and step["held_out"] < step["held_out_before"]
        assert step["held_out_before"] == info["held_out_kl_before"]


def smol_float_gains(request):
    """The float model's norm gains (the ``smol`` fixture's, never tuned)."""
    return [(n, p) for n, p in request.getfixturevalue("smol")[0].named_parameters() if "norm" in n]


def _teacher_handed(model, recipe_passes, calibration, stage=None) -> Teacher:
    """The teacher run_passes hands the last pass (a tuner whose tuning is skipped)."""
    passes = plan(parse_recipe({"passes": recipe_passes}).passes)
    handed = {}
    passes[-1].tune_model = lambda model, teacher, device: handed.setdefault("teacher", teacher) and None
    run_passes(model, passes, calibration, "cpu", stage=stage)
    return handed["teacher"]


def test_the_teacher_is_the_float_models_after_a_rotation_fresh_and_resumed(smol, tmp_path):
    """A rotation turns the stream the float model's blocks read: each block's float outputs are taken once the
    block is rotated too (they were taken before, from the unrotated block: a teacher of garbage), and a resumed
    run, whose finished blocks come back compressed, rotates the float block before running it."""
    model, tok, _ = smol
    calibration = calibration_batches("pydoc", tok, 4, 64, seed=0, heldout_spec="pydoc")
    with torch.no_grad():
        want = Teacher.from_logits(calibration, [model(input_ids=calibration, use_cache=False).logits], 8)
    recipe = [{"type": "rotate", "online": True}, {"type": "rtn", "bits": 8, "targets": ["model.layers.[01].*"]},
              {"type": "peqa", "held_out": 1, "top_k": 8}]
    stage = RunStage(tmp_path / "stage", {"run": "rotated"}, "float16")
    fresh = _teacher_handed(copy.deepcopy(model), recipe, calibration, stage)
    resumed = _teacher_handed(copy.deepcopy(model), recipe, calibration,
                              RunStage(tmp_path / "stage", {"run": "rotated"}, "float16", resume=True))
    for teacher in (fresh, resumed):
        assert (teacher.logprobs - want.logprobs).abs().max() < 1e-3
        assert (teacher.indices == want.indices).float().mean() > 0.99  # near-equal logits may swap


@pytest.mark.parametrize("kind", ["int-grid", "code-book"])
def test_the_discrete_step_moves_the_share_of_codes_the_quadratic_model_favours_to_its_minimum(kind):
    """PV-Tuning's discrete step: each code's candidate is the minimum of ``<g, dw> + lam/2 sum F dw^2`` over every
    code it could take (checked by brute force), at most the share moves, downhill, none where the curvature is
    stiff (a column of outlier inputs), and the stored values never change."""
    gen = torch.Generator().manual_seed(2)
    if kind == "int-grid":
        fmt = quantize_rtn(torch.randn(48, 128, generator=gen), QuantSpec(3, 32))
        make = lambda: TrainableGrid(fmt, [], "cpu")  # noqa: E731
        codes, scale, zero = fmt.unpacked()
        values = (torch.arange(8.0) - zero.repeat_interleave(32, 1).unsqueeze(-1)) * scale.repeat_interleave(
            32, 1).unsqueeze(-1)  # [48, 128, 8]: every level each weight could take
    else:
        book = torch.randn(2, 16, 2, generator=gen)
        fmt = VectorWeight.from_codes(torch.randint(0, 16, (48, 64), generator=gen), book,
                                      torch.rand(48, generator=gen) + 0.5, 4, 24)
        values = fmt.codebook.float()[torch.arange(48) // 24].unsqueeze(1) * fmt.row_scale.float()[:, None, None, None]
        make = lambda: TrainableCodebook(fmt, [], "cpu")  # noqa: E731
    grad = torch.randn(48, 128, generator=gen) ** 3  # heavy-tailed, as a loss's gradients are
    curvature = grad.square() + torch.rand(48, 128, generator=gen)
    curvature[:, 7] *= 1e6  # an outlier input column: the loss is stiff in its weights
    best, threshold, lam0 = make().code_model(grad, curvature)
    w = fmt.dequantize()
    for lam in (lam0, 10 * lam0):
        if kind == "int-grid":  # [48, 128, 8]
            dw = values - w.unsqueeze(-1)
            linear, quadratic = grad.unsqueeze(-1) * dw, curvature.unsqueeze(-1) * dw.square() / 2
        else:  # [48, 64, 16]
            dw = values - w.reshape(48, 64, 1, 2)
            linear = (grad.reshape(48, 64, 1, 2) * dw).sum(-1)
            quadratic = (curvature.reshape(48, 64, 1, 2) * dw.square()).sum(-1) / 2
        model = linear + lam * quadratic
        codes, gain = (t.reshape(48, -1) for t in best(lam))
        torch.testing.assert_close(gain, -model.min(-1).values, rtol=1e-4, atol=1e-6)
        assert torch.equal(codes.long(), model.argmin(-1))
    # each code's threshold: the largest lam at which some level or entry still lowers the model
    downhill = torch.where(linear < 0, -linear / quadratic, 0.0).amax(-1)
    torch.testing.assert_close(threshold.reshape(48, -1), downhill, rtol=1e-4, atol=0)
    count = 48 * (128 if kind == "int-grid" else 64)
    some = make()
    moved = some.move_codes(grad, curvature, 0.05)
    assert 0 < moved <= 0.05 * count
    done = some.result()
    dw = done.dequantize() - w
    assert float((grad * dw).sum()) < 0 and (dw != 0).sum() > 0 and not dw[:, 6 if kind == "code-book" else 7].any()
    stored = lambda f: f.scales if kind == "int-grid" else f.codebook  # noqa: E731
    assert torch.equal(stored(done), stored(fmt))
    some.set_code_state(make().code_state())
    assert torch.equal(some.result().dequantize(), fmt.dequantize())


@pytest.mark.parametrize("spec", [QuantSpec(3, 64), QuantSpec(4, 48, symmetric=True), QuantSpec(2, None)],
                         ids=["3-bit-g64", "4-bit-g48-sym", "2-bit-rows"])
def test_an_adapter_starts_at_the_stored_codes_and_merges_into_them_exactly(spec):
    w = torch.randn(40, 120, generator=torch.Generator().manual_seed(1))
    fmt = quantize_rtn(w, spec)
    grid = TrainableGrid(fmt, [], "cpu", zeros=True, rank=4)
    assert torch.equal(grid.weight(), fmt.dequantize()) and torch.equal(grid.result().codes, fmt.codes)
    with torch.no_grad():
        grid.lora_b.normal_(0, 0.05)
        grid.log_factor.normal_(0, 0.1)
        if grid.zero_shift is not None:
            grid.zero_shift.normal_(0, 0.5)
    stored = grid.result()
    assert not torch.equal(stored.codes, fmt.codes)
    grid.log_factor.data = (stored.scales.float() / grid.scale).log()  # the scales as stored, exactly
    torch.testing.assert_close(stored.dequantize(), grid.weight().detach(), rtol=0, atol=1e-6)


def test_a_result_no_better_than_its_input_is_not_stored(smol):
    """With the compressed model as its own teacher the KL starts at its minimum: the tuned scales cannot lower it,
    and the formats stay the very objects they were."""
    model, tok, _ = smol
    calibration = calibration_batches("pydoc", tok, 4, 64, seed=0, heldout_spec="pydoc")
    m = copy.deepcopy(model)
    passes = plan(parse_recipe({"passes": [PASSES[0], PEQA]}).passes)
    run_passes(m, passes[:1], None, "cpu")
    with torch.no_grad():
        teacher = Teacher.from_logits(calibration, [m(input_ids=calibration, use_cache=False).logits], 32)
    formats = {n: mod.fmt for n, mod in m.named_modules() if isinstance(mod, CompressedLinear)}
    gains = {n: p.detach().clone() for n, p in m.named_parameters() if "norm" in n}
    passes[1].cfg.norms = True  # the norms' gains, trained, are not kept either
    info = passes[1].tune_model(m, teacher, "cpu")
    assert not info["kept"] and info["held_out_kl_after"] == info["held_out_kl_before"] and info["norms"] == 61
    assert all(m.get_submodule(n).fmt is f for n, f in formats.items())
    assert all(torch.equal(p, gains[n]) for n, p in m.named_parameters() if "norm" in n)


def test_the_cosine_schedule_falls_from_the_step_size_to_zero_at_the_last_step():
    factor = _step_size_factor("cosine", 40)
    values = [factor(step) for step in range(41)]
    assert values[0] == 1 and values[20] == pytest.approx(0.5) and values[40] == pytest.approx(0, abs=1e-12)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert {_step_size_factor("constant", 40)(step) for step in range(41)} == {1.0}


@pytest.mark.parametrize("recipe, message", [
    ("passes: [{type: peqa}]", "no quantizing pass before it"),
    ("passes: [{type: rtn}, {type: peqa, lr: 0}]", "lr"),
    ("passes: [{type: rtn}, {type: peqa, schedule: linear}]", "schedule"),
    ("passes: [{type: rtn}, {type: pv_tuning, code_share: 0}]", "code_share"),
    ("passes: [{type: pv_tuning}]", "no quantizing pass before it"),
    ("passes: [{type: rtn}, {type: peqa, held_out: 8}]\ncalibration: {samples: 8}", "at least 9 calibration"),
])
def test_bad_plans_are_refused_before_any_compute(write_recipe, tmp_path, recipe, message):
    out = tmp_path / "out"
    result = cli("run", write_recipe(recipe), "smollm2-135m", "--out", out)
    assert result.exit_code != 0 and message in result.output and not out.exists()


def test_the_memory_check_counts_the_whole_model_trained(write_recipe, tmp_path, monkeypatch):
    """A run with peqa is estimated with the whole model decoded for its backward (refused here with the numbers,
    before loading), where the same run without it is estimated one block at a time."""
    import compress.resources

    monkeypatch.setattr(compress.resources, "available_memory", lambda: 0.5e9)
    needs = {}
    for name, passes in (("plain", "[{type: rtn}]"), ("tuned", "[{type: rtn}, {type: peqa}]")):
        result = cli("run", write_recipe(f"passes: {passes}", f"{name}.yaml"), "smollm2-135m", "--out",
                     tmp_path / name, "--quiet")
        assert result.exit_code == 2 and not (tmp_path / name).exists(), result.output
        needs[name] = float(result.stderr.split("needs about ")[1].split(" GB")[0])
        assert ("the whole model trained in float32" in result.stderr) == (name == "tuned")
    assert needs["tuned"] > needs["plain"] + 1.0  # two float32 copies of 135M parameters and more
