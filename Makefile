# BoltzLab. `make lab` opens the course; `make test` runs everything CI runs.
# Both set up .venv first (pip, with torch pinned to the CPU build: requirements.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8888
LAB_ARGS ?=
JOBS   ?= 2
STAMP  := $(VENV)/.installed

.PHONY: setup browser-deps sandbox-deps lab test test-fast sync exercises check-exercises release grade bench reference clean-venv help

help:
	@echo "make lab        set up, then open JupyterLab on chapter 00"
	@echo "make test       set up, then run the whole test suite (unit + notebooks, smoke budget)"
	@echo "make sync       pair chapters/*.py and solutions/*.py with their .ipynb (jupytext --sync), stamp metadata"
	@echo "make exercises  regenerate exercises/ from solutions/"
	@echo "make release    write the student release (no solutions) to release/"
	@echo "make grade SUBMISSIONS=dir [OUT=scores.csv] [FEEDBACK=feedback]   grade submitted notebooks (sandboxed)"

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp .jupyter/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $(STAMP)

lab: setup
	$(BIN)/jupyter lab --port=$(PORT) $(LAB_ARGS) chapters/00_boltzmann_mcmc.ipynb

# $(call apt-install-missing,COMMAND,DEBIAN_PACKAGE,WHAT_FOR,WHAT_HAPPENS_WITHOUT): as root
# on Debian, install the package when the command is missing; elsewhere say what is lost.
define apt-install-missing
@if ! command -v $(1) >/dev/null 2>&1; then \
  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
    echo "installing Debian's $(2) $(3)"; \
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
  else \
    echo "$(1) not found and cannot be installed here: $(4)"; \
  fi; \
fi
endef

# The browser test drives Debian's chromium with Playwright (never Playwright's own download).
browser-deps:
	$(call apt-install-missing,chromium,chromium,for the browser test,the browser test will be skipped)

# The grader runs each submission in a bubblewrap sandbox (boltzlab/grading/sandbox.py).
sandbox-deps:
	$(call apt-install-missing,bwrap,bubblewrap,for the grader's sandbox,make grade refuses to run and its tests are skipped)

test: setup browser-deps sandbox-deps
	BOLTZLAB_BUDGET=smoke OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile \
	  --nbval-lax --nbval-current-env -p no:cacheprovider \
	  tests chapters solutions exercises

test-fast: setup
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile -m "not slow" tests

# After pairing, stamp the kernel's language_info into the notebooks (what JupyterLab adds on
# opening), so that opening one does not mark it modified; jupytext keeps it on later syncs.
sync: setup
	$(BIN)/jupytext --sync chapters/[0-9A]*.py solutions/*.py
	$(BIN)/python -m boltzlab.notebooks stamp chapters/[0-9A]*.ipynb solutions/*.ipynb

exercises: setup
	$(BIN)/python -m boltzlab.exercises build

check-exercises: setup
	$(BIN)/python -m boltzlab.exercises check

RELEASE ?= release
release: setup
	$(BIN)/python -m boltzlab.exercises release $(RELEASE)

# Writes only $(OUT) and $(FEEDBACK)/ (both git-ignored at their defaults).
SUBMISSIONS ?= submissions
OUT ?= scores.csv
FEEDBACK ?= feedback
grade: setup sandbox-deps
	$(BIN)/python -m boltzlab.grading grade $(SUBMISSIONS) --out $(OUT) --feedback $(FEEDBACK)

bench: setup
	$(BIN)/python benchmarks/bench_score_estimator.py
	$(BIN)/python benchmarks/bench_gmm_score.py

reference: setup
	$(BIN)/python -m boltzlab.reference build all

clean-venv:
	rm -rf $(VENV)
