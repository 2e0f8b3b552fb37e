# peft-vision-ext: two commands on a fresh machine.
#   make demo   creates .venv, installs, runs the space-rocks recipe (CPU; 7-10 min on an idle 2-core VM), prints its table
#   make test   creates .venv, installs, runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/space_rocks

.PHONY: demo test test-all lint benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch from PyPI (its default build runs on CPU too); timm needs the matching torchvision.
	$(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# --overwrite_output_dir: a second `make demo` rewrites its own outputs (a recipe refuses a non-empty output
# directory without it).
demo: $(STAMP)
	$(BIN)/python recipes/space_rocks/run_space_rocks.py recipes/space_rocks/space_rocks.json --overwrite_output_dir

# Two pytest workers, one torch thread each (the tests are small: a second worker beats a second intra-op thread).
# `make test-all` adds the long runs (`slow`: full recipes, every matrix case under every common check).
test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" -n 2 --timeout 900

test-all: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --timeout 3600

lint: $(STAMP)
	$(BIN)/ruff check peft_vision_ext recipes benchmarks tests
	$(BIN)/ruff format --check peft_vision_ext recipes benchmarks tests

benchmark: $(STAMP)
	$(BIN)/python benchmarks/bench_conv_adapter.py --markdown

clean:
	rm -rf $(VENV) outputs .pytest_cache
