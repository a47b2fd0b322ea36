"""llama.cpp's k-quant grids (gguf-q2_k ... gguf-q6_k): our stored super-blocks judged by the gguf package's decoder,
and a GPTQ run on the Q3_K grid read back from its GGUF file by transformers."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import SMALL_RUN, cli

from compress.formats import KQuantWeight, format_from_saved, quantize_rtn
from compress.formats.kquant import TYPE_SIZE, spec_of
from compress.kquants import KTYPES, expand, split
from compress.quant import decode, encode, fit_params

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def down_proj(smol):
    """A real weight whose inputs (1536) are whole super-blocks, with a dead super-block and a near-dead sub-block."""
    w = smol[0].model.layers[3].mlp.down_proj.weight.detach().float()[:64].clone()
    w[0, :256] = 0
    w[1, :16] *= 1e-4
    return w


@pytest.mark.parametrize("grid", list(KTYPES))
@pytest.mark.parametrize("clip_search", [False, True])
def test_stored_super_blocks_decode_in_the_gguf_package_as_our_weights(down_proj, grid, clip_search):
    """The gguf package decodes our bytes to exactly the values our quantizer chose (bit for bit), the layout's size
    is GGUF's, and a checkpoint's tensors read back to the same format."""
    spec = dataclasses.replace(spec_of(grid), clip_search=clip_search)
    kt = KTYPES[grid]
    groups = down_proj.reshape(down_proj.shape[0], -1, kt.sub_block)
    scale, zero = fit_params(groups, spec)
    ours = decode(encode(groups, scale, zero, spec), scale, zero, spec).reshape(down_proj.shape)
    fmt = quantize_rtn(down_proj, spec)
    assert isinstance(fmt, KQuantWeight) and torch.equal(fmt.dequantize(), ours)
    kind = getattr(gguf.GGMLQuantizationType, kt.name)
    assert fmt.blocks.shape[1] == down_proj.shape[1] // 256 * gguf.GGML_QUANT_SIZES[kind][1] * 1
    assert fmt.bits_per_weight() == 8 * TYPE_SIZE[kt.name] / 256
    theirs = torch.from_numpy(gguf.quants.dequantize(fmt.blocks.numpy(), kind).astype(np.float32))
    assert torch.equal(theirs, ours)
    assert ((ours - down_proj).norm() / down_proj.norm()) < {2: 0.6, 3: 0.3, 4: 0.15, 5: 0.08, 6: 0.04}[kt.bits]
    back = format_from_saved(fmt.meta(), fmt.tensors())
    assert torch.equal(back.dequantize(), ours)


@pytest.mark.parametrize("grid", list(KTYPES))
def test_two_level_scales_split_again_to_the_same_integers(grid):
    """What the fit stores (integers times a float16 factor per super-block) splits back to the same factor and
    integers: the format rebuilds GGUF's bytes from the effective scales alone, even for subnormal factors."""
    kt = KTYPES[grid]
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(6, 4 * 256 // kt.sub_block, generator=g) * torch.tensor([1, 1e-6, 1e-9, 0, 1, 1]).unsqueeze(1)
    if kt.symmetric:
        raw = raw * torch.where(torch.rand(raw.shape, generator=g) < 0.5, -1.0, 1.0)
    factor, ints = split(raw, kt, kt.symmetric)
    lo, hi = kt.scale_range if kt.symmetric else (0, (1 << kt.scale_bits) - 1)
    assert ints.min() >= lo and ints.max() <= hi
    effective = expand(factor, ints, kt)
    again = split(effective, kt, kt.symmetric)
    assert torch.equal(again[0], factor) and torch.equal(again[1], ints)
    assert torch.equal(effective[3], torch.zeros_like(effective[3]))


def test_gptq_on_the_q3_k_grid_reads_back_from_gguf_in_transformers(gguf_run):
    """GPTQ's Q3_K layers (blocks 2-3; down_proj: 1536 inputs) are written as stored, the 576-wide layers on Q3_K's
    fallback size (Q4_0), and transformers' GGUF loader computes our logits."""
    report = json.loads((gguf_run / "report.json").read_text())
    info = report["served"]["gguf"]
    assert info["types"] == {"Q3_K": 2, "Q4_0": 27}
    assert info["validation"]["passed"] and info["validation"]["max_logit_diff"] < 1e-3
    import compress

    model, _ = compress.load(gguf_run)
    stored = model.model.layers[2].mlp.down_proj.fmt
    assert isinstance(stored, KQuantWeight) and stored.kt.name == "Q3_K"
    reader = gguf.GGUFReader(gguf_run / "gguf" / "model.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
    assert tensor.tensor_type.name == "Q3_K"
    assert np.array_equal(np.asarray(tensor.data).reshape(-1), stored.blocks.numpy().reshape(-1))
    formats = {layer["name"]: layer["format"] for layer in report["layers"]}
    assert formats["model.layers.2.mlp.down_proj"].startswith("Q3_K") and formats["model.layers.2.mlp.up_proj"] == \
        "4-bit g32 sym"


@pytest.mark.parametrize("recipe, message", [
    ("passes:\n  - {type: gptq, grid: gguf-q3_k, bits: 4}\n", "has bits 3"),
    ("passes:\n  - {type: magnitude, sparsity: 0.5}\n  - {type: gptq, grid: gguf-q4_k}\n", "after a pruning pass"),
    ("passes:\n  - {type: gptq, grid: gguf-q4_k}\nexport:\n  compressed_tensors: {}\n", "only GGUF holds them"),
    ("passes:\n  - {type: gptq, grid: gguf-q3_k}\n  - {type: peqa}\n", "cannot train the k-quant"),
    ("passes:\n  - {type: rtn, grid: gguf-q3_k}\n  - {type: tune}\n", "cannot train the k-quant"),
])
def test_k_quant_misuse_is_refused_before_any_compute(write_recipe, tmp_path, recipe, message):
    path = write_recipe(f"name: k\n{SMALL_RUN}{recipe}")
    result = cli("run", path, "smollm2-135m", "--out", tmp_path / "k", "--quiet")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "k").exists()


@pytest.mark.parametrize("grid, fallback", [("gguf-q2_k", (4, True)), ("gguf-q3_k", (4, True)),
                                            ("gguf-q4_k", (5, True)), ("gguf-q5_k", (5, False)),
                                            ("gguf-q6_k", (8, True))])
def test_widths_no_multiple_of_256_get_llama_cpps_fallback_grid(grid, fallback):
    """As llama.cpp's quantizer does: a k-quant on 576 inputs becomes the 32-group type it falls back to; 1536 inputs
    keep the k-quant, with the type's bits, sub-block and symmetry."""
    from compress.passes.rtn import RTN, RTNConfig

    rtn = RTN(RTNConfig(grid=grid, clip_search=True))
    kt = KTYPES[grid]
    assert rtn.layer_spec("x", rtn.cfg, 1536) == dataclasses.replace(spec_of(grid), clip_search=True)
    assert (kt.bits, kt.sub_block, kt.symmetric) == (rtn.cfg.bits, rtn.cfg.group_size, rtn.cfg.symmetric)
    narrow = rtn.layer_spec("x", rtn.cfg, 576)
    assert (narrow.bits, narrow.group_size, narrow.symmetric, narrow.grid) == (*fallback[:1], 32, fallback[1], "int")


def test_overrides_mix_k_quant_types_layer_by_layer():
    """llama.cpp's mixes (Q4_K_M: some layers Q6_K) as per-layer overrides: a layer's grid brings its own bits, group
    size and symmetry, to or from a k-quant."""
    from compress.passes.gptq import GPTQConfig

    cfg = GPTQConfig(grid="gguf-q4_k", overrides={"*.down_proj": {"grid": "gguf-q6_k"},
                                                   "*.v_proj": {"grid": "int", "bits": 3}})
    assert cfg.for_layer("m.down_proj").spec().grid == "gguf-q6_k"
    assert (cfg.for_layer("m.down_proj").bits, cfg.for_layer("m.down_proj").group_size) == (6, 16)
    assert (cfg.for_layer("m.v_proj").spec().bits, cfg.for_layer("m.v_proj").spec().group_size) == (3, 128)
    assert cfg.for_layer("m.q_proj").spec() == dataclasses.replace(spec_of("gguf-q4_k"), clip_search=True)


@pytest.mark.parametrize("grid, refit_gain", [("gguf-q3_k", 0.99), ("gguf-q4_k", 1.0)])
def test_gptq_on_a_k_quant_beats_its_round_to_nearest_and_refits_its_scales(smol, grid, refit_gain):
    """Layer 0's down projection (1536 inputs) with the Hessian of its real inputs (the MLP's activations on pydoc
    text): GPTQ's output error is below round to nearest's on the same type, and re-fitting the scales for GPTQ's codes
    (rounded back to the type's integers times a float16 factor) makes no row worse, and Q3_K's layer better (Q4_K's
    6-bit scales round most of the gain away)."""
    from compress.data import calibration_batches
    from compress.hessian import output_error
    from compress.passes.gptq import gptq_quantize

    model, tok, _ = smol
    layer = model.model.layers[0]
    tokens = calibration_batches("pydoc", tok, 2, 256, seed=0, heldout_spec="pydoc").flatten()
    with torch.no_grad():
        x = layer.post_attention_layernorm(model.model.embed_tokens(tokens))
        a = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    h = a.t() @ a / a.shape[0]
    w = layer.mlp.down_proj.weight.detach().float()
    spec = dataclasses.replace(spec_of(grid), clip_search=True)
    plain = gptq_quantize(w, h, spec, refit=False)
    refit = gptq_quantize(w, h, spec, refit=True)
    assert isinstance(refit, KQuantWeight) and torch.equal(refit.unpacked()[0], plain.unpacked()[0])

    def row_error(fmt):
        d = w - fmt.dequantize()
        return ((d @ h) * d).sum(1)

    assert (row_error(refit) <= row_error(plain) * (1 + 1e-5)).all()
    assert output_error(w, refit.dequantize(), h) <= refit_gain * output_error(w, plain.dequantize(), h)
    assert output_error(w, plain.dequantize(), h) < 0.9 * output_error(w, quantize_rtn(w, spec).dequantize(), h)
