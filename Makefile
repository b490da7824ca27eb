# reid_pipeline — set-up and entry points. Everything runs from a fresh clone:
#   make demo   create .venv, install, build the embedded data + small CLIP, materialise every asset
#   make test   the same set-up, then the whole test suite
#   make ui     the Dagster UI (dg dev: webserver + daemon) on http://127.0.0.1:3000
# `dg` (dagster-dg-cli, configured by pyproject's [tool.dg]) is the Dagster CLI used throughout.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DG := $(VENV)/bin/dg
export DAGSTER_HOME := $(CURDIR)/dagster_home
export PYTHONWARNINGS := ignore::UserWarning:clip.clip
UI_PORT ?= 3000
PYTEST_ARGS ?=
# pytest-xdist workers, one test file per worker (module fixtures are shared within a file). Many tests
# wait on subprocesses, daemons and servers, so three workers fill two cores: on an idle 2-core machine
# the suite took 1179 s serially, 810 s with 2 workers, 691 s with 3 (2026-12-07). TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 3

.PHONY: setup embedded demo test lint ui bench clean-artifacts postgres

# uv installs (it resolves the same versions as pip from the same index). A cold install, the venv's
# creation included, took 40 s with uv (uv itself installed by pip into the venv) against 109 s with
# pip --no-compile and 184 s with pip's default, and 11 s with uv's cache warm (2 cores, 2026-12-08,
# benchmarks/setup_time.py --install, one run). Like pip --no-compile, uv writes no
# bytecode: pip's byte-compiling of every installed module (torch's CUDA build is most of the 5.5 GB)
# made pip take 116 s against 72 s (2026-12-07); Python compiles what it imports on first use,
# so PYTHONDONTWRITEBYTECODE is unset here (with it set, every process would recompile torch: 11 s against 5).
UV_VERSION := 0.13.10
unexport PYTHONDONTWRITEBYTECODE
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[test]'
	touch $@

# The instance in dagster_home/: its storage and pool limits created once (concurrent first runs are safe).
$(DAGSTER_HOME)/.initialised: $(VENV)/.installed dagster_home/dagster.yaml
	$(PY) -m reid_pipeline.operations init --home $(DAGSTER_HOME)
	touch $@

setup: $(VENV)/.installed $(DAGSTER_HOME)/.initialised

# The embedded default: a synthetic Market-1501-style dataset and a small CLIP in OpenAI's format.
embedded: setup
	$(PY) -m reid_pipeline.embedded

# The observed sources (raw_dataset, clip_weights) are part of the selection so that the run records
# their versions and the retrain sensor finds nothing new afterwards.
# It ends with a search: the top-5 gallery matches of one query image, and their picture.
demo: embedded
	$(DG) launch --assets 'raw_dataset*,clip_weights*' --partition synthetic -c configs/demo.yaml
	$(VENV)/bin/reid-search query --index "$$(dirname $$(ls artifacts/gallery_index/synthetic/*/index/index.json | sort | tail -1))" \
	  "$$(ls data/embedded/synthetic/query/* | sort | head -1)" --top-k 5 --png artifacts/demo_search.png
	@echo "rank list of that query: artifacts/demo_search.png"

# Debian's headless Chromium for the browser test (Playwright drives it; `playwright install` is never run).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

# Debian's PostgreSQL for the Postgres-instance test (it starts its own temporary server; no system
# cluster is created, none is started).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  set -e; apt-get update; \
	  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then \
	    mkdir -p /etc/postgresql-common; echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confold postgresql; \
	fi

lint: setup
	$(VENV)/bin/ruff check .

test: embedded $(CHROMIUM) postgres lint
	$(DG) check defs
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# REID_RUN_CONFIG: the preset whose op config the retrain sensor applies to the runs it launches.
ui: embedded
	REID_RUN_CONFIG=$${REID_RUN_CONFIG:-configs/demo.yaml} $(DG) dev -h 127.0.0.1 -p $(UI_PORT)

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-artifacts:
	rm -rf artifacts dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs dagster_home/.initialised
