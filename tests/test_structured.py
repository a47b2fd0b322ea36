"""Structured pruning: physically smaller tensors and config, loadable with plain transformers."""

import copy
import json

import pytest
import torch
from conftest import RECIPES, cli
from transformers import AutoModelForCausalLM

from compress.data import calibration_batches
from compress.errors import PlanError, RecipeError
from compress.pipeline import plan, run_passes
from compress.recipe import load_recipe, parse_recipe


def kept_rows(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """Which rows of ``big`` survive in ``small`` (rows were copied, so they match exactly)."""
    return torch.tensor([int((big == row).all(1).nonzero()[0]) for row in small])


@pytest.mark.slow  # the width25 recipe test covers the default suite
def test_shrunk_model_computes_what_the_masked_model_computes(smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 4, 256, seed=0, heldout_spec="pydoc")
    small = copy.deepcopy(model)
    result = run_passes(small, plan(parse_recipe({"passes": [
        {"type": "structured", "mlp_sparsity": 0.3, "attention_groups": 1}]}).passes), calib, "cpu")
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for big, little in zip(masked.model.layers, small.model.layers, strict=True):
            keep = kept_rows(little.mlp.gate_proj.weight, big.mlp.gate_proj.weight)
            drop = torch.ones(big.mlp.gate_proj.out_features, dtype=torch.bool)
            drop[keep] = False
            big.mlp.down_proj.weight[:, drop] = 0  # a zeroed channel contributes nothing
            q_keep = kept_rows(little.self_attn.q_proj.weight, big.self_attn.q_proj.weight)
            q_drop = torch.ones(big.self_attn.q_proj.out_features, dtype=torch.bool)
            q_drop[q_keep] = False
            big.self_attn.o_proj.weight[:, q_drop] = 0  # the dropped heads' outputs are never read
    assert small.config.intermediate_size == 1536 - round(1536 * 0.3)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (6, 2, 64)
    ids = calib[:2]
    with torch.no_grad():
        a, b = masked(input_ids=ids).logits, small(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert result.layers["model.layers.0.mlp.down_proj"].shape == (576, 1075)


def test_width25_recipe_shrinks_and_loads_with_plain_transformers(tmp_path, smol):
    out = tmp_path / "w"
    result = cli("run", RECIPES / "width25-structured.yaml", "smollm2-135m", "--out", out, "--quiet",
                 "--set", "calibration.samples=8", "--set", "calibration.seq_len=256",
                 "--set", "evaluate.max_windows=2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    before, after = report["model"]["parameters"], report["model"]["parameters_after"]
    assert after <= 0.8 * before
    assert (out / "model.safetensors").stat().st_size <= 0.8 * report["size"]["base_fp16_bytes"]
    plain = AutoModelForCausalLM.from_pretrained(out)  # no compress code involved
    assert sum(p.numel() for p in plain.parameters()) == after
    assert plain.model.layers[0].mlp.down_proj.in_features == 1152
    assert report["compressed"]["perplexity"] > 0


def test_drop_layers_removes_the_least_influential_blocks(smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 4, 256, seed=0, heldout_spec="pydoc")
    small = copy.deepcopy(model)
    result = run_passes(small, plan(parse_recipe({"passes": [{"type": "structured", "drop_layers": 3}]}).passes),
                        calib, "cpu")
    info = result.allocation["0:structured"]
    assert len(small.model.layers) == small.config.num_hidden_layers == 27
    influence = info["block_influence"]
    assert sorted(sorted(influence, key=influence.get)[:3]) == info["dropped_layers"]
    assert [b.self_attn.layer_idx for b in small.model.layers] == list(range(27))
    assert "model.layers.26.mlp.down_proj" in result.layers and "model.layers.27.mlp.down_proj" not in result.layers
    out = small.generate(calib[:1, :16], max_new_tokens=4, do_sample=False)  # the KV cache still lines up
    assert out.shape == (1, 20)


def test_target_parameters_sets_the_width(smol):
    model, tok, _ = smol
    calib = calibration_batches("pydoc", tok, 2, 128, seed=0, heldout_spec="pydoc")
    small = copy.deepcopy(model)
    run_passes(small, plan(parse_recipe({"passes": [{"type": "structured", "target_parameters": 0.2}]}).passes),
               calib, "cpu")
    cut = 1 - sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert 0.2 <= cut < 0.201


def test_structured_options_and_order_are_checked(write_recipe):
    with pytest.raises(RecipeError, match="needs mlp_sparsity"):
        load_recipe(write_recipe("passes:\n  - type: structured\n"))
    with pytest.raises(RecipeError):
        load_recipe(write_recipe("passes:\n  - type: structured\n    mlp_sparsity: 1.0\n"))
    with pytest.raises(PlanError, match="must come before"):
        plan(load_recipe(write_recipe("passes:\n  - type: wanda\n  - type: structured\n    drop_layers: 1\n")).passes)
