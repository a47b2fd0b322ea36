"""Runs whose memory is that of one block: memory-mapped sharded models, block-streamed evaluation, a checkpoint
written as shards, and a killed run resumed to the same bytes."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from typing import Literal

import pytest
import torch
import transformers
from conftest import cli

from compress.blocks import COMPUTE_DTYPE
from compress.data import calibration_batches, evaluation_windows
from compress.evaluate import evaluate
from compress.families import find_blocks
from compress.models import resolve
from compress.residency import file_mappings, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise are Linux's")


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, smol):
    """A random-weight Llama (6 blocks, bf16) saved by transformers as several shards with an index, with
    SmolLM2's tokenizer: shapes and memory only, never quality."""
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=smol[1].vocab_size, hidden_size=256, intermediate_size=768,
                                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="4MB")
    smol[1].save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3 and (folder / "model.safetensors.index.json").is_file()
    return folder


def _block_weights(model):
    _, blocks = find_blocks(model)
    return [[m.weight.data for m in b.modules() if isinstance(m, torch.nn.Linear)] for b in blocks]


def _resident_blocks(per_block) -> int:
    """How many blocks have more than a tenth of their float weights' bytes in memory."""
    return sum(sum(map(resident_bytes, ws)) > 0.1 * sum(w.numel() * w.element_size() for w in ws)
               for ws in per_block)


def test_a_sharded_model_is_compressed_with_one_block_of_float_weights_in_memory(sharded_llama, tmp_path):
    from compress.formats import quantize_rtn
    from compress.modules import CompressedLinear
    from compress.passes.base import Pass, PassConfig, Requirements, current_weight
    from compress.passes.registry import PASSES, register
    from compress.pipeline import plan, run_passes
    from compress.quant import QuantSpec
    from compress.recipe import parse_recipe
    from compress.stage import RunStage

    model, tok, _ = resolve(str(sharded_llama))
    assert model.dtype == torch.bfloat16
    source = _block_weights(model)
    maps = file_mappings()
    assert all(any(a <= w.data_ptr() < b for a, b in maps) for ws in source for w in ws)  # views of the shards
    for ws in source:
        for w in ws:
            w.float().sum()  # resident, as a whole-model pass over the weights would leave them
    assert _resident_blocks(source) == 6
    resident_at_each_layer = []

    class ProbeConfig(PassConfig):
        type: Literal["test-residency-probe"] = "test-residency-probe"

    @register
    class Probe(Pass):
        """Round to nearest, counting the blocks whose float weights are in memory (a test pass)."""

        name, stage, Config = "test-residency-probe", "quantize", ProbeConfig

        def requirements(self):
            return Requirements(stats=frozenset({"sq_sum"}))

        def compress_layer(self, name, module, stats, cfg):
            assert module.weight.dtype == COMPUTE_DTYPE  # the block was brought to the compute dtype
            resident_at_each_layer.append(_resident_blocks(source))
            return quantize_rtn(current_weight(module), QuantSpec(4, 64)), {}

    try:
        calibration = calibration_batches("pydoc", tok, 4, 64, seed=0, heldout_spec="pydoc")
        stage = RunStage(tmp_path / "stage", {"test": 1}, "bfloat16")
        recipe = parse_recipe({"passes": [{"type": "test-residency-probe"}]})
        run_passes(model, plan(recipe.passes), calibration, "cpu", stage=stage)
    finally:
        PASSES.pop("test-residency-probe", None)
    # the block at work is in memory in float32 (its bf16 pages go back as soon as they are copied), the others not
    assert len(resident_at_each_layer) == 6 * 7 and max(resident_at_each_layer) <= 1
    assert _resident_blocks(source) == 0
    _, blocks = find_blocks(model)
    staged = file_mappings()
    for block in blocks:  # every block now lives in its staged file
        layers = [m for m in block.modules() if isinstance(m, CompressedLinear)]
        assert len(layers) == 7
        codes = next(iter(layers[0].fmt.tensors().values()))
        assert any(a <= codes.data_ptr() < b for a, b in staged)


def _reference_quality(model, windows, reference=None):
    """Whole-model perplexity and KL, computed the plain way (the model's forward on every window)."""
    nll, count, kl = 0.0, 0, 0.0
    logps = []
    with torch.no_grad():
        for b, batch in enumerate(windows.split(2)):
            logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), -1)
            nll -= logp.gather(-1, batch[:, 1:].unsqueeze(-1)).sum().item()
            count += batch[:, 1:].numel()
            if reference is not None:
                kl += (reference[b].exp() * (reference[b] - logp)).sum().item()
            logps.append(logp)
    return math.exp(nll / count), kl / count, logps


