# Two entry points that do all set-up on a fresh machine with nothing but Python 3.10+:
#   make demo   -- create .venv, install, run the main job on an embedded dataset
#   make test   -- create .venv, install, run the test suite
# TORCH_SPEC selects the torch build: the default is the CPU wheel; on a CUDA machine use e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayoffline-installed

.PHONY: install demo test bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rayoffline demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# headless Chromium for the `rayoffline report` page tests (tests/evaluation/test_report.py, skipped without it):
# Debian's package where apt-get runs as root, else a note; `make demo` does not need it
browser:
	@if command -v chromium >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: installing chromium failed; the report's browser tests will be skipped"; \
	else echo "note: no chromium, and no apt-get as root to install it; the report's browser tests will be skipped"; fi

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
