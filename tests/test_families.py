"""Block discovery and the checkpoint round trip across decoder families, on tiny random-init
models (shapes only; quality is tested on the real model elsewhere)."""

import numpy as np
import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.families import find_blocks
from compress.models import prepare_for_compression
from compress.modules import CompressedLinear
from compress.pipeline import plan, run_passes
from compress.recipe import parse_recipe

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", TINY),
    "qwen2": ("Qwen2Config", {**TINY, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                              "eos_token_id": 2}),
    "mistral": ("MistralConfig", {**TINY, "sliding_window": 8}),
    "phi3": ("Phi3Config", {**TINY, "sliding_window": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "qwen3": ("Qwen3Config", {**TINY, "head_dim": 16, "eos_token_id": 2}),
    "gemma": ("GemmaConfig", {**TINY, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**TINY, "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24,
                                "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.3,  # caps that bite
                                "initializer_range": 0.5}),
    "gemma3_text": ("Gemma3TextConfig", {**TINY, "head_dim": 16, "sliding_window": 8,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "opt": ("OPTConfig", dict(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)),
    "gpt2": ("GPT2Config", dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
}


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request):
    import transformers

    cls_name, kwargs = FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return request.param, prepare_for_compression(model)


def test_blocks_found_and_every_linear_compressed(tiny, tmp_path, monkeypatch):
    import transformers

    family, model = tiny
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    tokens = torch.randint(0, 96, (4, 16))  # shapes only: random ids are fine for a random model
    recipe = parse_recipe({"passes": [{"type": "awq"}, {"type": "gptq", "bits": 4, "group_size": 32}]})
    with torch.no_grad():
        before = model(input_ids=tokens[:1]).logits
    run_passes(model, plan(recipe.passes), tokens, "cpu")
    linears = [m for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, f"{family}: uncompressed linear layers left in blocks"
    compressed = [m for m in blocks.modules() if isinstance(m, CompressedLinear)]
    assert len(compressed) >= 4
    with torch.no_grad():
        after = model(input_ids=tokens[:1]).logits
    assert torch.isfinite(after).all() and after.shape == before.shape

    class NoTokenizer:  # tiny random models have no tokenizer; the checkpoint stores none
        def save_pretrained(self, folder):
            pass

    save_checkpoint(model, NoTokenizer(), tmp_path, "float32")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    loaded, _ = load_checkpoint(tmp_path)
    with torch.no_grad():
        again = loaded(input_ids=tokens[:1]).logits
    assert torch.allclose(after, again, atol=1e-5)


def test_the_family_table_is_what_the_code_does(tiny):
    """compress/families.py is the one table of family support: AWQ folds exactly where it lists scaling
    groups, structured pruning and the ONNX builder accept exactly the families it marks."""
    from compress.errors import ExportError, PlanError
    from compress.export.llama import check_exportable
    from compress.families import family, scaling_groups

    name, model = tiny
    fam = family(model.config.model_type)
    assert fam.model_type == name
    _, blocks = find_blocks(model)
    assert bool(scaling_groups(name, blocks[0])) == bool(fam.scaling), name
    if fam.onnx_export:
        check_exportable(model)
    else:
        with pytest.raises(ExportError, match=name):
            check_exportable(model)
    recipe = parse_recipe({"passes": [{"type": "structured", "mlp_sparsity": 0.25}]})
    tokens = torch.randint(0, 96, (2, 16))  # shapes only
    if fam.structured_pruning:
        run_passes(model, plan(recipe.passes), tokens, "cpu")
    else:
        with pytest.raises(PlanError, match=name):
            run_passes(model, plan(recipe.passes), tokens, "cpu")


@pytest.mark.parametrize("rope", [{"partial_rotary_factor": 0.5}, {"rope_parameters": {
    "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
    "original_max_position_embeddings": 32}}])
def test_a_rotation_the_graph_cannot_follow_is_refused_naming_it(rope):
    """A rotation over part of each head, or one whose frequencies change with the sequence length (Phi-3's
    longrope), is refused before any compute with what the builder cannot do."""
    import transformers

    from compress.errors import ExportError
    from compress.export.llama import check_exportable

    config = transformers.Phi3Config(**{**FAMILIES["phi3"][1], **rope})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ExportError, match="partial_rotary_factor|longrope"):
        check_exportable(model)


@pytest.mark.parametrize("weights", ["fast", "portable"])
def test_onnx_export_computes_what_transformers_computes(tiny, weights, tmp_path):
    """Every family the ONNX builder accepts (sliding windows shorter than the windows checked, Qwen3's head
    norms, Gemma's scaled embeddings and GELU) validates against transformers: prefill and KV-cache decode
    past the window (random weights and tokens: shapes and arithmetic only), in onnxruntime's fused attention
    (fast) and in standard ops (portable)."""
    from compress.export.onnx import Tolerance, export_to_folder
    from compress.families import family

    name, model = tiny
    if not family(model.config.model_type).onnx_export:
        pytest.skip(f"{name}: refused by the builder (test_the_family_table_is_what_the_code_does)")

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    windows = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    # judged on the logits: saturated soft caps tie many top-1 tokens of a random model
    # prompts prefilled 5 tokens a run (chunked prefill) in onnxruntime-genai, across the sliding window
    info = export_to_folder(model, NoTokenizer(), tmp_path / name, windows=windows, weights=weights, log=lambda m: None,
                            tolerance=Tolerance(max_logit_diff=1e-3, min_top1_agreement=0.0, max_perplexity_diff=1e-4),
                            prefill_chunk=5)
    v = info["validation"]
    assert v["passed"] and v["max_logit_diff"] < 1e-3 and v["decode_max_logit_diff"] < 1e-3, v

    # a left-padded batch: the padded row's logits, prefill and one decode step, are its unpadded ones
    from compress.export.runtime import OnnxCausalLM

    lm, row, pad = OnnxCausalLM(tmp_path / name), windows[0, :20].numpy(), 4
    alone, cache = lm.forward(row[None], lm.empty_cache(1))
    step, _ = lm.forward(row[None, :1], cache)
    batch = np.stack([np.concatenate([np.zeros(pad, np.int64), row[:-pad]]), row])
    mask = np.ones((2, 20), np.int64)
    mask[0, :pad] = 0
    logits, cache = lm.forward(batch, lm.empty_cache(2), mask)
    assert np.abs(logits[0, pad:] - alone[0, :-pad]).max() < 1e-4 and np.abs(logits[1] - alone[0]).max() < 1e-4
    first, _ = lm.forward(row[None, -pad:-pad + 1], lm.forward(row[None, :-pad], lm.empty_cache(1))[1])
    logits, _ = lm.forward(np.stack([row[-pad:-pad + 1], row[:1]]), cache, np.ones((2, 21), np.int64) - (
        np.arange(21) < pad)[None] * np.array([[1], [0]]))
    assert np.abs(logits[0] - first[0]).max() < 1e-4 and np.abs(logits[1] - step[0]).max() < 1e-4
    if weights == "fast":
        _genai_computes_transformers_logits(model, tmp_path / name, windows[1, :12].tolist())


def _genai_computes_transformers_logits(model, folder, prompt):
    """onnxruntime-genai runs the folder as it is (its attention appending to one cache buffer in place): every
    step's logits, past the sliding window (but the end-of-text one, which ``min_length`` rules
    out), are transformers' on the same tokens (logits, not tokens: a random model's top-1 ties)."""
    import json

    import onnxruntime_genai as og

    search = json.loads((folder / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] and search["chunk_size"] < len(prompt)
    og_model = og.Model(str(folder))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False, min_length=len(prompt) + 16)
    generator = og.Generator(og_model, params)
    generator.append_tokens(prompt)
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(np.array(generator.get_output("logits"))[0, -1])
    sequence = list(generator.get_sequence(0))
    assert len(steps) == 16 and sequence[: len(prompt)] == prompt
    with torch.no_grad():
        want = model(torch.tensor([sequence[:-1]])).logits[0, len(prompt) - 1:].float().numpy()
    got = np.stack(steps)
    ruled_out = np.abs(got) > 1e30  # min_length: onnxruntime-genai sets the end-of-text logit to the lowest float
    assert ruled_out.sum(1).max() <= 1
    assert np.abs(np.where(ruled_out, want, got) - want).max() < 1e-3
    # a batch of unequal prompts: onnxruntime-genai pads the shorter on the right, the head reads its last real
    # token, and its new tokens' positions follow its own prompt (the rotation at position_ids, not at the cache's
    # width); it prefills a batch whole (0.18 refuses to chunk one: "batch_size must be 1 for continuous decoding")
    short, pad = prompt[:-4], json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    config = og.Config(str(folder))
    config.overlay(json.dumps({"search": {"chunk_size": 0}}))
    og_model = og.Model(config)
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False, min_length=len(prompt) + 8, batch_size=2)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.array([prompt, [*short, *[pad] * 4]], np.int32))
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        logits = np.array(generator.get_output("logits"))
        assert logits.shape == (2, 1, model.config.vocab_size)  # genai.onnx: the last real token's logits only
        steps.append(logits[1, 0])
    new = [t for t in list(generator.get_sequence(1))[len(prompt):]]
    with torch.no_grad():  # the first step's logits are the short prompt's last token's, not its padding's
        want = model(torch.tensor([[*short, *new[:-1]]])).logits[0, len(short) - 1:].float().numpy()
    got = np.stack(steps)
    ruled_out = np.abs(got) > 1e30
    assert np.abs(np.where(ruled_out, want, got) - want).max() < 1e-3


def test_awq_leaves_every_familys_float_model_unchanged(tiny):
    """AWQ folds its scales into the producers the family table names: wherever it folds, the float model
    computes the same logits (a wrong producer, e.g. a norm that feeds the residual, would not)."""
    name, model = tiny
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))  # shapes only
    with torch.no_grad():
        before = model(input_ids=tokens[:1]).logits
    recipe = parse_recipe({"passes": [{"type": "awq", "search_bits": 4, "search_group_size": 32}]})
    run_passes(model, plan(recipe.passes), tokens, "cpu")
    with torch.no_grad():
        after = model(input_ids=tokens[:1]).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (name, (before - after).abs().max())


