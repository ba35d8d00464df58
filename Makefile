# Two commands for a newcomer: `make demo` (whole pipeline on the bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC in its own environment: dvc pins antlr4-python3-runtime 4.9 (through hydra/omegaconf) while
# Dagster's asset-selection parser needs 4.13. Its stages call the project's CLI from .venv.
DVC_VENV := .dvc-venv
DVC := $(DVC_VENV)/bin/dvc
DVC_STAMP := $(DVC_VENV)/.installed
# dvc-s3: the S3 remote of deploy/ (docs/deploy.md); tests/test_services.py pushes through it.
# django-js-lib-vega-embed: vega, vega-lite and vega-embed as plain files (no dependencies), which
# PLOTS_PAGE inlines so that `dvc plots show` draws its charts with no network.
DVC_PACKAGES := 'dvc>=3.67,<4' 'dvc-s3>=3.3,<4' 'django-js-lib-vega-embed==6.29.0.3'
# deepcluster.paths.PLOTS_PAGE; DVC reads `plots.html_template` relative to .dvc/
PLOTS_PAGE := .dvc/plots/offline.html
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: install services-deps data push-data demo dvc-lock dagster serve test test-fast lint clean \
	test-numerics numerics-grey-learning numerics-others gpu-wheels

# pip takes torch from this machine's local wheels where they exist; see README "Installing".
# The services extra (PostgreSQL, S3 and Kubernetes clients, moto) is for deploy/ and its tests.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,services]'
	touch $(STAMP)

$(DVC_STAMP): Makefile
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/python -m pip install -q --upgrade pip
	$(DVC_VENV)/bin/python -m pip install -q $(DVC_PACKAGES)
	touch $(DVC_STAMP)

# DVC's own page loads the chart scripts from a CDN (blank charts offline); this one inlines them
$(PLOTS_PAGE): $(STAMP) $(DVC_STAMP) ssl/deepcluster/dvcstages.py
	$(BIN)/python -m deepcluster.dvcstages \
	  "$$($(DVC_VENV)/bin/python -c 'import js_lib_vega_embed as m; print(m.__path__[0])')"
	$(DVC) config --local plots.html_template $(patsubst .dvc/%,%,$(PLOTS_PAGE))

install: $(STAMP) $(DVC_STAMP) $(PLOTS_PAGE)

# PostgreSQL's server binaries for tests/test_services.py, from Debian, only when missing and only
# as root (CI); elsewhere that test skips and says why. `make demo` needs none of it.
services-deps:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
	else \
	  echo "PostgreSQL server not installed (apt-get install postgresql): tests/test_services.py will skip"; \
	fi

# data/: pulled from the DVC remote when it has it, else exported; either way it must match data.dvc.
# The remote (~/.cache/deepcluster/dvc-remote) is shared by every clone on the machine. It is
# content-addressed (an object's name is its md5) and written atomically, and .dvc/config has
# `verify = true`: a pull re-hashes what it fetched, so a damaged object fails the pull (and is
# not cached) instead of landing in data/, and this clone exports the digits itself.
data: install
	@if $(DVC) pull -q data.dvc 2>/dev/null; then \
	  echo "data/ pulled from the DVC remote"; \
	else \
	  echo "data/ not in the DVC remote (or its copy there is damaged): exporting the digits"; \
	  $(BIN)/deepcluster sample-data digits data; \
	fi
	$(DVC) commit -q -f data.dvc
	@git diff --quiet data.dvc || { git checkout -q data.dvc; echo "data/ does not match data.dvc"; exit 1; }
	@echo "data/ matches data.dvc ($$(grep -m1 md5 data.dvc))"

# data/ into the shared DVC remote, so the next clone on this machine pulls instead of exporting;
# a remote that cannot be written costs that, nothing else (the demo's results are complete)
PUSH_DATA = $(DVC) push -q data.dvc && echo "data/ pushed to the DVC remote" \
	|| echo "data/ not pushed to the DVC remote ($(DVC) push data.dvc says why); the results are complete"

push-data: install
	@$(PUSH_DATA)

