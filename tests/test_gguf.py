"""GGUF export, judged by the gguf package's block decoder and by transformers' GGUF loader (and llama.cpp itself
in bench/gguf.py, when llama-cpp-python is installed)."""

import json

import numpy as np
import pytest
import torch
from conftest import SMALL_RUN, cli

from compress.export.gguf import BLOCK, encode, rotary_rows
from compress.formats.base import IntegerGrid

gguf = pytest.importorskip("gguf")


def _grid(bits, symmetric, rows=8, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = cols // BLOCK
    zeros = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8) if symmetric else \
        torch.randint(0, 1 << bits, (rows, groups), generator=g, dtype=torch.uint8)
    return IntegerGrid(torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8),
                       (torch.rand(rows, groups, generator=g) / 8 + 1e-3).half(), zeros, bits, BLOCK, symmetric)


def _ours(grid):
    k = torch.arange(grid.codes.shape[1]) // BLOCK
    return (grid.codes.long() - grid.zeros.long()[:, k]).float() * grid.scales.float()[:, k]


@pytest.mark.parametrize("bits, symmetric, kind", [(4, True, "Q4_0"), (8, True, "Q8_0"), (4, False, "Q4_1"),
                                                (5, True, "Q5_0"), (5, False, "Q5_1")])
def test_blocks_decode_to_our_weights(bits, symmetric, kind):
    """The gguf package's decoder reads our blocks as our weights: exactly for Q4_0 / Q8_0, up to the float16
    minimum for Q4_1 and Q5_1."""
    grid = _grid(bits, symmetric)
    T = getattr(gguf.GGMLQuantizationType, kind)
    data = encode(grid, T)
    assert data.shape == (8, 64 // BLOCK * gguf.GGML_QUANT_SIZES[T][1])
    got = torch.from_numpy(gguf.quants.dequantize(data, T).astype(np.float32))
    want = _ours(grid)
    if symmetric:
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() <= want.abs().max() * 2 ** -10


def test_rotary_rows_interleave_each_heads_halves():
    t = torch.arange(8).reshape(8, 1)  # 2 heads of 4 rows
    assert rotary_rows(t, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gptq_q4_0_file_reads_back_in_transformers(gguf_run):
    """OUT/gguf/model.gguf holds Q4_0 blocks of our codes (GPTQ 4-bit symmetric g32 in blocks 0-1; Q3_K's 576-wide
    fallback in blocks 2-3); transformers' GGUF loader computes our logits; tokenizer and chat template travel in
    the file."""
    out = gguf_run
    info = json.loads((out / "report.json").read_text())["served"]["gguf"]
    assert info["validation"]["passed"] and info["validation"]["max_logit_diff"] < 1e-3
    assert info["types"] == {"Q4_0": 27, "Q3_K": 2} and info["tokenizer_pre"] == "smollm"
    reader = gguf.GGUFReader(out / "gguf" / "model.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.5.attn_q.weight"] == "F16"
    assert kinds["output_norm.weight"] == "F32" and "output.weight" not in kinds  # tied to token_embd
    assert "im_start" in reader.get_field("tokenizer.chat_template").contents()
    assert reader.get_field("tokenizer.ggml.pre").contents() == "smollm"


def test_grids_gguf_cannot_hold_are_refused_before_any_compute(write_recipe, tmp_path):
    recipe = write_recipe(f"name: g\n{SMALL_RUN}passes:\n  - {{type: gptq, bits: 4, group_size: 64}}\n"
                          "export:\n  gguf: {}\n")
    result = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "g", "--quiet")
    assert result.exit_code == 2 and "groups of 32" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "g").exists()


def test_truncated_file_is_caught_by_the_read_back(gguf_run, tmp_path, monkeypatch):
    from compress.export import gguf as writer

    real = writer.write

    def truncated(ckpt, out_dir, *args):
        info = real(ckpt, out_dir, *args)
        f = out_dir / writer.FILE
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return info

    monkeypatch.setattr(writer, "write", truncated)
    result = cli("export", gguf_run, tmp_path / "x", "--format", "gguf", "--windows", "1", "--seq-len", "128")
    assert result.exit_code == 3 and "cannot be read back" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", [pytest.param("qwen2", marks=pytest.mark.slow), "qwen3"])  # the same writer
def test_qwen_families_write_their_own_architecture(family, smol, tmp_path):
    """A Qwen2 (attention biases) and a Qwen3 (query/key norms) model, tiny and random but with the real
    tokenizer, RTN Q4_0 through `compress run`: the file names its architecture, keeps HF's row order (NEOX
    rotary), and transformers' GGUF reader computes our logits."""
    import transformers

    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    tok = smol[1]
    # transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not from the file
    config = cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16 if family == "qwen2" else 128,
                 max_position_embeddings=512,
                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"name: g\n{SMALL_RUN}passes:\n  - {{type: rtn, bits: 4, group_size: 32, symmetric: true}}\n"
                      "export:\n  gguf: {windows: 1, seq_len: 128}\n")
    result = cli("run", recipe, tmp_path / "model", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code in (0, 1), result.output  # random weights: quality budgets are not the point
    info = json.loads((tmp_path / "out" / "report.json").read_text())["served"]["gguf"]
    assert info["validation"]["passed"] and info["validation"]["max_logit_diff"] < 1e-3, info["validation"]
    reader = gguf.GGUFReader(tmp_path / "out" / "gguf" / "model.gguf")
    assert reader.get_field("general.architecture").contents() == family
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3")
