# reid_pipeline — set-up and entry points. Everything runs from a fresh clone:
#   make demo   create .venv, install, build the embedded data + small CLIP, materialise every asset
#   make test   the same set-up, then the whole test suite
#   make ui     the Dagster UI (dagster dev) on http://127.0.0.1:3000
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DAGSTER := $(VENV)/bin/dagster
export DAGSTER_HOME := $(CURDIR)/dagster_home
export PYTHONWARNINGS := ignore::UserWarning:clip.clip
UI_PORT ?= 3000
PYTEST_ARGS ?=

.PHONY: setup embedded demo test ui bench clean-artifacts

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The embedded default: a synthetic Market-1501-style dataset and a small CLIP in OpenAI's format.
embedded: setup
	$(PY) -m reid_pipeline.embedded

demo: embedded
	$(DAGSTER) asset materialize -m reid_pipeline.definitions --select '*' -c configs/demo.yaml

test: embedded
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

ui: embedded
	$(DAGSTER) dev -m reid_pipeline.definitions -h 127.0.0.1 -p $(UI_PORT)

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-artifacts:
	rm -rf artifacts dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
