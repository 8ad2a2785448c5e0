# The two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (pyproject's range accepts it, so nothing bigger is pulled): PyPI's Linux torch is the CUDA
# build, so pip also looks in PyTorch's CPU index, whose +cpu version sorts first (a wheel already on the machine
# serves as well; an index out of reach is skipped)
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO ?= .cache/demo-model
PYTEST_ARGS ?=
# make test: test processes (pytest-xdist) for all but the `serial` tests, which run alone afterwards (exit status
# 5, "no tests collected", is not a failure: PYTEST_ARGS may name files with none of one kind)
TEST_JOBS ?= 2
# compose-test: the python that builds the demo model and runs the openai client (make install makes it)
E2E_PYTHON ?= $(BIN)/python

.PHONY: test serve install demo clean compose-test llama-cpp gguf

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --extra-index-url $(TORCH_INDEX) --timeout 30 --retries 1 "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/pytest -q -n $(TEST_JOBS) -m 'not slow and not serial' $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/pytest -q -m 'serial and not slow' $(PYTEST_ARGS) || [ $$? -eq 5 ]

$(DEMO)/moeinf-demo.json: | $(BIN)/.installed
	$(BIN)/moeinf demo-model $(DEMO)

demo: $(DEMO)/moeinf-demo.json

serve: $(BIN)/.installed
	$(BIN)/moeinf serve

# `docker compose up` end to end (tests/deploy/compose_e2e.sh); says "skipped" without a Docker engine. Where no
# registry or PyTorch index is reachable: MOEINF_BASE_IMAGE=moeinf-base:bookworm MOEINF_TORCH_WHEELS=DIR (docs/deploy.md)
compose-test:
	MOEINF_E2E_PYTHON=$(E2E_PYTHON) tests/deploy/compose_e2e.sh

# bench e2e's llama.cpp system: llama-server built from the llama.cpp that llama-cpp-python's source package on PyPI
# vendors (the registry is reachable where GitHub is not), with its GGUF converter beside it; `make gguf MODEL=DIR`
# writes DIR.gguf (the checkpoint's own dtype). Needs cmake and a C++ compiler.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
LLAMA_DIR := .cache/llama.cpp
LLAMA_SERVER := $(LLAMA_DIR)/build/bin/llama-server
LLAMA_STAMP := $(LLAMA_DIR)/build/$(subst =,_,$(LLAMA_CPP_PYTHON)).built

$(LLAMA_STAMP): | $(BIN)/.installed
	rm -rf $(LLAMA_DIR) .cache/llama-sdist && mkdir -p .cache/llama-sdist
	$(BIN)/pip download -q --no-deps --no-binary :all: "$(LLAMA_CPP_PYTHON)" -d .cache/llama-sdist
	tar xzf .cache/llama-sdist/*.tar.gz -C .cache/llama-sdist
	mv .cache/llama-sdist/*/vendor/llama.cpp $(LLAMA_DIR) && rm -rf .cache/llama-sdist
	cmake -S $(LLAMA_DIR) -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_DIR)/build -j $$(nproc) --target llama-server
	touch $@

llama-cpp: $(LLAMA_STAMP)

gguf: $(LLAMA_STAMP)
	@test -n "$(MODEL)" || { echo "usage: make gguf MODEL=DIR (writes DIR.gguf)"; exit 2; }
	PYTHONPATH=$(LLAMA_DIR)/gguf-py $(BIN)/python $(LLAMA_DIR)/convert_hf_to_gguf.py $(MODEL) --outtype auto \
		--outfile $(patsubst %/,%,$(MODEL)).gguf

clean:
	rm -rf $(VENV) .cache *.egg-info .pytest_cache
