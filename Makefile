# attachgate: `make demo` runs the whole story, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: install demo test check lint typecheck unit bench bench-relay bench-mime bench-dkim bench-download clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11 or newer is needed" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/attachgate demo $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck

unit: install
	$(BIN)/pytest -q

test: check unit

bench: bench-relay bench-mime bench-dkim bench-download

bench-relay: install
	$(BIN)/python bench/relay.py $(ARGS)

bench-mime: install
	$(BIN)/python bench/mime.py $(ARGS)

bench-dkim: install
	$(BIN)/python bench/dkim.py $(ARGS)

bench-download: install
	$(BIN)/python bench/download.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
