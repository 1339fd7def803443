# stockcast: make install | train | package | serve | stop | test  (and refresh, backtest, versions, rollback, ui)
PYTHON  ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch: a bare "torch" from PyPI (or a range admitting a newer release) pulls
# GBs of CUDA packages. A CPU wheel already on this machine (pip's find-links) is used first.
TORCH   ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXPERIMENT ?= petr4
# serving profile: throughput (batches requests) | latency (no batching wait); see README
PROFILE ?= throughput

.PHONY: install experiment-config train refresh backtest versions rollback ui test test-fast lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-deps --no-index "$(TORCH)" 2>/dev/null \
	  || $(BIN)/pip install --quiet --no-deps "$(TORCH)" --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

# a run becomes the champion only if the walk-forward backtest of its config is not significantly
# worse than persistence or drift (the gate); train.py runs that backtest first when there is none
# of this config and data (~1-2 min on 2 cores)
# an EXPERIMENT with no config: one line (before anything installs), not Hydra's trace
experiment-config:
	@test -f configs/experiment/$(EXPERIMENT).yaml || { echo "error: no configs/experiment/$(EXPERIMENT).yaml \
	(experiments: $$(ls configs/experiment | sed 's/\.yaml$$//' | tr '\n' ' ' | sed 's/ $$//')); another ticker: \
	$(BIN)/python train.py data.ticker=SYMBOL, or a config of your own beside those" >&2; exit 2; }

train: experiment-config install
	$(BIN)/python train.py experiment=$(EXPERIMENT)

# new closes (yfinance, else data/incoming/), retrain, the gate, the new champion swapped into the
# running server without a failed request, the served forecasts scored (python -m stockcast.refresh)
refresh: experiment-config install
	$(BIN)/python -m stockcast.refresh experiment=$(EXPERIMENT)

backtest: experiment-config install
	$(BIN)/python backtest.py experiment=$(EXPERIMENT)

# versions: python -m stockcast.registry list|promote|rollback <name>; the MLflow UI on loopback
versions: install
	$(BIN)/python -m stockcast.registry list $(EXPERIMENT)

# the previous champion back in artifacts/<name>, archived, and served if a server runs
rollback: install
	$(BIN)/python -m stockcast.registry rollback $(EXPERIMENT)
	$(MAKE) package EXPERIMENT=$(EXPERIMENT)
	@if $(BIN)/python -m stockcast.serve status >/dev/null 2>&1; then \
	  $(BIN)/python -m stockcast.serve start $(SERVE_ARGS); fi

ui: install
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns.db} \
	  --host 127.0.0.1 --port $(or $(UI_PORT),5000)

# two processes, a whole test file each: module fixtures (a trained model, a server) stay shared,
# and one file's waits for a server overlap the other's work (4.4 min in one process, 2.9 in two)
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .

# ---- serving: artifacts -> model_store/lstm.mar -> TorchServe ----------------------------------
ART := artifacts/$(EXPERIMENT)

.PHONY: package kserve serve stop status bench soak

$(ART)/meta.json:
	$(MAKE) train EXPERIMENT=$(EXPERIMENT)

# stockcast.package rebuilds lstm.mar only when its content differs from artifacts + handler
package: install $(ART)/meta.json
	$(BIN)/python -m stockcast.package $(ART) model_store --profile $(PROFILE) --all

# start|stop|status exit codes (python -m stockcast.serve --help): 0 done (stop: also when nothing
# ran, with a message), 1 failed, 3 not running (status), 4 running but no worker READY or the key
# refused (status). Token auth is on: SERVE_ARGS=--no-token-auth turns it off (with a warning).
serve: package
	$(BIN)/python -m stockcast.serve start $(SERVE_ARGS)

stop:
	@if test -x $(BIN)/python; then $(BIN)/python -m stockcast.serve stop; \
	else echo "TorchServe is not running"; fi

status:
	@if test -x $(BIN)/python; then $(BIN)/python -m stockcast.serve status; \
	else echo "TorchServe is not running" >&2; exit 3; fi

# the folder KServe's TorchServe runtime serves (deploy/kserve/): copy it to the storageUri
KSERVE_DIR ?= kserve/$(EXPERIMENT)
kserve: install $(ART)/meta.json
	$(BIN)/python -m stockcast.package $(ART) model_store --profile $(PROFILE) --kserve $(KSERVE_DIR)

bench: package
	$(BIN)/python -m stockcast.bench $(BENCH_ARGS)
soak: package
	$(BIN)/python -m stockcast.soak $(SOAK_ARGS)

# ---- the serving image: podman here (deploy/image/base.sh once, as root: no registry), else docker
IMAGE ?= stockcast:latest

.PHONY: image image-test

# rebuilt layer by layer from the engine's cache (13-30 s when nothing changed, ~5-6 min cold);
# IMAGE_BUILD_FLAGS=--no-cache for a cold build
image:
	IMAGE=$(IMAGE) TORCH=$(TORCH) deploy/image/build.sh $(IMAGE_BUILD_FLAGS)

# runs the image (builds it first only when its inputs changed) and checks token, forecast, metrics,
# healthcheck, uid and the stop time
image-test: install
	IMAGE=$(IMAGE) TORCH=$(TORCH) $(BIN)/python -m pytest tests/test_image.py -v -rP
