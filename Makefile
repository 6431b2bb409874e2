# Quick start: `make demo` and `make test`. Both create .venv and install the package when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := outputs/demo

.PHONY: demo test bench install clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg demo-data $(DEMO)/data --num-images 40 --size 256
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg build-dataset --images $(DEMO)/data/images --masks $(DEMO)/data/masks \
		--labels $(DEMO)/data/labels.yaml --out $(DEMO)/dataset --workers 2 --quiet
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg validate $(DEMO)/dataset

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf outputs
