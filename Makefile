# Two entry points for a fresh machine: `make serve` and `make test` (both install first).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test default-model

# Idempotent: re-runs pip only when pyproject.toml changed since the last install.
# The deploy extra (Ray Serve) is installed too: tests/test_ray_serve.py runs it.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test,deploy]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/armt serve

test: install
	$(VENV)/bin/python -m pytest

# Retrain the shipped default model from scratch (about 55 minutes on 2 CPU cores; see README "Default model").
default-model: install
	$(VENV)/bin/armt train --out runs/default --minutes 50 --export model/weights/default
