# vitedge: every target sets up .venv itself (quick when it is already there).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export VITEDGE_DATA ?= $(abspath ../shared/data)

.PHONY: install test lint typecheck unit demo bench clean redis

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check src tests benchmarks examples scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The cache tests start their own redis-server processes on loopback ports; they need the binary only.
redis:
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

unit: $(STAMP) redis
	$(VENV)/bin/pytest -q

test: lint typecheck unit

demo: $(STAMP)
	$(PY) -m vitedge.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_bf16.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
