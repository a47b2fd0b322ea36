"""`compress run` end to end on the real offline model and real text."""

import json
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, W4_RUN_ARGS, W4_RUN_EVAL, cli

import compress
from compress.data import evaluation_windows
from compress.evaluate import evaluate


def test_run_writes_checkpoint_and_report(w4_rtn_run):
    out, report = w4_rtn_run
    for name in ("model.safetensors", "compress.json", "config.json", "tokenizer.json", "recipe.yaml",
                 "report.json", "report.md"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*tmp*")), "temporary folder left behind"
    assert report["schema_version"] == 1 and report["budgets_passed"]
    assert len(report["layers"]) == 30 * 7
    assert all(layer["format"].startswith("4-bit") for layer in report["layers"])
    assert "| compressed |" in (out / "report.md").read_text()


def test_checkpoint_bytes_match_accounted_size(w4_rtn_run):
    out, report = w4_rtn_run
    on_disk = (out / "model.safetensors").stat().st_size
    accounted = report["size"]["checkpoint_bytes"]
    assert abs(on_disk - accounted) / accounted < 0.05
    bpw = report["size"]["compressed_layers_bits_per_weight"]
    assert 4.0 < bpw < 4.3  # 4-bit codes + fp16 scale and 4-bit zero per 128 weights (+ row padding)
    assert report["size"]["checkpoint_bytes"] < 0.45 * report["size"]["base_fp16_bytes"]


def test_loaded_checkpoint_matches_report_and_generates(w4_rtn_run, smol):
    out, report = w4_rtn_run
    model, tokenizer = compress.load(out)
    windows = evaluation_windows("pydoc", tokenizer, W4_RUN_EVAL["seq_len"], W4_RUN_EVAL["max_windows"], "pydoc")
    result, _ = evaluate(model, windows)
    assert result.perplexity == pytest.approx(report["compressed"]["perplexity"], rel=1e-4)
    ids = tokenizer("A class definition defines a class object. The", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0][ids.shape[1]:])
    assert len(text.split()) >= 3


def test_eval_command_reports_the_same_perplexity(w4_rtn_run):
    out, report = w4_rtn_run
    result = cli("eval", out, "--max-windows", W4_RUN_EVAL["max_windows"], "--seq-len", W4_RUN_EVAL["seq_len"],
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(report["compressed"]["perplexity"], rel=1e-4)


@pytest.mark.slow  # three runs of the whole model
def test_quality_orders_by_bits(smol):
    """2-bit RTN is clearly worse than 3-bit, which is worse than 4-bit (same held-out windows)."""
    import copy

    from compress.pipeline import plan, run_passes
    from compress.recipe import parse_recipe

    model, tokenizer, _ = smol
    windows = evaluation_windows("pydoc", tokenizer, 512, 2, "pydoc")
    base, ref = evaluate(model, windows, keep_logprobs=True)
    ppl = {}
    for bits in (2, 3, 4):
        m = copy.deepcopy(model)
        run_passes(m, plan(parse_recipe({"passes": [{"type": "rtn", "bits": bits, "group_size": 64}]}).passes),
                   None, "cpu")
        ppl[bits] = evaluate(m, windows, reference=ref)[0].perplexity
    assert base.perplexity < ppl[4] < ppl[3] < ppl[2]
    assert ppl[2] > 3 * ppl[3] and ppl[4] < 1.6 * base.perplexity


def test_base_log_probs_wait_on_disk_not_in_memory(smol):
    """The base model's log-probs (kept for KL) are spilled to a temporary folder, read back exactly,
    and the folder is gone once closed: KL against them equals KL against the in-memory values."""
    model, tokenizer, _ = smol
    windows = evaluation_windows("pydoc", tokenizer, 128, 4, "pydoc")
    _, ref = evaluate(model, windows, keep_logprobs=True)
    folder = Path(ref._dir.name)
    assert len(ref) == 2 and sorted(p.name for p in folder.iterdir()) == ["0.pt", "1.pt"]
    in_memory = [ref[i] for i in range(len(ref))]
    assert in_memory[0].dtype == torch.float16 and in_memory[0].shape[:2] == (2, 127)
    with pytest.raises(IndexError):
        ref[2]
    shifted = windows.roll(1, dims=1)  # a different "model output": evaluate other text against the same base
    a, _ = evaluate(model, shifted, reference=ref)
    b, _ = evaluate(model, shifted, reference=in_memory)
    assert a.kl_divergence == b.kl_divergence > 0
    ref.close()
    assert not folder.exists()


def test_budget_missed_exits_1_and_leaves_nothing(tmp_path, smol):
    out = tmp_path / "missed"
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, "--json",
                 "--set", "budgets.max_ppl_increase=0.0001", "--set", "evaluate.max_windows=2",
                 "--set", "evaluate.seq_len=128")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "budget_missed"
    assert [b["passed"] for b in summary["budgets"] if b["name"] == "max_ppl_increase"] == [False]
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow  # a second whole run
def test_same_seed_gives_identical_checkpoints(tmp_path, smol, w4_rtn_run):
    out = tmp_path / "again"
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, *W4_RUN_ARGS)  # as w4_rtn_run
    assert result.exit_code == 0, result.output
    first = (w4_rtn_run[0] / "model.safetensors").read_bytes()
    assert first == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args, needle", [
    (["smollm2-135m", "--set", "passes.0.bitz=3"], "unknown key"),
    (["./no/such/model"], "model path not found"),
    (["/tmp/missing-model.gguf"], "GGUF file not found"),
    (["smollm2-135m", "--set", "evaluate.dataset=./no-such-file.txt"], "dataset file not found"),
    (["smollm2-135m", "--device", "tpu"], "unknown device"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, args, needle):
    out = tmp_path / "out"
    result = cli("run", RECIPES / "w4-rtn.yaml", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1
    assert not out.exists()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out)
    assert result.exit_code == 2 and "--force" in result.stderr


def test_hub_id_offline_gives_one_line_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the hub library reads the variable when first imported (earlier tests did): without this it retries the
    # unreachable hub five times with backoff (about 25 s) before the same error
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = cli("eval", "HuggingFaceTB/SmolLM2-135M")
    assert result.exit_code == 2 and "not cached" in result.stderr


def test_local_text_and_jsonl_datasets(tmp_path, smol):
    from compress.data import calibration_batches

    tokenizer = smol[1]
    text = Path(__import__("pydoc_data.topics").topics.__file__).read_text()[:60000]
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text.split("\n\n")[:200]))
    for spec in (tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path):
        batch = calibration_batches(str(spec), tokenizer, 4, 64, seed=1)
        assert batch.shape == (4, 64) and torch.equal(batch, calibration_batches(str(spec), tokenizer, 4, 64, 1))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    from compress.errors import DataError

    with pytest.raises(DataError, match="bad.jsonl:1"):
        calibration_batches(str(tmp_path / "bad.jsonl"), tokenizer, 1, 8, seed=0)


def test_passes_and_help_list_options():
    result = cli("passes")
    assert result.exit_code == 0 and "rtn" in result.stdout and "group_size" in result.stdout
    assert cli("run", "--help").exit_code == 0
