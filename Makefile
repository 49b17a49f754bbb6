# Shortcuts; the README's two commands are the canonical ones.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all test-cluster ui server bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/python src/train.py -m clip.max_norm=1,5,20

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m "slow or not slow"

test-cluster: install  ## a real single-node Slurm cluster (root; installs Debian's slurm packages), sweeps through it
	$(BIN)/python -m pytest -m cluster -n 0

ui:
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

server:  ## a local tracking server on 127.0.0.1:5000 with the embedded store (mlruns/server.db); jobs: tracking=server
	$(BIN)/python -m gradsweep.track.server --port 5000 --store mlruns

bench: install
	$(BIN)/python benchmarks/telemetry_overhead.py

clean:
	rm -rf outputs multirun
