# llmgw: the two commands a newcomer needs are `make run` and `make test`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := .demo
MOCK_PORT ?= 18443

.PHONY: all run test trial lint typecheck bench deb clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "llmgw needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --editable '.[dev]' --config-settings editable_mode=compat
	touch $@

## run: a stand-in model over real TLS on loopback, and the gateway in front of it.
run: $(STAMP)
	@$(PY) -m llmgw.devtls $(DEMO) > /dev/null
	@rm -f $(DEMO)/mock.port
	@trap 'kill $$mock 2>/dev/null; wait $$mock 2>/dev/null' EXIT INT TERM; \
	$(VENV)/bin/twistd --nodaemon --pidfile= llmgw-mock --port $(MOCK_PORT) \
		--cert $(DEMO)/server.pem --key $(DEMO)/server.key --portfile $(DEMO)/mock.port \
		> $(DEMO)/mock.log 2>&1 & mock=$$!; \
	for i in $$(seq 100); do \
		test -s $(DEMO)/mock.port && break; \
		kill -0 $$mock 2>/dev/null || { cat $(DEMO)/mock.log; echo "The stand-in model did not start (is port $(MOCK_PORT) taken? try make run MOCK_PORT=...)"; exit 1; }; \
		sleep 0.1; \
	done; \
	echo "Stand-in model on https://localhost:$(MOCK_PORT); gateway on http://localhost:42069 (Ctrl-C stops both)"; \
	$(VENV)/bin/llmgw --aihost localhost --aihostport $(MOCK_PORT) --aica $(DEMO)/ca.pem --verbose

## test: the trial suite, then ruff (lint and format) and mypy --strict.
test: trial lint typecheck

trial: $(STAMP)
	$(PY) -m twisted.trial --jobs 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## bench: gateway vs. direct vs. the bare floors (see BENCHMARKS.md);
## `make bench BENCH_ARGS=--quick` is a smoke run of a minute or two.
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

## deb: build, lint, install and test the Debian package (needs root).
deb:
	bash .ci/debian-check

clean:
	rm -rf $(VENV) $(DEMO) _trial_temp* .mypy_cache .ruff_cache *.egg-info build
