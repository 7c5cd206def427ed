# Two commands for a new user: `make run` (demo service on :8000) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint fuzz bench container-check clean-demo

$(VENV)/.runtime: requirements.txt requirements-serve.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime  ## demo data and model when missing, then the service on $(PORT)
	$(PY) main_script.py demo-data --if-missing
	$(PY) main_script.py all --if-missing
	$(PY) -m uvicorn app:app --host 0.0.0.0 --port $(PORT)

test: $(VENV)/.dev  ## ruff, then every test (database tests on SQLite and, when reachable, PostgreSQL)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(VENV)/.dev  ## ruff (lint and format) and hadolint on the Dockerfile
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

fuzz: $(VENV)/.dev  ## Schemathesis, every check, against the service `make run` started on $(PORT)
	$(VENV)/bin/schemathesis run http://127.0.0.1:$(PORT)/openapi.json --checks all \
		--phases examples,coverage,fuzzing

bench: $(VENV)/.dev  ## the serving benchmark on the full demo in PostgreSQL (builds it on first use)
	@command -v wrk >/dev/null || echo "wrk not found: the bench uses its Python client; apt-get install wrk for the reference figures"
	$(PY) -m bench.serve

container-check: $(VENV)/.runtime  ## build the image on a local Debian base (podman), run it on the demo, ask it
	$(PY) main_script.py demo-data --if-missing
	$(PY) main_script.py all --if-missing
	tools/container_check.sh data

clean-demo:  ## remove the generated demo database, truth file, caches and model
	rm -rf data/
