"""ONNX export on the real model: every weight format's lowering checked in onnxruntime against
PyTorch, greedy generation through the exported KV cache, the run integration, and bad input."""

import collections
import copy
import json
import re
import shutil

import onnx
import pytest
import torch
from conftest import RECIPES, cli

from compress.data import evaluation_windows
from compress.errors import ExportError
from compress.export.onnx import Tolerance, export_to_folder
from compress.export.runtime import OnnxCausalLM, eos_ids, session_memory, torch_greedy
from compress.formats import DenseWeight, KQuantWeight, OutlierWeight, SparseWeight, WeightFormat, compact, quantize_rtn
from compress.formats.kquant import spec_of
from compress.modules import CompressedLinear
from compress.passes.gptvq import GPTVQConfig, gptvq_quantize
from compress.passes.kmeans import KMeansConfig, palettize
from compress.quant import QuantSpec

# One format per layer of the model, in turn (layer i gets entry i % 14): a single export exercises every lowering.
# (layer, format, the lowering the exporter must choose: a runtime kernel on the codes wherever one reads them)
FORMATS = [
    ("self_attn.q_proj", lambda w: quantize_rtn(w, QuantSpec(4, 64)), "MatMulNBits 4-bit block 64"),
    ("self_attn.k_proj", lambda w: quantize_rtn(w, QuantSpec(3, None)),
     "GridMatMul 3-bit g576 (integer grid, float activations)"),
    ("self_attn.v_proj", lambda w: quantize_rtn(w, QuantSpec(2, 32, symmetric=True)),
     "GridMatMul 2-bit g32 (integer grid, float activations)"),
    ("self_attn.o_proj", lambda w: quantize_rtn(w, QuantSpec(4, 64, grid="nf")), "GridMatMul NF4 g64"),
    ("mlp.gate_proj", lambda w: palettize(w, KMeansConfig(type="kmeans", bits=3, outliers=0.005,
                                                           table_dtype="int8", iterations=10)),
     "LutMatMul 3-bit palette per channel int8 table + "),
    ("mlp.up_proj", lambda w: _sparse(w, lambda kept: quantize_rtn(kept, QuantSpec(4, 64)), None),
     "SparseMatMul 50% sparse + 4-bit g64"),
    ("mlp.down_proj", lambda w: _sparse(w, lambda kept: DenseWeight(kept, torch.float16), "2:4"),
     "SparseMatMul 2:4"),
    ("mlp.up_proj", lambda w: _sparse(w, lambda kept: quantize_rtn(kept, QuantSpec(4, 32, symmetric=True)), "2:4"),
     "MatMulNBits 4-bit block 64"),
    ("mlp.gate_proj", lambda w: _outliers(quantize_rtn(w, QuantSpec(3, 64, symmetric=True)), w, 0.005),
     "GridMatMul 3-bit g64 (integer grid, float activations) + "),
    ("mlp.down_proj", lambda w: palettize(w, KMeansConfig(type="kmeans", bits=4, iterations=10)),
     "LutMatMul 4-bit palette per channel"),
    ("self_attn.o_proj", lambda w: quantize_rtn(w, QuantSpec(4, 32, grid="fp4")),
     "2 x MatMulNBits 4-bit block 32 (8-bit codes as two nibble planes), FP4 as its exact integer grid"),
    ("mlp.up_proj", lambda w: gptvq_quantize(w, torch.eye(w.shape[1]), GPTVQConfig(
        bits=3, iterations=3, codebook_refit=0, codebook_dtype="int8")), "LutMatMul 3-bit vectors of 2, 64-entry int8"),
    ("mlp.down_proj", lambda w: quantize_rtn(w, spec_of("gguf-q3_k")), "GridMatMul Q3_K"),
    ("mlp.down_proj", lambda w: quantize_rtn(w, spec_of("gguf-q4_k")), "GridMatMul Q4_K"),
]


def _outliers(inner, w, share):
    err = (w - inner.dequantize()).abs()
    return OutlierWeight.from_mask(inner, w, err >= err.flatten().kthvalue(int(err.numel() * (1 - share))).values)


