# Two commands for a newcomer: `make demo` (whole pipeline on the bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

# pip takes torch from this machine's local wheels where they exist; see README "Installing".
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/deepcluster sample-data digits data
	$(BIN)/deepcluster run data
	@echo
	@echo "Done. Open artifacts/eval/clusters.png (cluster pictures), artifacts/eval/curves.png"
	@echo "(training curves) and artifacts/eval/metrics.json; assignments: artifacts/cluster/assignments.parquet"

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check ssl orchestration tests benchmarks

clean:
	rm -rf artifacts .pytest_cache
