# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint bench model clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sorter demo --config config/sim.yaml --duration 60 --seed 7

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check sorter sim hw tests
	$(BIN)/mypy sorter sim

bench: $(STAMP)
	$(BIN)/sorter bench --config config/sim.yaml

# Retrain the shipped model from simulator renders (needs PyTorch CPU: the `train` extra).
model: $(STAMP)
	$(BIN)/pip install --quiet -e '.[train]'
	$(BIN)/sorter sim dataset --out data/sim-ds --per-class 1000 --seed 1
	$(BIN)/sorter model train --data data/sim-ds --out models/sorter-cnn.onnx --epochs 40 --time-budget 0 --seed 0

clean-venv:
	rm -rf $(VENV)
