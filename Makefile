# metamtl: `make demo` (install + meta-train on real Omniglot) and `make test` (install + tests).
# `make learn2learn`: the optional learn2learn 0.2.0, built from its sdist (see tools/build_learn2learn.sh).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Real data: $METAMTL_DATA if set, else ../shared/data when it exists.
ifeq ($(origin METAMTL_DATA), undefined)
  ifneq ($(wildcard ../shared/data),)
    export METAMTL_DATA := $(abspath ../shared/data)
  endif
endif
export WANDB_MODE ?= offline
PYTEST_ARGS ?=

.PHONY: install demo test test-all learn2learn bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# a repeated `make demo` replaces its earlier run (runs/omniglot_5w1s); DEMO_ARGS= keeps it (and then refuses)
DEMO_ARGS ?= --overwrite
demo: install
	$(BIN)/metamtl fit configs/omniglot_5w1s.yaml $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the whole suite, slow tests and the learn2learn tests included (builds learn2learn first if needed)
test-all: install learn2learn
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

# learn2learn 0.2.0 from its source distribution with a current Cython (pip install fails on 3.11)
# (REBUILD=1: build and install anew even if learn2learn is importable)
learn2learn: install
	REBUILD=$(REBUILD) bash tools/build_learn2learn.sh $(BIN)/python

clean:
	rm -rf runs build *.egg-info .pytest_cache
