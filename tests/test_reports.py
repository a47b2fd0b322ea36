"""Reports people read (HTML in a real headless browser), compare, JUnit budgets, the CI workflow."""

import importlib.util
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from conftest import RECIPES, ROOT, cli

FAST = ["--set", "evaluate.max_windows=2", "--set", "export.checkpoint=false", "--quiet"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, smol):
    """RTN at 4, 3 and 2 bits on the first four blocks (data-free, so quick; evaluated on 2 windows of 128 tokens,
    no ONNX export: reports only)."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for bits in (4, 3, 2):
        out = root / f"rtn{bits}"
        result = cli("run", RECIPES / "w4-rtn.yaml", "smollm2-135m", "--out", out, *FAST, "--keep-failed",
                     "--set", f"passes.0.bits={bits}", "--set", "passes.0.group_size=64",
                     "--set", "passes.0.targets=['model.layers.[0-3].*']", "--set", "export.onnx=null",
                     "--set", "evaluate.seq_len=128")
        assert result.exit_code in (0, 1), result.output
        dirs.append(out)
    return dirs


def test_run_writes_html_markdown_json_and_log(three_runs):
    out = three_runs[0]
    for name in ("report.json", "report.md", "report.html", "run.log"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    for fetch in ('src="http', "src='http", 'href="http', "<link", "<script", "@import"):  # self-contained
        assert fetch not in page, fetch
    log = (out / "run.log").read_text()
    assert "base: perplexity" in log and "model.layers.0.self_attn.q_proj: format 4-bit g64" in log


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make setup-browser)")
def test_html_report_renders_its_plots_in_a_headless_browser(three_runs, tmp_path):
    page = (three_runs[0] / "report.html").resolve()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for figure in ("plot-size", "plot-layers-0", "plot-time"):
        start = dom.index(f'id="{figure}"')
        assert "<svg" in dom[start:start + 400], figure
    assert 'id="verdict"' in dom and "perplexity" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert len({tuple(p) for p in pixels[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}) > 20  # plots drawn


def test_compare_three_runs_prints_table_and_writes_pareto_plot(three_runs, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", *three_runs, "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("rtn4", "rtn3", "rtn2", "pareto"):
        assert name in result.output
    assert (out / "compare.svg").read_text().startswith("<svg")
    md = (out / "compare.md").read_text()
    assert md.count("\n| rtn") == 3
    rows = json.loads(cli("compare", *three_runs, "--out", out, "--json").stdout)
    sizes = [r["size MB"] for r in rows]
    assert sizes[0] > sizes[1] > sizes[2] and all(r["pareto"] for r in rows)  # smaller but worse: all on the front
    assert cli("compare", tmp_path / "nothing").exit_code == 2


def test_missed_budget_exits_1_with_a_failed_junit_case(tmp_path, smol):
    junit, summary = tmp_path / "budgets.xml", tmp_path / "summary.md"
    os.environ["GITHUB_STEP_SUMMARY"] = str(summary)
    try:
        result = cli("run", RECIPES / "ci-gate.yaml", "smollm2-135m", "--out", tmp_path / "o", *FAST,
                     "--junit", junit, "--set", "budgets.max_ppl_increase=0.0001")
    finally:
        del os.environ["GITHUB_STEP_SUMMARY"]
    assert result.exit_code == 1
    assert not (tmp_path / "o").exists()
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert suite.get("failures") == "1" and len(cases) == 5
    assert cases["max_ppl_increase"].find("failure") is not None
    assert all(c.find("failure") is None for n, c in cases.items() if n != "max_ppl_increase")
    assert "**Budgets: FAILED**" in summary.read_text() and "| max_ppl_increase |" in summary.read_text()


def test_bad_input_writes_a_junit_error(tmp_path):
    junit = tmp_path / "budgets.xml"
    result = cli("run", tmp_path / "missing.yaml", "smollm2-135m", "--junit", junit)
    assert result.exit_code == 2
    assert "recipe file not found" in ET.parse(junit).getroot().find("testsuite/testcase/error").get("message")


def test_the_ci_workflow_command_passes_its_budgets(tmp_path, smol):
    """Runs the workflow's gate step exactly as written, in a checkout-like folder."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "compress-budget.yml").read_text())
    step = next(s for s in workflow["jobs"]["gate"]["steps"] if s.get("id") == "gate")
    shutil.copytree(RECIPES, tmp_path / "recipes")
    proc = subprocess.run(step["run"], shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    junit = ET.parse(tmp_path / "reports" / "ci-gate-budgets.xml").getroot().find("testsuite")
    assert junit.get("tests") == "5" and junit.get("failures") == "0"
    report = json.loads((tmp_path / "reports" / "ci-gate" / "report.json").read_text())
    assert report["budgets_passed"] and Path(tmp_path / "reports" / "ci-gate" / "model.safetensors").exists()


def test_latency_is_measured_and_gated(tmp_path, smol):
    result = cli("run", RECIPES / "ci-gate.yaml", "smollm2-135m", "--out", tmp_path / "o", *FAST, "--json",
                 "--set", "passes.0.targets=['model.layers.[0-1].*']", "--set", "evaluate.latency_tokens=4",
                 "--set", "budgets.max_latency_ms=0.001")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    lat = next(b for b in summary["budgets"] if b["name"] == "max_latency_ms")
    assert not lat["passed"] and lat["actual"] > 0.001


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed here")
def test_tasks_without_lm_eval_fail_before_any_compute(tmp_path):
    result = cli("run", RECIPES / "ci-gate.yaml", "smollm2-135m", "--out", tmp_path / "o",
                 "--set", "evaluate.tasks=[hellaswag]")
    assert result.exit_code == 2 and "needs lm-eval" in result.output and not (tmp_path / "o").exists()
