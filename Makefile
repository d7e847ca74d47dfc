# One-command set-up, demo and tests. `make setup` is idempotent: the stamp file's name is a
# hash of every input that decides what gets installed, so a second run with nothing changed
# is a no-op, and any change to those inputs re-installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCHREC := torchrec==1.8.0
SETUP_INPUTS := pyproject.toml requirements/cpu.txt Makefile
SETUP_HASH := $(shell cat $(SETUP_INPUTS) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.setup-$(SETUP_HASH)
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -r requirements/cpu.txt \
	  || { echo "make setup: a pinned package in requirements/cpu.txt could not be installed (see pip's message above: it names the package)"; exit 1; }
	@$(BIN)/python -m pip install --quiet --no-deps $(TORCHREC) \
	  || { echo "make setup: could not install $(TORCHREC)"; exit 1; }
	@$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . \
	  || { echo "make setup: could not install ctrscale in editable mode"; exit 1; }
	@$(BIN)/python -c "import torch, fbgemm_gpu, torchrec; print('stack:', 'torch', torch.__version__, '| torchrec', torchrec.__version__)"
	@rm -f $(VENV)/.setup-*
	@touch $@

demo: setup
	@test -f $(DEMO_DIR)/data/metadata.json \
	  || $(BIN)/ctrscale synth --rows 2000000 --out $(DEMO_DIR)/data --seed 0
	rm -rf $(DEMO_DIR)/train
	$(BIN)/ctrscale train --config pipelines/demo.toml --set "data.train=['$(DEMO_DIR)/data']" \
	  --out $(DEMO_DIR)/train

lint: setup
	$(BIN)/ruff check ctrscale tests pipelines
	$(BIN)/ruff format --check ctrscale tests pipelines
	$(BIN)/hadolint --config docker/.hadolint.yaml docker/Dockerfile

format: setup
	$(BIN)/ruff check --fix ctrscale tests pipelines
	$(BIN)/ruff format ctrscale tests pipelines

# One pytest worker per core: most tests wait on child processes (training runs, torchrun,
# servers), which overlap well; CI's 30 minutes hold only with them in parallel.
test: lint
	$(BIN)/pytest -n auto

test-fast: lint
	$(BIN)/pytest -n auto -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
