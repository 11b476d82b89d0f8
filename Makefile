# The two set-up commands of the README: `make demo` and `make test`. Everything else is installed by these.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIXTURES ?= ../shared/fixtures
PYTEST_ARGS ?=

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian install python3-venv (apt-get install python3-venv) or set PYTHON=/path/to/python3.11"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@if [ -f "$(FIXTURES)/official/tiny_configs.json" ]; then \
		$(VENV)/bin/t2tvit info --fixtures "$(FIXTURES)/official"; \
	else \
		$(VENV)/bin/t2tvit info; \
		echo "(no official fixtures at $(FIXTURES); set FIXTURES=DIR to also check outputs against them)"; \
	fi

test: $(STAMP)
	$(PY) -m pytest -n auto $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -n auto -m 'slow or not slow' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