def test_awq_folds_into_a_bfloat16_model():
    """A model loaded in bfloat16 runs each block in a float32 copy: AWQ's division of the norm weights made there
    is kept (it was lost once, leaving the quantized layers scaled up against unscaled norms)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    model.model.layers[0].input_layernorm.weight.data.uniform_(0.2, 3)  # channels AWQ rescales
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    tokens = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))  # shapes only
    recipe = parse_recipe({"passes": [{"type": "awq", "search_bits": 3, "search_group_size": 16},
                                      {"type": "rtn", "bits": 8, "group_size": 16}]})
    result = run_passes(model, plan(recipe.passes), tokens, "cpu")
    assert any(r.notes.get("awq_alpha") for r in result.layers.values())
    with torch.no_grad():
        before, after = reference(input_ids=tokens[:1]).logits, model.float()(input_ids=tokens[:1]).logits
    assert (before - after).abs().max() < 0.02 * before.abs().max()


@pytest.mark.parametrize("online", [False, True], ids=["folded", "online"])
def test_rotation_leaves_every_pre_norm_familys_float_model_unchanged(tiny, online):
    """The rotate pass folds a randomized Hadamard rotation into the residual stream (embedding, every layer reading
    or writing it, the untied head) and one into each head's values, and (online) stores the down projections as
    ``W Q`` reading ``x Q`` through a fast transform at run time: the float model's logits are unchanged to 1e-5;
    families it cannot rotate are refused in one line before any compute."""
    from compress.errors import PlanError
    from compress.families import family as family_of

    name, model = tiny
    model = model.double()  # the folding's arithmetic, not float32 rounding, is under test
    for m in model.modules():  # norm gains away from 1, so that folding them is tested
        if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
            m.weight.data.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))  # shapes only
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    passes = plan(parse_recipe({"passes": [{"type": "rotate", "online": online}]}).passes)
    if not family_of(model.config.model_type).residual_writers:
        with pytest.raises(PlanError, match="can be rotated"):
            run_passes(model, passes, tokens, "cpu")
        return
    run_passes(model, passes, tokens, "cpu")
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    attn = model.model.layers[0].self_attn
    q_proj = (getattr(attn, "q_proj", None) or attn.qkv_proj).weight  # Phi-3: q/k/v fused
    assert not torch.allclose(q_proj, q_proj[:, :1].expand_as(q_proj))  # rotated, not collapsed
    assert torch.allclose(before, after, atol=1e-5, rtol=0), (name, (before - after).abs().max())
    rotations = [getattr(m, "input_rotation", None) for m in model.modules()]
    assert sum(r is not None for r in rotations) == (model.config.num_hidden_layers if online else 0)
