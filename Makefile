# Two commands for a new user: `make run` (demo service on :8000) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint bench clean-demo

$(VENV)/.runtime: requirements.txt
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

lint: $(VENV)/.dev
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(VENV)/.dev
	$(PY) bench/serve.py

clean-demo:  ## remove the generated demo database, truth file, caches and model
	rm -rf data/
