"""Exports for serving engines, judged by the engines' own readers: compressed-tensors through transformers with the
compressed-tensors package; GPTQ decoded by its documented layout (GPTQModel needs a newer torch than ours), on the
real model and held-out text."""

import json

import pytest
import torch
from conftest import cli

from compress.checkpoint import load_checkpoint

pytest.importorskip("compressed_tensors")

QUICK = ("--windows", "1", "--seq-len", "128")  # checks of exact exports (GPTQ, GGUF) on less text than the default
CALIBRATION = "calibration: {samples: 4, seq_len: 256}\nevaluate: {seq_len: 256, max_windows: 2}\n"


BOTH = "compressed_tensors: {}\n  gptq: {}"


def _run(write_recipe, tmp_path, name: str, passes: str, export: str = BOTH):
    recipe = write_recipe(f"name: {name}\n{CALIBRATION}passes:\n{passes}export:\n  {export}\n", f"{name}.yaml")
    out = tmp_path / name
    result = cli("run", recipe, "smollm2-135m", "--out", out, "--quiet")
    return result, out


def _check_layer_values(ours_dir, names, formats=("compressed-tensors", "gptq")):
    """The readers' decompressed weights are ours exactly: bit for bit in float32 (GPTQ, transformers' default
    compressed-tensors path), or after float16 rounding (its dequantize path multiplies in the scales' float16)."""
    from compress.export.engines import WRITERS

    ours, _ = load_checkpoint(ours_dir)
    for fmt in formats:
        theirs = WRITERS[fmt].read_back(ours_dir / fmt)
        with torch.no_grad():
            theirs(input_ids=torch.tensor([[1, 2]]))  # transformers' default path decompresses at the first forward
        for name in names:
            want = ours.get_submodule(name).fmt.dequantize()
            got = theirs.get_submodule(name).weight.float()
            assert torch.equal(got, want) or (fmt == "compressed-tensors" and torch.equal(got, want.half().float())), \
                (fmt, name)


def _validations(out, formats=("compressed-tensors", "gptq")):
    served = json.loads((out / "report.json").read_text())["served"]
    for fmt in formats:
        v = served[fmt]["validation"]
        assert v["passed"] and abs(v["perplexity_export"] / v["perplexity_ours"] - 1) < 0.005, (fmt, v)


