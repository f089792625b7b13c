# make demo / make test work on a fresh machine with only Python 3.11: they build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test bench clean

$(BIN)/iaptnet: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/iaptnet
	$(BIN)/iaptnet demo --out demo-out

test: $(BIN)/iaptnet
	$(BIN)/python -m pytest -q

bench: $(BIN)/iaptnet
	$(BIN)/python bench/bench_glm.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
