# Two set-up commands: `make demo` and `make test`. Each creates .venv if missing and installs
# the project into it (again only when pyproject.toml changed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-oncofed

.PHONY: demo test lint clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo-output

# Two worker processes, one test file each at a time: much of the suite waits on servers, browsers and
# heartbeats rather than computing, so two files side by side finish in about two thirds of the time on
# 2 cores. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy imaging models fl_client fl_server scripts

clean-demo:
	rm -rf demo-output
