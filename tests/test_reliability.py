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
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_within_seconds_and_leaves_nothing(tmp_path, smol, sig, code):
    out = tmp_path / "run"
    proc = _start(out)
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


def test_two_runs_at_once_on_one_output_exactly_one_wins(tmp_path, smol):
    out = tmp_path / "run"
    procs = [_start(out, *SMALL, "--set", "export.onnx=null") for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is writing" in loser or "already exists" in loser
    assert _leftovers(out) == ["run"]
