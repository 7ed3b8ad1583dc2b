# Two commands on a fresh machine: `make run` (default federation) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/default

.PHONY: setup run smoke bench test clean

setup: $(VENV)/.installed

# torch first, pinned: its CPU build installs from local wheels; a looser spec would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(BIN)/deepfusion run --out $(OUT)

smoke: setup
	$(BIN)/deepfusion run --config configs/smoke.toml --out runs/smoke

bench: setup
	$(BIN)/deepfusion bench --profile quick --out benchmarks/quick

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
