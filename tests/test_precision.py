"""The training passes' bfloat16 setting: ``auto`` uses bfloat16 autocast exactly where the CPU multiplies bfloat16
natively (judged here against the CPU's own feature flags), explicit settings are obeyed, others refused."""

from pathlib import Path

import pytest
import torch

from compress import precision
from compress.precision import bfloat16_autocast, bfloat16_is_fast, uses_bfloat16
from compress.recipe import parse_recipe

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.exists(), reason="the CPU's feature flags are read from Linux's /proc/cpuinfo")
@pytest.mark.parametrize("judge", ["flags", "measurement"])
def test_auto_uses_bfloat16_on_a_cpu_exactly_where_it_has_bfloat16_matrix_instructions(monkeypatch, judge):
    flags = set(next(line for line in CPUINFO.read_text().splitlines() if line.startswith("flags")).split())
    if judge == "measurement":  # as on a CPU whose flags torch does not read (ARM)
        monkeypatch.setattr(precision, "_x86_bfloat16_instructions", lambda: None)
    bfloat16_is_fast.cache_clear()
    try:
        if "amx_bf16" in flags:
            assert bfloat16_is_fast("cpu")
        elif "avx512_bf16" not in flags:  # emulated: many times slower than float32
            assert not bfloat16_is_fast("cpu")
        elif judge == "flags":
            assert bfloat16_is_fast("cpu")
        else:
            pytest.skip("AVX512-BF16 without AMX: the measurement decides, nothing to judge it by")
    finally:
        bfloat16_is_fast.cache_clear()


def test_explicit_settings_are_obeyed_and_auto_follows_the_measurement():
    assert uses_bfloat16(True, "cpu") and not uses_bfloat16(False, "cpu")
    assert uses_bfloat16("auto", "cpu") == bfloat16_is_fast("cpu")
    x = torch.ones(2, 2)
    with bfloat16_autocast(True, "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with bfloat16_autocast(False, "cpu"):
        assert (x @ x).dtype == torch.float32


@pytest.mark.parametrize("kind", ["signround", "peqa"])
def test_the_passes_take_auto_true_or_false_and_refuse_anything_else(kind):
    first = [] if kind == "signround" else [{"type": "rtn"}]
    for value in ("auto", True, False):
        cfg = parse_recipe({"passes": [*first, {"type": kind, "bfloat16": value}]}).passes[-1]
        assert cfg.bfloat16 == value
    assert parse_recipe({"passes": [*first, {"type": kind}]}).passes[-1].bfloat16 == "auto"
    with pytest.raises(Exception, match="bfloat16"):
        parse_recipe({"passes": [*first, {"type": kind, "bfloat16": "maybe"}]})
