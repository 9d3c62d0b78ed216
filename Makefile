# entropy-callback: `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch lies on disk on our machines; override for CUDA: make TORCH=torch
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

demo: install
	$(PY) examples/grpo_demo.py --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check entropy_callback tests examples benchmarks

bench: install
	$(PY) benchmarks/probe_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
