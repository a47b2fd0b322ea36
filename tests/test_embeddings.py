"""The `embeddings` pass: SmolLM2's token embedding, tied to its output head, quantized as one table; a lookup
decodes only its rows (in torch and in ONNX); the checkpoint stores it once; GGUF holds it as token_embd, read back
by transformers; compressed-tensors refuses it before any compute."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import cli, compress_copy

from compress.checkpoint import load_checkpoint, round_to_storage, save_checkpoint
from compress.data import calibration_batches, evaluation_windows
from compress.evaluate import evaluate
from compress.export.graph import Graph
from compress.formats import quantize_rtn
from compress.hessian import output_error
from compress.modules import CompressedEmbedding, CompressedLinear, embeddings_tied
from compress.quant import QuantSpec

SPECS = [QuantSpec(4, 32, False), QuantSpec(4, 32, True), QuantSpec(3, 64, False), QuantSpec(8, 48, True),
         QuantSpec(4, 32, True, "nf"), QuantSpec(2, None, False)]


def _table(rows=40, cols=96):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_lookup_decodes_exactly_the_rows_of_the_whole_table(spec):
    fmt = quantize_rtn(_table(), spec)
    ids = torch.tensor([3, 0, 39, 3, 17])
    assert torch.equal(fmt.take_rows(ids), fmt.dequantize()[ids])


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_onnx_gathers_stored_rows_and_decodes_them_as_torch_does(spec):
    import onnxruntime as ort
    from onnx import TensorProto

    fmt = quantize_rtn(_table(), spec)
    g = Graph()
    ids = g.input("ids", TensorProto.INT64, ["batch", "sequence"])
    g.output(fmt.onnx_rows(g, "embed", ids), "rows", TensorProto.FLOAT, ["batch", "sequence", 96])
    model = g.model(21)
    assert all(t.data_type != TensorProto.FLOAT or t.name.endswith("scales") or t.dims in ([], [1]) or
               np.prod(t.dims) < 64 for t in model.graph.initializer)  # no float table is stored
    asked = np.array([[3, 0, 39], [3, 17, 5]], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": asked})[0]
    want = fmt.take_rows(torch.from_numpy(asked).reshape(-1)).reshape(2, 3, 96).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tied_gptq(smol):
    """SmolLM2 with only its tied table quantized (4-bit g32 asymmetric), the head by GPTQ on 8 x 256 calibration
    tokens of pydoc."""
    model, tok, _ = smol
    calibration = calibration_batches("pydoc", tok, 8, 256, seed=0, heldout_spec="pydoc")
    return compress_copy(model, [{"type": "embeddings", "method": "gptq"}], calibration), calibration


def test_one_table_serves_the_lookup_and_the_head(tied_gptq, smol):
    model, _ = tied_gptq
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, CompressedEmbedding) and isinstance(head, CompressedLinear)
    assert emb.fmt is head.fmt and embeddings_tied(model) and emb.fmt.describe() == "4-bit g32 asym"
    ids = torch.tensor([[1, 500, 49151]])
    assert torch.equal(emb(ids)[0], emb.fmt.dequantize()[ids[0]])
    base = smol[0].get_input_embeddings().weight.float()
    assert (emb(ids)[0] - base[ids[0]]).abs().max() < 0.1 * base.abs().max()


def test_gptq_on_the_head_beats_rounding_on_its_own_inputs(tied_gptq, smol):
    """The head's output error on the calibration's final hidden states: GPTQ (error feedback on their Hessian)
    below RTN of the same table on the same grid."""
    from compress.blocks import capture_block_inputs, propagate
    from compress.families import find_blocks
    from compress.pipeline import _head_input_stats  # the Hessian the pass was handed

    model, calibration = tied_gptq
    base = smol[0]
    _, blocks = find_blocks(base)
    hidden = capture_block_inputs(base, blocks, calibration, 4)
    for block in blocks:
        hidden = propagate(block, hidden, "cpu")
    h = _head_input_stats(base, blocks, hidden, calibration, "cpu").mean_hessian()
    w = base.lm_head.weight.detach().float()
    rtn = quantize_rtn(w, QuantSpec(4, 32, False, clip_search=True)).dequantize()
    ours = output_error(w, model.lm_head.fmt.dequantize(), h)
    assert ours < 0.9 * output_error(w, rtn, h)


def test_checkpoint_stores_the_tied_table_once_and_reads_it_back(tied_gptq, smol, tmp_path):
    model, _ = tied_gptq
    tok = smol[1]
    content = save_checkpoint(model, tok, tmp_path)
    meta = json.loads((tmp_path / "compress.json").read_text())
    assert meta["layers"]["lm_head"] == {"kind": "tied", "to": "model.embed_tokens"}
    assert "model.embed_tokens.weight" not in content.tensors and "lm_head.codes" not in content.tensors
    table = model.model.embed_tokens.fmt  # every other tensor in float16, the table once in its format
    assert content.nbytes() == 2 * (smol[0].num_parameters() - table.numel) + table.nbytes()
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.model.embed_tokens.fmt is loaded.lm_head.fmt
    assert all(torch.equal(t, table.tensors()[k]) for k, t in loaded.lm_head.fmt.tensors().items())
    model = copy.deepcopy(model)
    round_to_storage(model, "float16")  # what the run does before it evaluates: the stored model
    windows = evaluation_windows("pydoc", tok, 128, 2, "pydoc")
    # evaluated as the run evaluates (block by block): the model and its checkpoint agree (to 1e-4: the model in
    # memory also rounded its rotary buffers to float16, which a loaded model recomputes)
    assert evaluate(loaded, windows)[0].perplexity == pytest.approx(evaluate(model, windows)[0].perplexity, rel=1e-4)


def _run(write_recipe, tmp_path, export: str, name="r"):
    recipe = write_recipe(
        f"name: {name}\ncalibration: {{dataset: pydoc, samples: 4, seq_len: 128}}\n"
        "evaluate: {dataset: pydoc, seq_len: 128, max_windows: 2}\npasses:\n"
        "  - {type: rtn, bits: 4, group_size: 32, symmetric: true, targets: ['model.layers.[0-1].*']}\n"
        "  - {type: embeddings, bits: 4, group_size: 32, symmetric: true}\n"
        f"export:\n{export}", f"{name}.yaml")
    return cli("run", recipe, "smollm2-135m", "--out", tmp_path / name, "--quiet")


def test_gguf_holds_the_table_as_token_embd(gguf_run):
    """GGUF holds the tied table (`embeddings`, 4-bit g32 symmetric) as Q4_0 token_embd and no output tensor
    (llama.cpp and transformers tie it); transformers' GGUF reader computes our logits."""
    gguf = pytest.importorskip("gguf")
    report = json.loads((gguf_run / "report.json").read_text())
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["model.embed_tokens"]["format"] == "4-bit g32 sym" and layers["model.embed_tokens"]["tied"]
    served = report["served"]["gguf"]
    assert served["validation"]["passed"] and served["validation"]["max_logit_diff"] < 1e-3, served
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_run / "gguf" / "model.gguf").tensors}
    assert kinds["token_embd.weight"] == "Q4_0" and "output.weight" not in kinds