def test_block_streamed_evaluation_equals_whole_model_evaluation(smol, rtn_first_block):
    model, tok, _ = smol
    windows = evaluation_windows("pydoc", tok, 256, 4, "pydoc")
    base, kept = evaluate(model, windows, keep_logprobs=True)
    ppl, _, ref_logps = _reference_quality(model, windows)
    assert abs(base.perplexity - ppl) / ppl < 1e-4
    compressed, _ = evaluate(rtn_first_block, windows, reference=kept)
    ppl_c, kl_c, _ = _reference_quality(rtn_first_block, windows, [r.half().float() for r in ref_logps])
    assert abs(compressed.perplexity - ppl_c) / ppl_c < 1e-4
    assert compressed.kl_divergence > 0 and abs(compressed.kl_divergence - kl_c) / kl_c < 1e-3
    kept.close()


SMALL_EVAL = ["--set", "evaluate.max_windows=2", "--set", "evaluate.seq_len=128", "--quiet"]


def test_the_checkpoint_is_written_as_shards_that_load_back(sharded_llama, write_recipe, tmp_path):
    from compress import load

    recipe = write_recipe("passes:\n  - type: rtn\n    bits: 4\n    group_size: 64\n")
    one, many = tmp_path / "one", tmp_path / "many"
    assert cli("run", recipe, sharded_llama, "--out", one, *SMALL_EVAL).exit_code == 0
    r = cli("run", recipe, sharded_llama, "--out", many, "--max-shard-size", "10MB", *SMALL_EVAL)
    assert r.exit_code == 0, r.output
    shards = sorted(p.name for p in many.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (many / "model.safetensors").exists()
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(p.stat().st_size <= 10 * 10**6 or len(json.loads(p.read_bytes()[8:8 + int.from_bytes(
        p.read_bytes()[:8], "little")])) <= 2 for p in many.glob("model-*.safetensors"))
    a, _ = load(one)
    b, _ = load(many)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    report = json.loads((many / "report.json").read_text())
    stored = sum(p.stat().st_size for p in many.glob("model-*.safetensors"))
    assert report["size"]["checkpoint_bytes"] < stored < report["size"]["checkpoint_bytes"] + 64 * 1024


def _run_cmd(recipe, out, *extra):
    return [sys.executable, "-c", "from compress.cli import app; app()", "run", str(recipe), "smollm2-135m",
            "--out", str(out), *SMALL_EVAL, *extra]


@pytest.mark.slow  # three runs of GPTQ on SmolLM2: about two minutes
def test_a_killed_run_resumes_from_its_last_finished_block_to_the_same_bytes(smol, write_recipe, tmp_path):
    recipe = write_recipe("calibration: {samples: 4, seq_len: 128}\npasses:\n  - type: gptq\n    bits: 4\n"
                          "    group_size: 64\n    targets: ['model.layers.[0-9].*']\n")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(_run_cmd(recipe, whole), capture_output=True).returncode == 0
    proc = subprocess.Popen(_run_cmd(recipe, killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / ".killed.partial" / "stage.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and len(json.loads(state.read_text())["blocks"]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a machine lost: no cleanup at all
    proc.wait()
    finished = len(json.loads(state.read_text())["blocks"])
    assert 3 <= finished < 30 and not killed.exists()
    resumed = subprocess.run(_run_cmd(recipe, killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (killed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not (tmp_path / ".killed.partial").exists()
    log = (killed / "run.log").read_text()
    assert f"resuming after {finished} finished blocks" in log


def test_resume_refuses_another_recipe_and_a_missing_stage(smol, write_recipe, tmp_path):
    recipe = write_recipe("passes:\n  - type: rtn\n    bits: 4\n")
    r = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "none", "--resume", *SMALL_EVAL)
    assert r.exit_code == 2 and "nothing to resume" in r.output
    stage = tmp_path / ".other.partial"
    stage.mkdir()
    (stage / "stage.json").write_text(json.dumps({"key": {"recipe_hash": "x"}, "blocks": {"0": {}}}))
    r = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "other", "--resume", *SMALL_EVAL)
    assert r.exit_code == 2 and "written by another run" in r.output and "recipe_hash" in r.output


def _damaged_copy(folder, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return copy, shard.name


@pytest.mark.parametrize("damage, needle", [("missing", "is missing"), ("truncated", "truncated")])
def test_a_damaged_sharded_model_is_refused_in_one_line(sharded_llama, write_recipe, tmp_path, damage, needle):
    folder, shard = _damaged_copy(sharded_llama, tmp_path, damage)
    recipe = write_recipe("passes:\n  - type: rtn\n    bits: 4\n")
    out = tmp_path / "out"
    r = cli("run", recipe, folder, "--out", out, *SMALL_EVAL)
    assert r.exit_code == 2 and needle in r.output and shard in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "recipe.yaml"]


@pytest.mark.parametrize("option, value, needle", [("--max-shard-size", "lots", "not a size"),
                                                   ("--max-shard-size", "0.1B", "not a size"),
                                                   ("--dtype", "int3", "unknown --dtype")])
def test_bad_load_options_are_one_line_exit_2(write_recipe, tmp_path, option, value, needle):
    recipe = write_recipe("passes:\n  - type: rtn\n    bits: 4\n")
    r = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "out", option, value)
    assert r.exit_code == 2 and needle in r.output and not (tmp_path / "out").exists()


def _codes(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return {k: t for k, t in tensors.items() if k.endswith(".codes")}


@pytest.mark.slow  # four runs on SmolLM2, two of them with two workers: about a minute
def test_two_workers_give_the_bytes_of_one_for_rtn_and_the_codes_for_gptq(smol, write_recipe, tmp_path):
    rtn = write_recipe("passes:\n  - type: rtn\n    bits: 4\n    group_size: 64\n", "rtn.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("run", rtn, "smollm2-135m", "--out", one, *SMALL_EVAL).exit_code == 0
    r = subprocess.run(_run_cmd(rtn, two, "--nproc", "2"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    report = json.loads((two / "report.json").read_text())
    assert report["workers"] == 2 and report["communication_bytes"]["layers"] > 0
    ppl = [json.loads((d / "report.json").read_text())["compressed"]["perplexity"] for d in (one, two)]
    assert abs(ppl[0] - ppl[1]) / ppl[0] < 1e-5  # the same model; the windows are batched differently
    assert not list(tmp_path.glob(".*partial*"))

    gptq = write_recipe("calibration: {samples: 8, seq_len: 128}\npasses:\n  - type: gptq\n    bits: 4\n"
                        "    group_size: 64\n    targets: ['model.layers.[0-3].*']\n", "gptq.yaml")
    one, two = tmp_path / "gptq-one", tmp_path / "gptq-two"
    assert cli("run", gptq, "smollm2-135m", "--out", one, *SMALL_EVAL).exit_code == 0
    r = subprocess.run(_run_cmd(gptq, two, "--nproc", "2"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _codes(one), _codes(two)
    assert len(a) == 4 * 7 and set(a) == set(b)
    equal = sum((a[k] == b[k]).sum().item() for k in a) / sum(a[k].numel() for k in a)
    assert equal >= 0.999
    ppl = [json.loads((d / "report.json").read_text())["compressed"]["perplexity"] for d in (one, two)]
    assert abs(ppl[0] - ppl[1]) / ppl[0] < 0.005
    assert json.loads((two / "report.json").read_text())["communication_bytes"]["statistics"] > 0


def test_a_worker_that_dies_stops_the_run_in_one_line_and_writes_nothing(smol, write_recipe, tmp_path):
    recipe = write_recipe("calibration: {samples: 8, seq_len: 128}\npasses:\n  - type: gptq\n    bits: 4\n"
                          "    group_size: 64\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(_run_cmd(recipe, out, "--nproc", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    state = tmp_path / ".out.partial-worker1" / "stage.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["blocks"]):
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    subprocess.run(["kill", "-9", children[1]])  # worker 1 (started second) is lost
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr[-2000:]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: worker 1 of 2 died (signal 9)"), stderr[-2000:]
    assert not out.exists()


def test_bad_worker_counts_are_refused_before_any_worker_starts(write_recipe, tmp_path):
    recipe = write_recipe("passes:\n  - type: rtn\n    bits: 4\n")
    r = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "out", "--nproc", "0")
    assert r.exit_code == 2 and "at least one worker" in r.output
    r = cli("run", recipe, "smollm2-135m", "--out", tmp_path / "out", "--nproc", "3", "--set",
            "evaluate.max_windows=2")
    assert r.exit_code == 2 and "3 workers need at least 3 evaluation windows" in r.output
    tuned = write_recipe("passes:\n  - type: rtn\n    bits: 4\n  - type: tune\n", "tuned.yaml")
    r = cli("run", tuned, "smollm2-135m", "--out", tmp_path / "out", "--nproc", "2")
    assert r.exit_code == 2 and "cannot be spread over workers" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "tuned.yaml"]
