"""Runs that are stopped, collide or run out of disk leave nothing behind and say why in one line."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import RECIPES, cli

SMALL = ["--set", "evaluate.max_windows=1", "--set", "evaluate.seq_len=64", "--quiet"]


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == out.name)


def _start(out, *extra):
    cmd = [sys.executable, "-c", "from compress.cli import app; app()", "run", str(RECIPES / "w4-rtn.yaml"),
           "smollm2-135m", "--out", str(out), *extra]
    # Ctrl-C's default action in the child even when the tests run as a background job (whose shell ignores SIGINT,
    # and a process keeps an ignored SIGINT ignored)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_within_seconds_and_leaves_nothing(tmp_path, smol, sig, code):
    out = tmp_path / "run"
    proc = _start(out, "--set", "evaluate.max_windows=64")  # an evaluation that outlasts the second below
    for line in proc.stderr:  # wait until the model is loaded and the run is working
        if "evaluating on" in line:
            break
    time.sleep(1)
    sent = time.perf_counter()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-2000:]
    assert time.perf_counter() - sent < 15
    assert "nothing was written" in stderr.splitlines()[-1]
    assert _leftovers(out) == []


def test_a_staging_folder_is_removed_when_the_write_is_interrupted(tmp_path):
    from compress.cli import Terminated
    from compress.staging import staged_folder

    out = tmp_path / "run"
    with pytest.raises(Terminated), staged_folder(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise Terminated
    assert _leftovers(out) == []


def test_out_of_disk_while_writing_is_one_line_exit_2_and_nothing_left(tmp_path, smol, monkeypatch):
    import compress.runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compress.runner, "save_checkpoint", full)
    out = tmp_path / "run"
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, *SMALL, "--set", "export.onnx=null")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: cannot write {out}: No space left on device (hint: check permissions " \
                                    "and free disk)"
    assert _leftovers(out) == []


def test_a_second_run_on_the_same_output_fails_naming_the_first(tmp_path, smol):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(str(holder.pid))
        result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, *SMALL)
        assert result.exit_code == 2
        assert f"another run (pid {holder.pid}) is writing {out}" in result.stderr
        assert lock.read_text() == str(holder.pid) and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the next run takes it over, then releases it
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, *SMALL, "--set", "export.onnx=null")
    assert result.exit_code == 0, result.stderr
    assert _leftovers(out) == ["run"]


@pytest.mark.slow
def test_two_runs_at_once_on_one_output_exactly_one_wins(tmp_path, smol):
    out = tmp_path / "run"
    procs = [_start(out, *SMALL, "--set", "export.onnx=null") for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is writing" in loser or "already exists" in loser
    assert _leftovers(out) == ["run"]


# ---- untrusted model files, resources ------------------------------------------------------------------------

def _tiny_folder(folder):
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder, model


def test_pickle_weights_need_allow_pickle(tmp_path):
    import torch

    folder, model = _tiny_folder(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    result = cli("run", RECIPES / "w4-rtn.yaml", folder, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "holds only pickle weights (pytorch_model.bin)" in result.stderr
    assert "--allow-pickle" in result.stderr and not (tmp_path / "out").exists()
    result = cli("run", RECIPES / "w4-rtn.yaml", folder, "--out", tmp_path / "out", "--quiet", "--allow-pickle")
    # past the check: the weights load (this tiny folder has no tokenizer, so the run stops there)
    assert result.exit_code == 2 and "only pickle weights" not in result.stderr and "tokenizer" in result.stderr


@pytest.mark.parametrize("damage, needle", [
    (lambda raw: (10 ** 12).to_bytes(8, "little") + raw[8:], "its header claims 1,000,000,000,000 bytes"),
    (lambda raw: raw[: len(raw) // 2], "claims bytes"),
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "its header is not JSON"),
])
def test_damaged_safetensors_headers_are_refused_before_loading(tmp_path, damage, needle):
    folder, _ = _tiny_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    result = cli("run", RECIPES / "w4-rtn.yaml", folder, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_absurd_gguf_header_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + bytes(8 + 64))
    result = cli("run", RECIPES / "w4-rtn.yaml", path, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "GGUF header claims 1,099,511,627,776 tensors" in result.stderr


def test_a_run_that_cannot_fit_is_refused_before_loading_with_the_numbers(tmp_path, monkeypatch):
    import compress.resources
    import compress.runner
    from compress.errors import ModelError

    out = tmp_path / "out"
    monkeypatch.setattr(compress.resources, "available_memory", lambda: 0.5e9)
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, "--quiet")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not enough memory: this run needs about 1.9 GB (0.13B parameters, one block at a time" in result.stderr
    assert "0.5 GB is available" in result.stderr and _leftovers(out) == []
    monkeypatch.setattr(compress.resources, "available_memory", lambda: 1e12)
    monkeypatch.setattr(compress.resources, "free_disk", lambda folder: 1e6)
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, "--quiet")
    assert result.exit_code == 2 and "not enough disk" in result.stderr and "0.0 GB is free" in result.stderr

    def reached(*args, **kwargs):
        raise ModelError("loading reached")

    monkeypatch.setattr(compress.runner, "resolve", reached)
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, "--quiet", "--ignore-resource-check")
    assert result.exit_code == 2 and "loading reached" in result.stderr and _leftovers(out) == []


@pytest.mark.slow
def test_runs_converting_the_default_model_at_once_share_the_cache_safely(tmp_path):
    """Three processes convert the offline model into one empty cache at the same time: all succeed and the
    cache holds one complete copy (each writes a private folder renamed into place)."""
    code = "from compress.models import resolve; m, t, i = resolve('smollm2-135m'); print(i.path)"
    env = {**os.environ, "COMPRESS_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    results = [(p.wait(timeout=900), p.stdout.read().strip(), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _, _ in results), [err[-500:] for _, _, err in results]
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    assert {out for _, out, _ in results} == {str(folder)}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2-135m"]  # no leftover temporary copies
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
