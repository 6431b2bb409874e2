# Quick start: `make demo` and `make test`. Both create .venv and install the package when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := outputs/demo
# One real crack photo beside the checkout (shared data), to show prediction on a real inspection image.
REAL_PHOTO := $(firstword $(wildcard ../shared/data/deepcrack-sample/val/images/*.jpg))

.PHONY: demo test bench install clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# The reference PQ implementation for tests and benchmarks; it pins numpy<2, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps panopticapi-lite
	touch $(STAMP)

install: $(STAMP)

LAUNCH := HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 \
	--mixed_precision no --dynamo_backend no

# The main job end to end on the embedded demo data: data -> dataset -> stage 1 -> stage 2 -> val PQ.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg demo-data $(DEMO)/data
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg build-dataset --images $(DEMO)/data/images --masks $(DEMO)/data/masks \
		--labels $(DEMO)/data/labels.yaml --out $(DEMO)/dataset --workers 2 --quiet
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg validate $(DEMO)/dataset
	$(LAUNCH) recipes/stage1.py --dataset_dir $(DEMO)/dataset --output_dir outputs/stage1
	$(LAUNCH) recipes/stage2.py --dataset_dir $(DEMO)/dataset --model_name_or_path outputs/stage1 \
		--output_dir outputs/stage2
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg evaluate --model outputs/stage2 --dataset_dir $(DEMO)/dataset \
		--json outputs/stage2/val_metrics.json
	HF_HUB_OFFLINE=1 $(BIN)/hf-detr-seg predict --model outputs/stage2 --out outputs/predictions \
		"$(DEMO)/dataset/images/val/demo_000*.jpg" $(REAL_PHOTO) --tile-size 256 --mm-per-pixel 0.5

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Side-by-side timings against the references (transformers, panopticapi, 1 worker); writes benchmarks/results.{json,md}.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

clean:
	rm -rf outputs
