# The two set-up commands of the README: `make demo` and `make test`. Everything else is installed by these.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIXTURES ?= ../shared/fixtures
PYTEST_ARGS ?=
DATA ?= data/fashion-mnist
RUN ?= fashion_mnist-demo

.PHONY: demo data samples info bench bench-gpu test test-all docs-check install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian install python3-venv (apt-get install python3-venv) or set PYTHON=/path/to/python3.11"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The main job: T2T-ViT from scratch on Fashion-MNIST. best.pth is chosen on 5,000 training images held out by
# seed (the recipe's val_holdout); the 10,000 test images are read once, by the final eval.
# Re-running it resumes (or, when finished, just reports) the same run.
demo: $(STAMP) data samples
	$(VENV)/bin/t2tvit train --config fashion_mnist --data $(DATA) --run-name $(RUN)
	$(VENV)/bin/t2tvit eval --checkpoint runs/$(RUN)/best.pth --data $(DATA) --split test --output runs/$(RUN)/test-eval --force
	@echo "run folder: runs/$(RUN) (metrics.jsonl, curves.png, confusion_matrix.png, best.pth, test-eval/)"

# Fashion-MNIST from Debian's dataset-fashion-mnist package (apt-get download + dpkg -x; no root needed)
data: $(STAMP)
	$(PY) -m t2tvit.data.fetch $(DATA)

# The sample images the README's predict, visualize and ONNX examples read, from the Fashion-MNIST test split
samples: $(STAMP) data
	$(PY) examples/make_samples.py $(DATA) samples

# Every variant with its parameter counts; outputs checked against the official fixtures when they are there
info: $(STAMP)
	@if [ -f "$(FIXTURES)/official/tiny_configs.json" ]; then \
		$(VENV)/bin/t2tvit info --fixtures "$(FIXTURES)/official"; \
	else \
		$(VENV)/bin/t2tvit info; \
		echo "(no official fixtures at $(FIXTURES); set FIXTURES=DIR to also check outputs against them)"; \
	fi

# Parameters and MACs of every variant, then throughput, memory and MFU beside timm peers on this CPU (a few
# minutes on 2 cores): JSON and PNG in benchmarks/. BENCH_ARGS adds options, e.g. BENCH_ARGS="--ab all".
BENCH_ARGS ?=
bench: $(STAMP)
	$(VENV)/bin/t2tvit benchmark --preset cpu $(BENCH_ARGS)

# The GPU script (bf16, batch 128, eager and compiled, train and inference): under 5 minutes on one H100
bench-gpu: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu.sh $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -n auto $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -n auto -m 'slow or not slow' $(PYTEST_ARGS)

# README and docs/: links, tables and every marked example, including those that read the demo's model
docs-check: $(STAMP)
	@test -f runs/$(RUN)/best.pth || { echo "error: runs/$(RUN)/best.pth not found; run make demo first"; exit 2; }
	T2TVIT_DEMO_RUN=runs/$(RUN) T2TVIT_DATA=$(DATA) $(PY) -m pytest tests/test_docs.py -n 0 -m 'slow or not slow' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
