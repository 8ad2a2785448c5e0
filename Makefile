# The two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this kind of machine; pyproject's range accepts it, so nothing bigger is pulled.
TORCH ?= torch==2.13.0
DEMO ?= .cache/demo-model
PYTEST_ARGS ?=
# make test: test processes (pytest-xdist) for all but the `serial` tests, which run alone afterwards (exit status
# 5, "no tests collected", is not a failure: PYTEST_ARGS may name files with none of one kind)
TEST_JOBS ?= 2
# compose-test: the python that builds the demo model and runs the openai client (make install makes it)
E2E_PYTHON ?= $(BIN)/python

.PHONY: test serve install demo clean compose-test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/pytest -q -n $(TEST_JOBS) -m 'not slow and not serial' $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/pytest -q -m 'serial and not slow' $(PYTEST_ARGS) || [ $$? -eq 5 ]

$(DEMO)/config.json: | $(BIN)/.installed
	$(BIN)/moeinf demo-model $(DEMO)

demo: $(DEMO)/config.json

serve: $(BIN)/.installed
	$(BIN)/moeinf serve

# `docker compose up` end to end (tests/deploy/compose_e2e.sh); says "skipped" without a Docker engine. Where no
# registry or PyTorch index is reachable: MOEINF_BASE_IMAGE=moeinf-base:bookworm MOEINF_TORCH_WHEELS=DIR (docs/deploy.md)
compose-test:
	MOEINF_E2E_PYTHON=$(E2E_PYTHON) tests/deploy/compose_e2e.sh

clean:
	rm -rf $(VENV) .cache *.egg-info .pytest_cache