demo: data
	$(BIN)/python -m orchestration materialize --demo
	@$(PUSH_DATA)
	@echo
	@echo "Done. Pictures: artifacts/eval/clusters.png, curves.png, cluster_sizes.png; figures: artifacts/eval/metrics.json"
	@echo "Browse:  make dagster   (Dagster UI, http://127.0.0.1:3000)"
	@echo "         $(BIN)/mlflow ui   (runs and the model registry, http://127.0.0.1:5000)"
	@echo 'Also:    $(BIN)/deepcluster run data   or   PATH="$$PWD/$(BIN):$$PATH" $(DVC) repro'

# dvc.lock after a change to a stage's code, parameters or command (tests/test_dvc_lock.py, part
# of `make test`, names what changed): the stages concerned re-run on the demo data, then
# `git add dvc.lock` (never the outputs: artifacts/ is ignored; `dvc push` keeps them)
dvc-lock: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DVC) repro
	$(DVC) status

dagster: install
	$(BIN)/python -m orchestration dev  # dg dev on .dagster/, with the one-slot GPU pool

# the registry's champion over HTTP; `mlflow models serve` starts uvicorn from PATH
MODEL ?= models:/deepcluster@champion
PORT ?= 5001
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow models serve -m $(MODEL) --env-manager local -h 127.0.0.1 -p $(PORT)

test: install services-deps
	$(BIN)/ruff check ssl orchestration tests benchmarks deploy
	$(BIN)/python -m pytest

# The tests that train and assert on what came out (marker `numerics`: learning margins, collapse,
# drift, exact resume, two-process training, the whole graph's checks) on another numeric path than
# this CPU's own: as an AVX2-only CPU runs them (no AVX512 kernels, so fp32: no bf16 autocast), with
# one torch thread, in two pytest processes side by side (one per core; v1 and v2 learning on grey
# take about as long as all the others). NUMERICS_THREADS=2 runs them one after the other with two threads.
# DEEPCLUSTER_TEST_COMPUTE carries the settings to every test that trains (docs/testing.md).
NUMERICS_THREADS ?= 1
NUMERICS_ENV = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=$(NUMERICS_THREADS) \
	DEEPCLUSTER_TEST_COMPUTE=amp=false,threads=$(NUMERICS_THREADS)
NUMERICS_SPLIT = test_learning and not deepcluster-colour and not deepercluster
numerics-grey-learning: NUMERICS_K = $(NUMERICS_SPLIT)
numerics-others: NUMERICS_K = not ($(NUMERICS_SPLIT))

test-numerics: install
	@$(MAKE) --no-print-directory -j$(if $(filter 1,$(NUMERICS_THREADS)),2,1) --output-sync=target \
	  numerics-grey-learning numerics-others

numerics-grey-learning numerics-others:  # run by test-numerics, after its install
	$(NUMERICS_ENV) $(BIN)/python -m pytest -m numerics -k "$(NUMERICS_K)"

# the unit tests (no `slow` marker: no training for minutes, no servers), for a quick loop
test-fast: install
	$(BIN)/ruff check ssl orchestration tests benchmarks deploy
	$(BIN)/python -m pytest -m "not slow" -q

lint: install
	$(BIN)/ruff check ssl orchestration tests benchmarks deploy

# The wheels that the training loop imports and a bare torch GPU machine may lack (the device tool's:
# docs/benchmarks.md "GPU check"), at .venv's versions, for CPython 3.11-3.13 on x86-64 Linux;
# benchmarks/gpu_check.py installs the ones missing there. No faiss: k-means runs in torch.
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml tqdm \
	kornia kornia-rs
GPU_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels
	pins="$$($(BIN)/python -c 'import sys, importlib.metadata as m; print(*(f"{d}=={m.version(d)}" for d in sys.argv[1:]))' $(GPU_WHEELS))" && \
	for v in 3.11 3.12 3.13; do \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $$v \
	    --implementation cp $(GPU_PLATFORMS) -d .gpu-wheels $$pins || exit 1; \
	done
	@du -sh .gpu-wheels

clean:
	rm -rf artifacts dvc_plots .pytest_cache
