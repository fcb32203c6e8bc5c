# Two commands: `make demo` runs the whole pipeline locally, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-timeseries test venv clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed: install it or run make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m cropchips.demo --output demo-output

demo-timeseries: $(VENV)/.installed
	$(BIN)/python -m cropchips.demo --output demo-output-timeseries --timeseries

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

clean:
	rm -rf demo-output demo-output-timeseries .pytest_cache
