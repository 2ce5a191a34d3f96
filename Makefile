# Trackly — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test migrate bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install Trackly with its test tools

run: $(STAMP) ## start gateway :8000, redirect :8001 and worker (embedded PostgreSQL/Redis unless TRACKLY_*_URL are set)
	$(BIN)/trackly run

test: $(STAMP) ## run the whole test suite on real PostgreSQL and Redis
	$(BIN)/pytest

migrate: $(STAMP) ## bring the schema up to date (TRACKLY_DATABASE_URL, or the embedded database)
	$(BIN)/trackly migrate

bench: $(STAMP) ## benchmarks: ratios against floors measured in the same run (installs wrk if missing and root)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } || echo "no wrk: the redirect bench will be skipped"
	$(BIN)/python -m bench

lint: $(STAMP) ## import boundaries: a service imports only shared/
	@! grep -rnE '^\s*(from|import) services\.(redirect|worker)' services/gateway
	@! grep -rnE '^\s*(from|import) services\.(gateway|worker)' services/redirect
	@! grep -rnE '^\s*(from|import) services\.(gateway|redirect)' services/worker
	@echo "import boundaries ok"

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) .trackly
