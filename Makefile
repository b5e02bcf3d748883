# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv, install, run the main job (mlsde demo: EM vs ML-EM on the shipped ladder)
#   make test   -- create .venv, install with the test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
# A CPU build of torch: an unpinned torch resolves to a multi-GB CUDA wheel.
TORCH  ?= torch==2.13.0

# k-diffusion is installed without its requirements (torchvision -- a CUDA build -- wandb, clip, ...): the tests that
# compare against its samplers need none of them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)" -e ".[test,bench,diffusers]"
	$(VENV)/bin/pip install -q --no-deps "k-diffusion>=0.1"
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mlsde demo

test: install
	$(VENV)/bin/python -m pytest tests

bench: install
	$(VENV)/bin/python benchmarks/overhead.py
