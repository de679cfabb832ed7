# llmgw: the two commands a newcomer needs are `make run` and `make test`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := .demo
PORT ?= 42069

.PHONY: all run test trial lint typecheck bench deb clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "llmgw needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --editable '.[dev]' --config-settings editable_mode=compat
	touch $@

## run: two stand-in models (replicas) over real TLS on loopback, and the gateway in front of them.
run: $(STAMP)
	@$(PY) -m llmgw.devtls $(DEMO) > /dev/null
	@rm -f $(DEMO)/replica-*.port $(DEMO)/replica-*.pid
	@trap 'kill $$(cat $(DEMO)/replica-*.pid 2>/dev/null) 2>/dev/null; wait' EXIT INT TERM HUP; \
	for n in 1 2; do \
		$(VENV)/bin/twistd --nodaemon --pidfile= llmgw-mock --port 0 \
			--cert $(DEMO)/server.pem --key $(DEMO)/server.key --portfile $(DEMO)/replica-$$n.port \
			> $(DEMO)/replica-$$n.log 2>&1 & echo $$! > $(DEMO)/replica-$$n.pid; \
	done; \
	for n in 1 2; do \
		for i in $$(seq 100); do \
			test -s $(DEMO)/replica-$$n.port && break; \
			kill -0 $$(cat $(DEMO)/replica-$$n.pid) 2>/dev/null || { cat $(DEMO)/replica-$$n.log; echo "Stand-in model $$n did not start (see above)"; exit 1; }; \
			sleep 0.1; \
		done; \
		test -s $(DEMO)/replica-$$n.port || { echo "Stand-in model $$n did not start in 10 s"; exit 1; }; \
	done; \
	one=$$(cat $(DEMO)/replica-1.port); two=$$(cat $(DEMO)/replica-2.port); \
	echo "Stand-in models on https://localhost:$$one (pid $$(cat $(DEMO)/replica-1.pid)) and https://localhost:$$two (pid $$(cat $(DEMO)/replica-2.pid))"; \
	echo "Gateway on http://localhost:$(PORT) (Ctrl-C stops all three; kill one stand-in's pid to see failover)"; \
	$(VENV)/bin/llmgw --bindport $(PORT) --upstream https://localhost:$$one --upstream https://localhost:$$two \
		--aica $(DEMO)/ca.pem --verbose

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