def _sparse(w, inner, pattern):
    if pattern == "2:4":
        keep = w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
        mask = torch.zeros(w.shape[0], w.shape[1] // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(w.shape)
    else:  # every row keeps its largest half (SparseWeight needs the same count per row)
        mask = torch.zeros(w.shape, dtype=torch.bool).scatter_(1, w.abs().topk(w.shape[1] // 2, dim=1).indices, True)
    return SparseWeight(mask, inner(compact(w, mask)), pattern)


@pytest.fixture(scope="module")
def mixed(smol, ortops_library):
    """The real model with one layer of every block compressed, in turn through the formats above (all
    seven layers of a block in crude formats without calibration would leave a broken model whose
    logits amplify float rounding); the other layers stay dense float16."""
    model, tok, _ = smol
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.model.layers):
        path, make, _ = FORMATS[i % len(FORMATS)]
        parent, _, child = path.rpartition(".")
        old = layer.get_submodule(path)
        setattr(layer.get_submodule(parent), child, CompressedLinear.from_module(old, make(old.weight.detach())))
    return model, tok


@pytest.fixture(scope="module")
def windows(smol):
    return evaluation_windows("pydoc", smol[1], 128, 2, "pydoc")


@pytest.fixture(scope="module")
def mixed_export(mixed, windows, tmp_path_factory):
    model, tok = mixed
    out = tmp_path_factory.mktemp("onnx") / "mixed"
    # crude formats without calibration leave near-ties: 2 of 256 positions swap their top-1 at |logit diff| 0.03
    # (each lowering alone is exact to float32 rounding: test_each_lowering_computes_the_formats_product)
    info = export_to_folder(model, tok, out, windows=windows, dense_dtype=torch.float16, log=lambda m: None,
                            tolerance=Tolerance(min_top1_agreement=0.99))
    return out, info


def test_every_format_exports_and_matches_pytorch(mixed_export, mixed):
    out, info = mixed_export
    v = info["validation"]
    assert v["passed"], v["failures"]
    assert v["max_logit_diff"] < 0.05 and v["decode_max_logit_diff"] < 0.05 and v["top1_agreement"] >= 0.99
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "onnxruntime" in card and f"{v['perplexity_onnx']:.4g}" in card
    layers = info["layers"]
    for i, (path, _, expected) in enumerate(FORMATS):
        lowering = layers[f"model.layers.{i}.{path}"]["lowering"]
        assert lowering.startswith(expected), (path, lowering)
        assert "outliers" not in lowering or lowering.endswith("outliers (OutlierAdd)"), lowering
    assert layers["model.layers.0.mlp.up_proj"]["lowering"] == "HalfMatMul float16"
    assert layers["lm_head"]["lowering"] == "tied to model.embed_tokens, HalfMatMul float16"
    # the file keeps the compression: in-graph decoding stores the checkpoint's bytes; MatMulNBits the codes
    # (widened to 2/4/8 bits, padded to whole blocks), zero points, float32 scales; outliers float32 corrections
    compressed = {n: m.fmt for n, m in mixed[0].named_modules() if isinstance(m, CompressedLinear)}
    for name, fmt in compressed.items():
        lowering = layers[name]["lowering"]
        if "MatMulNBits" in lowering:  # "2 x": an 8-bit grid as two 4-bit nibble planes
            width, block = (int(w) for w in re.search(r"MatMulNBits (\d)-bit block (\d+)", lowering).groups())
            planes = 2 if lowering.startswith("2 x") else 1
            rows, blocks = fmt.shape[0], -(-fmt.shape[1] // block)
            zero_bytes = rows * -(-blocks * width // 8)
            expected = planes * (rows * blocks * (block * width // 8 + 4) + zero_bytes)
            if isinstance(fmt, OutlierWeight):
                expected += fmt.columns.nbytes + fmt.counts.nbytes + 4 * fmt.values.numel()
            assert expected - planes * zero_bytes <= layers[name]["file_bytes"] <= expected + 256, name
        elif "LutMatMul" in lowering:  # the checkpoint's codes and tables; an int8 table's scale per row
            inner = fmt.inner if isinstance(fmt, OutlierWeight) else fmt
            expected = inner.nbytes() + (2 * fmt.shape[0] - inner.table_scale.nbytes
                                         if getattr(inner, "table_scale", None) is not None else 0)
            if isinstance(fmt, OutlierWeight):
                expected += fmt.columns.nbytes + fmt.counts.nbytes + 4 * fmt.values.numel()
            assert expected <= layers[name]["file_bytes"] <= expected + 256, name
        elif "GridMatMul" in lowering:  # codes packed, float32 scales (and offsets) per group, an NF code book
            rows, cols = fmt.shape  # or an integer grid's packed zero points (3-bit codes as they are)
            inner = fmt.inner if isinstance(fmt, OutlierWeight) else fmt
            kquant = isinstance(inner, KQuantWeight)
            bits, group, offsets = ((inner.kt.bits, inner.kt.sub_block, not inner.kt.symmetric) if kquant
                                    else (inner.spec.bits, inner.spec.group_size or cols, False))
            expected = rows * -(-cols * bits // 8) + 4 * rows * -(-cols // group) * (2 if offsets else 1)
            expected += 4 << bits if not kquant and inner.spec.grid == "nf" else 0
            integer = not kquant and inner.spec.grid == "int"
            expected += rows * -(-cols // group * bits // 8) if integer and not inner.spec.symmetric else 0
            if isinstance(fmt, OutlierWeight):
                expected += fmt.columns.nbytes + fmt.counts.nbytes + 4 * fmt.values.numel()
            assert expected <= layers[name]["file_bytes"] <= expected + 256, name
        elif "MatMulBnb4" in lowering:  # two codes a byte, a float32 absmax per block (the activation type)
            rows, cols = fmt.shape
            assert layers[name]["file_bytes"] == rows * cols // 2 + 4 * rows * cols // fmt.spec.group_size, name
        else:
            assert fmt.nbytes() <= layers[name]["file_bytes"] <= fmt.nbytes() + 256, (name, fmt.describe())
    on_disk = (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert on_disk == info["size"]["file_bytes"]
    # every initializer in the data file starts on a page (no page shared by two of onnxruntime's mappings)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(offsets) > 100 and all(offset % 4096 == 0 for offset in offsets)


RUNTIME_FORMATS = [lambda w: quantize_rtn(w, QuantSpec(3, 64)),
                   lambda w: quantize_rtn(w, QuantSpec(2, 64)),
                   lambda w: _sparse(w, lambda kept: quantize_rtn(kept, QuantSpec(4, 32, symmetric=True)), "2:4"),
                   lambda w: _outliers(quantize_rtn(w, QuantSpec(3, 64, symmetric=True)), w, 0.005),
                   lambda w: quantize_rtn(w, QuantSpec(4, 128)),
                   lambda w: palettize(w, KMeansConfig(type="kmeans", bits=4, table_dtype="int8", iterations=5)),
                   lambda w: quantize_rtn(w, QuantSpec(4, 64, grid="nf")),
                   lambda w: quantize_rtn(w, QuantSpec(4, 64, grid="fp4")),
                   lambda w: quantize_rtn(w, QuantSpec(3, 64, grid="nf")),
                   lambda w: palettize(w, KMeansConfig(type="kmeans", bits=3, iterations=5)),
                   lambda w: _sparse(w, lambda kept: DenseWeight(kept), None),
                   lambda w: _sparse(w, lambda kept: DenseWeight(kept), "2:4"),
                   lambda w: _sparse(w, lambda kept: quantize_rtn(kept, QuantSpec(4, 64)), None),
                   lambda w: gptvq_quantize(w, torch.eye(w.shape[1]), GPTVQConfig(bits=2, iterations=2,
                                                                                  codebook_refit=0))]


def test_runtime_kernels_keep_the_session_compressed(smol, ortops_library, tmp_path):
    """Every linear layer in a format a runtime kernel reads from its codes: 3-bit as stored, 2:4 over 4-bit as dense
    codes, outliers over 3-bit, 4-bit, FP4 as its 8-bit integer grid; 2-bit, NF4, NF3 in our grid kernel; palettes with
    int8 and float16 tables and vector code books in our look-up kernel; pruned float16 values (unstructured, 2:4)
    and pruned values on a 4-bit grid in our sparse kernel. No layer is decoded to float32 when the session loads,
    and the tied float16 head is multiplied as float16 (no float32 copy). Its memory, measured in a child process
    (numpy and onnxruntime only), stays within 1.5x the file plus a working allowance."""
    model, tok, _ = smol
    model = copy.deepcopy(model)
    linears = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (name, old) in enumerate(linears):
        parent, _, child = name.rpartition(".")
        fmt = RUNTIME_FORMATS[i % len(RUNTIME_FORMATS)](old.weight.detach())
        setattr(model.model.layers.get_submodule(parent), child, CompressedLinear.from_module(old, fmt))
    info = export_to_folder(model, tok, tmp_path / "kernels", windows=None, dense_dtype=torch.float16,
                            log=lambda m: None)
    assert all(re.match("MatMulNBits|2 x MatMulNBits|GridMatMul|LutMatMul|SparseMatMul", k) for k in info["lowerings"]
               if not k.startswith("tied to model.embed_tokens")), info["lowerings"]
    assert (tmp_path / "kernels" / info["custom_ops_library"]).is_file()
    memory = session_memory(tmp_path / "kernels", threads=2, prefill=32, decode=4)
    working = 64 * 2**20  # the arena, prepacking buffers and a 32-token prefill's activations
    assert memory["session_mb"] * 2**20 <= 1.5 * info["size"]["file_bytes"] + working, memory
    # the bound has room for less than half the layers decoded to float32
    assert 4 * sum(old.weight.numel() for _, old in linears) / 2 > working + 0.5 * info["size"]["file_bytes"]


def test_onnxruntime_genai_generates_our_greedy_tokens(mixed_export, mixed, windows):
    """onnxruntime-genai opens the export folder (its genai_config.json) and its generator's greedy tokens are
    PyTorch's, the prompt prefilled in chunks of 128 tokens (genai_config's ``search.chunk_size``)."""
    import onnxruntime_genai as og

    out, _ = mixed_export
    model, tok = mixed
    prompt = torch.cat([windows[0], windows[1, :32]]).tolist()  # 160 tokens of pydoc
    assert json.loads((out / "genai_config.json").read_text())["search"]["chunk_size"] == 128 < len(prompt)
    og_model = og.Model(str(out))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(prompt)
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    want = torch_greedy(model, prompt, 16, eos_ids(tok)).tokens
    assert got[: len(want)] == want and len(want) >= 8
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 30


def test_genai_graph_reads_each_rows_last_real_token(mixed_export, windows):
    """genai.onnx (what genai_config.json names) gives one position's logits a row: the last real token's of
    model.onnx, in right- and left-padded batches, for a prompt and for a decode step after it."""
    import numpy as np

    from compress.export.runtime import session

    out, info = mixed_export
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "genai.onnx"
    full = OnnxCausalLM(out)
    last = OnnxCausalLM.from_session(session(out / "genai.onnx", custom_ops=out / info["custom_ops_library"]),
                                     info["io"], info["weights"])
    assert not last.keeps_logits and last.session.get_outputs()[0].shape[1] == 1
    graph = onnx.load(str(out / "genai.onnx"), load_external_data=False).graph
    read = {name for n in graph.node for name in n.input}
    assert all(t.name in read for t in graph.initializer)  # the same weights as model.onnx, nothing left unread
    row, pad = windows[1, :24].numpy(), 5
    for left in (False, True):
        short = np.concatenate([np.zeros(pad, np.int64), row[:-pad]]) if left else np.concatenate(
            [row[:-pad], np.zeros(pad, np.int64)])
        mask = np.ones((2, 24), np.int64)
        if left:
            mask[0, :pad] = 0
        else:
            mask[0, -pad:] = 0
        batch = np.stack([short, row])
        want, cache = full.forward(batch, full.empty_cache(2), mask)
        got, _ = last.forward(batch, last.empty_cache(2), mask)
        ends = [23 if left else 23 - pad, 23]
        assert got.shape == (2, 1, want.shape[-1])
        assert np.abs(got[:, 0] - want[[0, 1], ends]).max() < 1e-4
        step, step_mask = np.array([[7], [7]]), np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        want, _ = full.forward(step, cache, step_mask)
        got, _ = last.forward(step, cache, step_mask)
        assert np.abs(got - want).max() < 1e-4


def test_greedy_tokens_match_pytorch_through_the_kv_cache(mixed_export, mixed, windows):
    out, _ = mixed_export
    model, tok = mixed
    prompt = windows[1, :32].tolist()
    lm = OnnxCausalLM(out)
    got = lm.greedy(prompt, 24, eos_ids(tok))
    want = torch_greedy(model, prompt, 24, eos_ids(tok))
    assert got.tokens == want.tokens and len(got.tokens) == 24


def test_decode_loop_appends_to_one_cache_buffer_with_forwards_logits(mixed_export, windows):
    """A fast graph's decode steps write their keys and values into the prefill's cache buffer (no new cache a
    step) and give the logits of the plain forward, whose cache grows by concatenation; the buffer's end is an
    error, not a silent overwrite."""
    import numpy as np

    from compress.export.decode_loop import DecodeLoop

    out, _ = mixed_export
    lm = OnnxCausalLM(out)
    prompt = windows[1, :32].tolist()
    loop = DecodeLoop(lm.session, lm.meta["io"], in_place=True)
    logits = loop.prefill(prompt, len(prompt) + 4)
    buffers = [value.data_ptr() for value in loop.cache]
    want, cache = lm.forward(np.array([prompt]), lm.empty_cache(1))
    assert np.abs(logits - want[0, -1]).max() < 1e-4
    for _ in range(4):
        token = int(logits.argmax())
        logits = loop.step(token)
        want, cache = lm.forward(np.array([[token]]), cache)
        assert np.abs(logits - want[0, -1]).max() < 1e-4
    assert [value.data_ptr() for value in loop.cache] == buffers
    assert loop.cache[0].shape() == [1, lm.kv_heads, len(prompt) + 4, lm.head_dim]
    with pytest.raises(ValueError, match="holds 36 positions"):
        loop.step(int(logits.argmax()))


@pytest.mark.parametrize("in_place", [True, False])
def test_chunked_prefill_gives_the_whole_prompts_logits(mixed_export, windows, in_place):
    """A prompt prefilled 10 tokens a run (the last run shorter) gives the logits, next steps and cache of the
    whole prompt at once; in place, the steps write into the buffers the chunks wrote."""
    import numpy as np

    from compress.export.decode_loop import DecodeLoop

    out, info = mixed_export
    lm = OnnxCausalLM(out)
    assert info["prefill_chunk"] == lm.prefill_chunk == 128
    prompt = windows[1, :32].tolist()
    whole = DecodeLoop(lm.session, lm.meta["io"], in_place, chunk=0)
    chunked = DecodeLoop(lm.session, lm.meta["io"], in_place, chunk=10)
    want, got = whole.prefill(prompt, 34).copy(), chunked.prefill(prompt, 34)
    assert np.abs(got - want).max() < 1e-4 and chunked.length == 32
    buffers = [value.data_ptr() for value in chunked.cache]
    for _ in range(2):
        token = int(want.argmax())
        want, got = whole.step(token).copy(), chunked.step(token)
        assert np.abs(got - want).max() < 1e-4
    assert ([value.data_ptr() for value in chunked.cache] == buffers) == in_place
    cached = [value.numpy() for value in chunked.cache]
    assert all(np.abs(a - b.numpy()).max() < 1e-4 for a, b in zip(cached, whole.cache, strict=True))


def _left_padding_changes_nothing(folder):
    """A prompt left-padded in a batch beside a longer one gets the logits it gets alone, prompt and next step."""
    import numpy as np

    lm = OnnxCausalLM(folder)
    long, short = list(range(300, 340)), list(range(500, 520))
    mask = np.array([[1] * 40, [0] * 20 + [1] * 20])
    logits, cache = lm.forward(np.array([long, [0] * 20 + short]), lm.empty_cache(2), mask)
    alone, alone_cache = lm.forward(np.array([short]), lm.empty_cache(1))
    assert np.abs(logits[1, 20:] - alone[0]).max() < 1e-3
    # logits_to_keep: the head reads the last positions only, the same values
    last, _ = lm.forward(np.array([long, [0] * 20 + short]), lm.empty_cache(2), mask, keep=1)
    assert lm.keeps_logits and last.shape == (2, 1, logits.shape[2])
    assert np.abs(last - logits[:, -1:]).max() < 1e-3
    step = logits[:, -1].argmax(-1)[:, None]
    logits, _ = lm.forward(step, cache, np.concatenate([mask, np.ones((2, 1), np.int64)], 1))
    alone, _ = lm.forward(step[1:], alone_cache)
    assert np.abs(logits[1] - alone[0]).max() < 1e-3


def test_portable_export_uses_standard_ops_only(mixed, windows, tmp_path):
    model, tok = mixed
    info = export_to_folder(model, tok, tmp_path / "portable", windows=windows[:1], weights="portable",
                            dense_dtype=torch.float16, log=lambda m: None, tolerance=Tolerance(min_top1_agreement=0.98))
    assert info["validation"]["passed"], info["validation"]["failures"]
    proto = onnx.load(str(tmp_path / "portable" / "model.onnx"), load_external_data=False)
    assert {o.domain for o in proto.opset_import} == {""} and info["opset"] == 25  # 2-bit DequantizeLinear
    assert not any(n.domain for n in proto.graph.node)
    # every integer grid (4-bit q, 3-bit k widened, 2-bit v, the int8-table palette, 2:4 over 4-bit, outliers over
    # 3-bit, FP4 as its integer grid; entries 0, 1, 2, 4, 7, 8, 10 of the 14): 16 of the 30 layers
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 16
    # a prompt prefilled in chunks (past and new keys concatenated in standard ops) ends as the whole prompt does
    lm, prompt = OnnxCausalLM(tmp_path / "portable"), windows[1, :32].tolist()
    whole, chunked = lm.decode_loop(0).prefill(prompt, 32).copy(), lm.decode_loop(10).prefill(prompt, 32)
    assert abs(chunked - whole).max() < 1e-4


def test_run_exports_onnx_and_generate_agrees_with_checkpoint(w4_rtn_run):
    out, report = w4_rtn_run
    onnx_info = report["onnx"]
    assert onnx_info["validation"]["passed"]
    assert onnx_info["lowerings"]["MatMulNBits 4-bit block 128"] == 210
    # the fast graph: per block one fused attention, two fused add + norm, q/k/v and gate/up each one kernel
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    read = {name for n in graph.node for name in n.input}
    assert not [t.name for t in graph.initializer if t.name not in read]  # nothing stored that no node reads
    assert (ops["GroupQueryAttention"], ops["SkipSimplifiedLayerNormalization"], ops["MatMulNBits"]) == (30, 60, 120)
    # q/k/v one product split for the rotation of q and k at position_ids; gate/up packed into our SiluGate (split,
    # sigmoid, products)
    assert ops["RotaryEmbedding"] == 60 and ops["Split"] == 30 and ops["SiluGate"] == 30 and ops["Sigmoid"] == 0
    _left_padding_changes_nothing(out / "onnx")
    assert report["size"]["onnx_file_bytes"] <= 1.15 * report["size"]["checkpoint_bytes"]
    assert "## ONNX export" in (out / "report.md").read_text()
    prompt = "The import statement combines two operations; it searches for the named module, then"
    from_onnx = cli("generate", out / "onnx", prompt, "-n", 16, "--json", "--prefill-chunk", 5)  # 5 tokens a run
    from_checkpoint = cli("generate", out, prompt, "-n", 16, "--json")
    assert from_onnx.exit_code == 0 and from_checkpoint.exit_code == 0, from_onnx.output + from_checkpoint.output
    a, b = json.loads(from_onnx.stdout), json.loads(from_checkpoint.stdout)
    assert (a["runtime"], b["runtime"]) == ("onnxruntime", "pytorch")
    assert a["tokens"] == b["tokens"] and len(a["text"].split()) >= 3


def test_an_empty_prompt_is_a_one_line_error(mixed_export):
    result = cli("generate", mixed_export[0], "", "-n", 4)
    assert result.exit_code == 2 and "prompt is empty" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["truncate-graph", "truncate-data", "garbage-graph"])
def test_damaged_onnx_gives_one_line_error(mixed_export, tmp_path, damage):
    src, _ = mixed_export
    dst = tmp_path / "damaged"
    shutil.copytree(src, dst)
    target = dst / ("model.onnx.data" if damage == "truncate-data" else "model.onnx")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage.startswith("truncate") else b"not an onnx file" * 10)
    result = cli("generate", dst, "Hello", "-n", 4)
    assert result.exit_code == 2
    assert "corrupted or truncated" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_in_graph_unpacking_equals_the_packing_module(bits):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto

    from compress.export.graph import Graph
    from compress.formats.onnx_ops import unpack_codes
    from compress.packing import pack_rows, unpack_rows

    codes = torch.randint(0, 1 << bits, (5, 37), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    g = Graph()
    out = unpack_codes(g, g.tensor("packed", pack_rows(codes, bits).numpy()), 5, 37, bits, TensorProto.INT32)
    g.output(out, "codes", TensorProto.INT32, [5, 37])
    got = ort.InferenceSession(g.model(21).SerializeToString()).run(None, {})[0]
    assert np.array_equal(got, unpack_rows(pack_rows(codes, bits), bits, 37).numpy().astype(np.int32))
    assert np.array_equal(got, codes.numpy())


class OddFormat(WeightFormat):
    kind = "odd"

    def __init__(self, shape):
        self.shape = shape


def test_unsupported_format_fails_naming_the_layer(smol, tmp_path):
    model, tok, _ = smol
    model = copy.deepcopy(model)
    target = model.model.layers[3].mlp.up_proj
    model.model.layers[3].mlp.up_proj = CompressedLinear(OddFormat(tuple(target.weight.shape)))
    with pytest.raises(ExportError, match=r"model\.layers\.3\.mlp\.up_proj.*'odd'"):
        export_to_folder(model, tok, tmp_path / "x", windows=None, log=lambda m: None)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))


def test_unsupported_architecture_is_a_one_line_error(smol, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = smol[1]
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    result = cli("export", tmp_path / "gpt2", tmp_path / "out", "--no-validate")
    assert result.exit_code == 2 and "Llama-like" in result.stderr
    assert not (tmp_path / "out").exists()


FAMILY_RECIPES = ["w2-gptq", "w3-gptq", "w4-gptq", "palettize3-outliers", "palettize4-channel", "sparse50-wanda",
                  "2of4-w4", "width25-structured"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", FAMILY_RECIPES)
def test_every_family_exports_validates_and_generates_like_pytorch(recipe, tmp_path):
    """Each ready recipe (small calibration) with the ONNX export on: validation passes, and 32 greedy
    tokens after a 32-token held-out prompt are the same in onnxruntime and PyTorch."""
    out = tmp_path / recipe
    result = cli("run", RECIPES / f"{recipe}.yaml", "smollm2-135m", "--out", out, "--quiet", "--keep-failed",
                 "--set", "calibration.samples=16", "--set", "calibration.seq_len=256",
                 "--set", "evaluate.max_windows=2", "--set", "evaluate.seq_len=256", "--set", "export.onnx=true")
    assert result.exit_code in (0, 1), result.output  # 1: a size/quality budget of the full recipe missed
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["validation"]["passed"]
    assert report["size"]["onnx_file_bytes"] <= 1.15 * report["size"]["checkpoint_bytes"]
    import compress

    model, tok = compress.load(out)
    prompt = evaluation_windows("pydoc", tok, 64, 1, "pydoc")[0, :32].tolist()
    assert OnnxCausalLM(out / "onnx").greedy(prompt, 32).tokens == torch_greedy(model, prompt, 32).tokens


@pytest.mark.parametrize("index", range(len(FORMATS)))
def test_each_lowering_computes_the_formats_product(smol, ortops_library, index):
    """One layer of the real model in each format, alone in a graph: onnxruntime's product equals
    ``x @ W.T`` of the format's own decode (float32 rounding only), for a prompt and for a few tokens (kernels
    such as ours take another path for those)."""
    import numpy as np
    import onnxruntime as ort

    from compress.export.graph import FLOAT, Graph
    from compress.export.weights import WeightLowering

    path, make, expected = FORMATS[index]
    weight = smol[0].model.layers[0].get_submodule(path).weight.detach().float()
    fmt = make(weight)
    g = Graph()
    low = WeightLowering(g, "fast")
    y = low.linear(g.input("x", FLOAT, ["batch", "sequence", weight.shape[1]]), fmt, None, "layer")
    g.output(y, "y", FLOAT, ["batch", "sequence", weight.shape[0]])
    assert low.layers["layer"].lowering.startswith(expected)
    options = ort.SessionOptions()
    if low.custom_ops_used:
        options.register_custom_ops_library(str(ortops_library))
    sess = ort.InferenceSession(g.model(low.opset).SerializeToString(), options)
    for shape in ((2, 5), (1, 3)):
        x = torch.randn(*shape, weight.shape[1], generator=torch.Generator().manual_seed(index))
        got = sess.run(None, {"x": x.numpy()})[0]
        want = (x @ fmt.dequantize().T).numpy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (expected, shape, np.abs(got - want).max())


@pytest.mark.parametrize("spec, accuracy_level, op, head", [
    (QuantSpec(4, 32, symmetric=True), 0, "GatherBlockQuantized", "GridMatMul"),
    (QuantSpec(4, 64), 0, "GatherBlockQuantized", "GridMatMul"),  # zero points
    (QuantSpec(3, 128), 0, "GatherBlockQuantized", "MatMulNBits"),  # widened to 4 bits, 576 = 4.5 blocks: padded
    (QuantSpec(2, 32), 0, "BitShift", "GridMatMul"),  # no gather kernel reads 2 bits: decoded by standard ops
    (QuantSpec(8, 32), 4, "GatherBlockQuantized", "MatMulNBits"),
    (QuantSpec(4, 32, symmetric=True), 4, "GatherBlockQuantized", "GridMatMul"),  # int8 activations
    (QuantSpec(2, 32), 4, "BitShift", "GridMatMul"),
])
def test_a_tied_tables_rows_decode_from_the_heads_codes(smol, ortops_library, spec, accuracy_level, op, head):
    """A quantized token embedding tied to the head: its rows gathered from the head's MatMulNBits initializers
    (stored once) equal the format's own decode, and the head's product still does, in our GridMatMul (2 and 4 bits,
    float or int8 activations, reading those same initializers: no prepacked copy) or in MatMulNBits."""
    import numpy as np
    import onnxruntime as ort

    from compress.export.graph import FLOAT, INT64, Graph
    from compress.export.weights import WeightLowering

    table = smol[0].model.embed_tokens.weight.detach().float()[:3000]
    fmt = quantize_rtn(table, spec)
    g = Graph()
    low = WeightLowering(g, "fast", accuracy_level)
    ids = g.input("ids", INT64, ["batch", "sequence"])
    g.output(low.rows(fmt, ids, "embed", "head"), "rows", FLOAT, ["batch", "sequence", table.shape[1]])
    y = low.linear(g.input("x", FLOAT, ["batch", "sequence", table.shape[1]]), fmt, None, "head")
    g.output(y, "y", FLOAT, ["batch", "sequence", table.shape[0]])
    assert op in {n.op_type for n in g.nodes}
    ours = head == "GridMatMul"
    assert low.layers["head"].lowering.startswith(head)
    assert low.custom_ops_used == ours
    node = next(n for n in g.nodes if n.op_type in ("GridMatMul", "MatMulNBits"))
    assert node.input[1] in {i for n in g.nodes if n.op_type in ("GatherBlockQuantized", "Gather") for i in n.input}
    if ours and op == "GatherBlockQuantized":  # the scales stored as the lookup reads them: no reshaped copy
        gather = next(n for n in g.nodes if n.op_type == op)
        assert gather.input[2] == node.input[2] and gather.input[2] in {t.name for t in g.initializers}
    options = ort.SessionOptions()
    if low.custom_ops_used:
        options.register_custom_ops_library(str(ortops_library))
    sess = ort.InferenceSession(g.model(low.opset).SerializeToString(), options)
    picked = np.array([[0, 2999, 17], [5, 5, 1234]])
    x = torch.randn(1, 2, table.shape[1], generator=torch.Generator().manual_seed(0))
    rows, got = sess.run(None, {"ids": picked, "x": x.numpy()})
    assert np.array_equal(rows, fmt.dequantize()[torch.from_numpy(picked)].numpy())
    want = (x @ fmt.dequantize().T).numpy()  # int8 activations change the product by design, a little
    assert np.abs(got - want).max() <= (1e-5 if accuracy_level == 0 else 2e-2) * np.abs(want).max()


@pytest.mark.parametrize("make, accuracy_level, packs", [
    (lambda w: quantize_rtn(w, QuantSpec(2, 32)), 0, "GridMatMul"),  # zero points packed beside the codes
    (lambda w: quantize_rtn(w, QuantSpec(4, 32, symmetric=True)), 4, "GridMatMul"),  # int8 activations
    (lambda w: quantize_rtn(w, QuantSpec(4, 64)), 4, "GridMatMul"),  # 576 inputs: a last group of 0
    (lambda w: quantize_rtn(w, QuantSpec(3, 64)), 4, "GridMatMul"),  # 3-bit codes as stored, int8 activations
    (lambda w: quantize_rtn(w, QuantSpec(4, 64, grid="nf")), 0, None),  # a layer's code book: not joined
    (lambda w: palettize(w, KMeansConfig(type="kmeans", bits=4, table_dtype="int8", iterations=3)), 0, "LutMatMul"),
    (lambda w: gptvq_quantize(w, torch.eye(w.shape[1]), GPTVQConfig(bits=3, iterations=2, codebook_refit=0,
                                                                   table_weights=64 * 576)), 0, "LutMatMul"),
    (lambda w: gptvq_quantize(w, torch.eye(w.shape[1]), GPTVQConfig(bits=3, iterations=2, codebook_refit=0)), 0,
     "LutMatMul"),  # a code book per 28 rows: 576 and 192 rows end inside a book, each row's book named
    (lambda w: quantize_rtn(w, QuantSpec(4, 128)), 0, "MatMulNBits"),
])
def test_sibling_matmuls_pack_into_one_kernel_with_the_same_products(smol, ortops_library, make, accuracy_level, packs):
    """The query, key and value projections (one input, three weights in one format) joined into one kernel and a
    Split (fuse.pack_sibling_matmuls): the same outputs as the three kernels, for onnxruntime's MatMulNBits and
    our GridMatMul and LutMatMul, whose initializers are row-wise; a GridMatMul with a code book stays apart."""
    import numpy as np
    import onnxruntime as ort

    from compress.export.fuse import pack_sibling_matmuls
    from compress.export.graph import FLOAT, Graph
    from compress.export.weights import WeightLowering

    attention = smol[0].model.layers[3].self_attn
    g = Graph()
    low = WeightLowering(g, "fast", accuracy_level)
    x = g.input("x", FLOAT, ["tokens", 576])
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = getattr(attention, name).weight.detach().float()
        g.output(low.linear(x, make(weight), None, name), name, FLOAT, ["tokens", weight.shape[0]])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ortops_library))
    inputs = {"x": torch.randn(3, 576, generator=torch.Generator().manual_seed(0)).numpy()}
    apart = ort.InferenceSession(g.model(low.opset).SerializeToString(), options).run(None, inputs)
    assert pack_sibling_matmuls(g) == (packs is not None)
    ops = collections.Counter(n.op_type for n in g.nodes)
    if packs:
        assert ops[packs] == 1 and ops["Split"] == 1
    joined = ort.InferenceSession(g.model(low.opset).SerializeToString(), options).run(None, inputs)
    for a, b in zip(apart, joined, strict=True):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
