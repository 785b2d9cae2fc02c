"""Shared test set-up: puts tests/ on sys.path, so test files anywhere below can
`from models import tiny_llama`, and loads the default model once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M-Instruct in float32. The first run on a machine
    converts the GGUF into the default kiln cache (about 25 s); later runs read the cache."""
    from kiln.frontends.hf import load
    return load("smollm2")
