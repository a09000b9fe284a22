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
# 2 cores. PYTEST_WORKERS=0 runs everything in one process. Idle OpenMP threads sleep instead of spinning:
# two trainings side by side on 2 cores took 41 s each with spinning threads, 14 s without (one alone: 12 s).
PYTEST_WORKERS ?= 2

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy imaging models fl_client fl_server scripts

clean-demo:
	rm -rf demo-output
