# metamtl: `make demo` (install + meta-train on real Omniglot) and `make test` (install + tests).
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

.PHONY: install demo test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/metamtl fit configs/omniglot_5w1s.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

clean:
	rm -rf runs build *.egg-info .pytest_cache