def test_onnx_keeps_the_tied_table_packed(write_recipe, tmp_path, ortops_library):
    """ONNX validated against PyTorch with the table gathered from the head's codes, stored once; the head runs in
    our GridMatMul from those same initializers (MatMulNBits would hold a prepacked copy)."""
    result = _run(write_recipe, tmp_path, "  onnx: {windows: 1, seq_len: 128}\n")
    assert result.exit_code in (0, 1), result.output  # 1: a budget; no budgets here
    out = tmp_path / "r"
    report = json.loads((out / "report.json").read_text())
    onnx_info = json.loads((out / "onnx" / "export.json").read_text())
    assert onnx_info["validation"]["passed"] and onnx_info["io"]["tied_embeddings"]
    head = onnx_info["layers"]["lm_head"]
    assert head["lowering"].startswith("GridMatMul 4-bit") and "shared with the token embedding" in head["lowering"]
    assert head["file_bytes"] > 49152 * 576 / 2  # the table's codes, counted once, with the head
    # the table is never stored in float: the ONNX file is smaller than the float16 table alone would make it
    table_fp16 = 2 * 49152 * 576
    assert onnx_info["size"]["file_bytes"] < report["size"]["checkpoint_bytes"] + table_fp16 / 2


@pytest.mark.parametrize("fmt", ["compressed_tensors", "gptq"])
def test_engines_without_quantized_embeddings_refuse_before_any_compute(fmt, write_recipe, tmp_path):
    result = _run(write_recipe, tmp_path, f"  {fmt}: {{}}\n", name=fmt)
    assert result.exit_code == 2 and "token embedding" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / fmt).exists()


def test_bad_options_are_refused_at_validation(write_recipe, tmp_path):
    recipe = write_recipe("name: b\npasses:\n  - {type: embeddings, bits: 9}\n")
    result = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "b", "--quiet")
    assert result.exit_code == 2 and "bits" in result.output and not (tmp_path / "b").exists()
