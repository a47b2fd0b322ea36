"""Property-based fuzzing (hypothesis) of everything a user hands compress: recipe documents, --set strings, and
damaged output files (checkpoint weights, compress.json, ONNX graph and export.json). Every case must end in a
known exit code (0, 1, 2, 3) with a short message, never a traceback, and write nothing.

The default suite runs a bounded number of cases per property; ``pytest -m slow`` (``make test-slow``) runs
the same properties with many more. Each test prints how many cases ran and that none escaped."""

import json
import shutil
import string

import pytest
import yaml
from conftest import RECIPES, cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress
from compress.errors import CompressError

FEW, MANY = 25, 600
KEYS = ["name", "seed", "calibration", "passes", "evaluate", "export", "budgets", "type", "bits", "group_size",
        "sparsity", "pattern", "targets", "overrides", "samples", "dataset", "onnx", "max_ppl", "grid", "kmeans",
        "rtn", "gptq", "asymmetric", "float_target_strength", "channels_per_table", "ünïcødé", ""]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(KEYS))
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=25)
PASS_TYPES = st.sampled_from(["rtn", "gptq", "awq", "wanda", "sparsegpt", "magnitude", "kmeans", "dsnot", "tune",
                              "structured", "signround", "rtm"])
PASS_DOCS = st.fixed_dictionaries({"type": PASS_TYPES}, optional={k: SCALARS | DOCUMENTS for k in KEYS[8:25]})
RECIPES_DOCS = st.one_of(DOCUMENTS, st.fixed_dictionaries({}, optional={
    "passes": st.lists(PASS_DOCS, max_size=3), "calibration": DOCUMENTS, "budgets": DOCUMENTS, "seed": SCALARS}))


class Tally:
    """Counts the cases of one property and prints the count when the test ends."""

    def __init__(self, name, capsys):
        self.name, self.capsys, self.cases = name, capsys, 0

    def report(self):
        with self.capsys.disabled():
            print(f"\nfuzz {self.name}: {self.cases} cases, 0 escaped")


def _short_clean_exit(result, allowed=(0, 1, 2, 3)):
    text = result.stdout + result.stderr
    assert result.exit_code in allowed, text[-2000:]
    assert "Traceback" not in text and len(result.stderr.strip().splitlines()) <= 3, text[-2000:]


def _recipe_documents(tmp_path, capsys, examples):
    tally = Tally("recipe documents (compress validate)", capsys)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(doc=RECIPES_DOCS)
    def check(doc):
        tally.cases += 1
        path = tmp_path / "recipe.yaml"
        try:
            path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        except (yaml.YAMLError, UnicodeEncodeError):
            path.write_text(repr(doc))
        _short_clean_exit(cli("validate", path), allowed=(0, 2))

    check()
    tally.report()


def _raw_recipe_text(tmp_path, capsys, examples):
    tally = Tally("raw recipe bytes (compress validate)", capsys)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.binary(max_size=300))
    def check(text):
        tally.cases += 1
        path = tmp_path / "recipe.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        _short_clean_exit(cli("validate", path), allowed=(0, 2))

    check()
    tally.report()


def _set_strings(capsys, examples):
    tally = Tally("--set strings (compress validate)", capsys)
    keys = st.sampled_from(["passes.0.bits", "passes.0", "passes.9.x", "budgets.max_ppl", "seed", "calibration",
                            "passes.0.overrides", "a.b.c", "", "passes.-1.bits", "export.onnx.weights"])

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(key=keys | st.text(max_size=15), eq=st.booleans(), value=st.text(max_size=30))
    def check(key, eq, value):
        tally.cases += 1
        item = f"{key}={value}" if eq else key + value
        _short_clean_exit(cli("validate", RECIPES / "w4-rtn.yaml", "--set", item), allowed=(0, 2))

    check()
    tally.report()


@pytest.mark.parametrize("examples", [FEW, pytest.param(MANY, marks=pytest.mark.slow)])
def test_recipe_documents_never_escape(tmp_path, capsys, examples):
    _recipe_documents(tmp_path, capsys, examples)


@pytest.mark.parametrize("examples", [FEW, pytest.param(MANY, marks=pytest.mark.slow)])
def test_raw_recipe_bytes_never_escape(tmp_path, capsys, examples):
    _raw_recipe_text(tmp_path, capsys, examples)


@pytest.mark.parametrize("examples", [FEW, pytest.param(MANY, marks=pytest.mark.slow)])
def test_set_strings_never_escape(capsys, examples):
    _set_strings(capsys, examples)


# ---- damaged outputs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def outputs(smol, rtn_first_block, tmp_path_factory):
    """A real checkpoint (4-bit RTN of the first block) and its ONNX export."""
    from compress.checkpoint import save_checkpoint
    from compress.export.onnx import export_to_folder

    folder = tmp_path_factory.mktemp("outputs")
    (folder / "ckpt").mkdir()
    save_checkpoint(rtn_first_block, smol[1], folder / "ckpt", "float16")
    export_to_folder(rtn_first_block, smol[1], folder / "onnx", windows=None, log=lambda m: None)
    return folder


DAMAGE = st.lists(st.tuples(st.floats(min_value=0, max_value=1, exclude_max=True), st.integers(1, 255)),
                  min_size=1, max_size=4)


def _damage(path, edits, truncate):
    raw = bytearray(path.read_bytes())
    for where, xor in edits:
        raw[int(where * len(raw))] ^= xor
    if truncate is not None:
        raw = raw[:int(truncate * len(raw))]
    path.write_bytes(bytes(raw))


def _damaged_files(outputs, tmp_path, capsys, examples, kind, file):
    tally = Tally(f"damaged {kind} {file}", capsys)
    work = tmp_path / kind

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(edits=DAMAGE, truncate=st.none() | st.floats(min_value=0, max_value=1, exclude_max=True))
    def check(edits, truncate):
        tally.cases += 1
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(outputs / kind, work)
        _damage(work / file, edits, truncate)
        try:
            if kind == "ckpt":
                compress.load(work)
            else:
                from compress.export.runtime import OnnxCausalLM

                OnnxCausalLM(work)
        except CompressError as e:
            assert e.exit_code in (2, 3) and "\n" not in str(e)

    check()
    tally.report()


FILES = [("ckpt", "model.safetensors"), ("ckpt", "compress.json"), ("onnx", "model.onnx"), ("onnx", "export.json")]


@pytest.mark.parametrize("kind, file", FILES)
def test_damaged_outputs_fail_cleanly(outputs, tmp_path, capsys, kind, file):
    _damaged_files(outputs, tmp_path, capsys, 6, kind, file)


@pytest.mark.slow
@pytest.mark.parametrize("kind, file", FILES)
def test_damaged_outputs_fail_cleanly_many(outputs, tmp_path, capsys, kind, file):
    _damaged_files(outputs, tmp_path, capsys, 150, kind, file)


def test_a_damaged_checkpoint_through_the_cli_is_one_line_exit_2(outputs, tmp_path):
    work = tmp_path / "ckpt"
    shutil.copytree(outputs / "ckpt", work)
    meta = json.loads((work / "compress.json").read_text())
    meta["layers"]["model.layers.0.self_attn.q_proj"]["bits"] = 8
    (work / "compress.json").write_text(json.dumps(meta))
    result = cli("eval", work, "--max-windows", 1, "--seq-len", 64)
    _short_clean_exit(result, allowed=(2,))
    assert result.exit_code == 2 and "layer model.layers.0.self_attn.q_proj" in result.stderr
    assert set(string.printable) >= set(result.stderr)