def test_gptq_4bit_goes_to_both_formats_with_our_codes(write_recipe, tmp_path):
    """GPTQ 4-bit g64 (asymmetric): the run writes OUT/compressed-tensors and OUT/gptq, their readers give the same
    weights, and the perplexity is ours within 0.5% (the export's own check is stricter: 0.2%)."""
    result, out = _run(write_recipe, tmp_path, "w4", "  - {type: gptq, bits: 4, group_size: 64, "
                                                     "targets: ['model.layers.[0-3].*']}\n")  # 4 of 30 blocks: CPU time
    assert result.exit_code == 0, result.output
    _validations(out)
    config = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["num_bits"] == 4
    assert group["weights"]["group_size"] == 64 and group["weights"]["symmetric"] is False
    assert "lm_head" in config["ignore"] and "model.layers.4.mlp.down_proj" in config["ignore"]
    assert not [n for n in config["ignore"] if n.startswith("model.layers.3.")]
    gptq = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
    assert gptq["bits"] == 4 and gptq["group_size"] == 64 and gptq["sym"] is False and gptq["desc_act"] is False
    assert gptq["dynamic"] == {f"-:^model\\.layers\\.{b}\\.{n}$": {} for b in range(4, 30) for n in (
        "self_attn\\.q_proj", "self_attn\\.k_proj", "self_attn\\.v_proj", "self_attn\\.o_proj", "mlp\\.gate_proj",
        "mlp\\.up_proj", "mlp\\.down_proj")}
    assert json.loads((out / "gptq" / "quantize_config.json").read_text()) == gptq
    _check_layer_values(out, ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"])


@pytest.mark.slow  # four runs and their read-backs: about eight minutes
@pytest.mark.parametrize("name, passes, formats", [
    ("w3", "  - {type: gptq, bits: 3, group_size: 64}\n", ("compressed-tensors", "gptq")),
    ("mixed", "  - {type: rtn, bits: 4, group_size: 64, symmetric: true,\n"
     "     overrides: {'model.layers.1[0-9].*': {bits: 8}}}\n", ("compressed-tensors", "gptq")),
    ("sparse-w4", "  - {type: sparsegpt, pattern: '2:4'}\n  - {type: gptq, bits: 4, group_size: 32}\n",
     ("compressed-tensors", "gptq")),
])
def test_other_grids_go_to_their_readers(write_recipe, tmp_path, name, passes, formats):
    keys = {"compressed-tensors": "compressed_tensors", "gptq": "gptq"}
    result, out = _run(write_recipe, tmp_path, name, passes, "\n  ".join(f"{keys[f]}: {{}}" for f in formats))
    assert result.exit_code == 0, result.output
    _validations(out, formats)
    if "compressed-tensors" in formats:
        config = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
        assert len(config["config_groups"]) == (2 if name == "mixed" else 1)
        if name == "sparse-w4":
            assert config["sparsity_config"]["sparsity_structure"] == "2:4"
            assert next(iter(config["config_groups"].values()))["weights"]["group_size"] == 64  # 32 kept of 64
    if name == "mixed":
        gptq = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
        assert gptq["bits"] == 4 and gptq["sym"] is True and len(gptq["dynamic"]) == 10 * 7
        assert gptq["dynamic"]["+:^model\\.layers\\.12\\.mlp\\.up_proj$"]["bits"] == 8
    _check_layer_values(out, ["model.layers.2.mlp.up_proj", "model.layers.15.mlp.up_proj"], formats)


@pytest.mark.parametrize("pass_, needle", [("kmeans, bits: 3", "kmeans stores palette indices"),
                                           ("gptvq", "gptvq stores indices into vector code books")])
def test_code_books_are_refused_before_any_compute(write_recipe, tmp_path, pass_, needle):
    result, out = _run(write_recipe, tmp_path, "pal", f"  - {{type: {pass_}}}\n", "gptq: {}")
    assert result.exit_code == 2
    assert needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_vllm_target_refuses_3_bit_before_any_compute(write_recipe, tmp_path):
    result, out = _run(write_recipe, tmp_path, "w3v", "  - {type: gptq, bits: 3, group_size: 64}\n",
                       "compressed_tensors: {target: vllm}")
    assert result.exit_code == 2 and "vLLM" in result.output and "3-bit" in result.output
    assert not out.exists()


def test_gptq_refuses_5_bit_before_any_compute(write_recipe, tmp_path):
    result, out = _run(write_recipe, tmp_path, "w5", "  - {type: gptq, bits: 5, group_size: 64}\n", "gptq: {}")
    assert result.exit_code == 2 and "5-bit" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "rtn"
    recipe = out.parent / "rtn.yaml"
    recipe.write_text("name: rtn\nevaluate: {seq_len: 128, max_windows: 1}\npasses:\n"
                      "  - {type: rtn, bits: 4, group_size: 64, symmetric: true}\n")
    assert cli("run", recipe, "smollm2-135m", "--out", out, "--quiet").exit_code == 0
    return out


def test_export_command_symmetric_and_plain_transformers_load(rtn_checkpoint, tmp_path):
    """`compress export --format compressed-tensors`; a symmetric grid also loads through transformers' default
    path (no zero points), and generates what ours generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ct"
    result = cli("export", rtn_checkpoint, out, "--format", "compressed-tensors", "--target", "vllm")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "export.json").read_text())["validation"]["passed"]
    tok = AutoTokenizer.from_pretrained(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = load_checkpoint(rtn_checkpoint)
    ids = tok("The with statement is used to", return_tensors="pt").input_ids
    with torch.no_grad():
        a = ours.generate(ids, max_new_tokens=8, do_sample=False)
        b = theirs.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_gptq_export_command_and_model_cards(rtn_checkpoint, tmp_path):
    """`compress export --format gptq --target vllm`: symmetric 4-bit is v1 GPTQ. The run folder and the export
    folder have Hub model cards: base model, 'quantized', the measured numbers of their report / check."""
    from compress.report.model import Report

    out = tmp_path / "gptq"
    result = cli("export", rtn_checkpoint, out, "--format", "gptq", "--target", "vllm", *QUICK)
    assert result.exit_code == 0, result.output
    v = json.loads((out / "export.json").read_text())["validation"]
    assert v["passed"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is True and "dynamic" not in qc
    report = Report.load(rtn_checkpoint / "report.json")
    meta, text = _front_matter(rtn_checkpoint / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    assert "4-bit" in meta["tags"] and f"{report.compressed.perplexity:.4g}" in text
    assert "compress.load" in text and "type: rtn" in text
    meta, text = _front_matter(out / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "gptq" in meta["tags"]
    assert f"{v['perplexity_export']:.4g}" in text and "vllm serve ." in text


@pytest.mark.parametrize("fmt, tensor", [("compressed-tensors", "weight_scale"),
                                         pytest.param("gptq", "scales", marks=pytest.mark.slow)])  # layout tests
def test_wrong_bytes_are_caught_by_the_read_back(rtn_checkpoint, tmp_path, monkeypatch, fmt, tensor):
    """An export whose bytes do not mean our weights (scales written for the wrong rows) fails its check with
    exit 3, and nothing is left behind."""
    from compress.export.engines import WRITERS

    writer = WRITERS[fmt]
    real = writer.layer_tensors

    def damaged(*args):
        t = real(*args)
        t[tensor] = t[tensor].flip(0).contiguous()
        return t

    monkeypatch.setattr(writer, "layer_tensors", damaged)
    out = tmp_path / "x"
    result = cli("export", rtn_checkpoint, out, "--format", fmt, *QUICK)
    assert result.exit_code == 3, result.output
    assert not out.exists() and not any(tmp_path.iterdir())


def test_truncated_gptq_tensor_is_caught_by_the_read_back(rtn_checkpoint, tmp_path, monkeypatch):
    """qweight with half its rows (a shape the config does not describe): one line, exit 2, nothing left."""
    from compress.export import gptq

    real = gptq.layer_tensors

    def truncated(*args):
        t = real(*args)
        t["qweight"] = t["qweight"][: t["qweight"].shape[0] // 2].contiguous()
        return t

    monkeypatch.setattr(gptq, "layer_tensors", truncated)
    out = tmp_path / "x"
    result = cli("export", rtn_checkpoint, out, "--format", "gptq", *QUICK)
    assert result.exit_code == 2 and "damaged" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_an_int8_activation_export_is_checked_at_int8_tolerances(rtn_checkpoint, tmp_path):
    """`compress export --int8-activations` validates against int8 activations' own default tolerance: onnxruntime
    rounds each activation row to 8 bits, the logits move by more than the exact export's 0.05."""
    result = cli("export", rtn_checkpoint, tmp_path / "int8", "--int8-activations", *QUICK, "--json")
    assert result.exit_code == 0, result.output
    v = json.loads(result.stdout)["validation"]
    assert v["passed"] and v["tolerance"] == {"max_logit_diff": 5.0, "min_top1_agreement": 0.9,
                                              "max_perplexity_diff": 0.05}
    assert max(v["max_logit_diff"], v["decode_max_logit_diff"]) > 0.05  # the exact default would refuse it



@pytest.mark.parametrize("custom_ops", [True, False])
def test_int8_activations_run_in_our_operator_unless_told_not_to(rtn_checkpoint, tmp_path, ortops_library,
                                                                  custom_ops):
    """With our library built, an int8-activation export multiplies its 4-bit layers in our GridMatMul (the folder
    ships the library); `--no-custom-ops` keeps it on onnxruntime's MatMulNBits, no library in the folder."""
    out = tmp_path / "int8"
    flag = "--custom-ops" if custom_ops else "--no-custom-ops"
    result = cli("export", rtn_checkpoint, out, "--int8-activations", flag, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    lowerings = json.loads(result.stdout)["lowerings"]
    kernels = {k.split()[0] for k in lowerings if not k.startswith("tied to")}
    assert kernels == ({"GridMatMul"} if custom_ops else {"MatMulNBits"}), lowerings
    meta = json.loads((out / "export.json").read_text())
    assert bool(meta["custom_ops_library"]) == custom_ops
    assert any(out.glob("*.so")) == custom_ops

def test_unknown_format_and_target_are_one_line_errors(rtn_checkpoint, tmp_path):
    for args in (["--format", "tflite"], ["--format", "compressed-tensors", "--target", "tgi"]):
        result = cli("export", rtn_checkpoint, tmp_path / "x", *args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "x").exists()


def test_model_with_its_own_code_is_refused_without_trust_remote_code(tmp_path, write_recipe):
    """A folder whose config maps to Python code in the folder: refused in one line naming --trust-remote-code,
    before that code runs (its module would create a file when imported)."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-lm", "architectures": ["CustomLM"],
        "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes(b"")
    recipe = write_recipe("passes:\n  - {type: rtn, bits: 4}\n")
    result = cli("run", recipe, folder, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "--trust-remote-code" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not marker.exists() and not (tmp_path / "out").exists()


def test_revision_is_for_hub_ids(tmp_path, write_recipe):
    recipe = write_recipe("passes:\n  - {type: rtn, bits: 4}\n")
    result = cli("run", recipe, "smollm2-135m", "--revision", "main", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "--revision" in result.output and len(result.output.strip().splitlines()) == 1


def _front_matter(readme):
    import yaml

    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text
