"""Shared test set-up: puts tests/ on sys.path, so test files anywhere below can
`from models import tiny_llama`, and loads the default model once per session.

Every test runs with fallback as an error (KILN_FALLBACK=error): a graph that silently
ran eagerly would pass a numerics test. Tests about fallback ask for `fallback_warns`.

The compile cache is off (KILN_CACHE=0): a test's result must not depend on what an earlier
run left in the user's cache, nor write to it, and tests that patch kiln's internals would
otherwise be served a graph compiled without the patch. Tests of the cache turn it on over
a directory of their own (`compile_cache_dir`). The converted SmolLM2 stays in the default
kiln cache, so it is converted once per machine, not once per run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["KILN_FALLBACK"] = "error"   # before kiln reads it; subprocesses inherit it
os.environ["KILN_CACHE"] = "0"


def _share_the_cores() -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch's intra-op
    threads, and so do the processes it starts (servers, CLIs, ranks: OMP_NUM_THREADS).
    Left at torch's default, every worker runs one OpenMP thread per core, so 2 workers on
    2 cores oversubscribe them: 4 test files took 599 s that way, 539 s with a core each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


_share_the_cores()

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M-Instruct in float32. The first run on a machine
    converts the GGUF into the default kiln cache (about 25 s); later runs read the cache."""
    from kiln.frontends.hf import load
    return load("smollm2")


@pytest.fixture
def compile_cache_dir(tmp_path, monkeypatch):
    """The compile cache on, in a fresh directory (KILN_CACHE_DIR's compile/ under tmp_path),
    with its counters and phase record starting from zero."""
    import kiln
    monkeypatch.setenv("KILN_CACHE", "1")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    kiln.stats(reset=True)
    kiln.timings(reset=True)
    yield tmp_path / "kiln-cache" / "compile"
    kiln.stats(reset=True)


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory):
    """The compile cache on for one module's tests, over a directory of its own (the converted
    SmolLM2 stays where it is): tests that compile one model several ways (other quant
    options) share its AOTAutograd capture, which the cache keys by dynamo's graph alone.
    Only for tests that patch nothing of kiln's."""
    from kiln import compile_cache
    where = tmp_path_factory.mktemp("compile-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_CACHE", "1")
    mp.setenv("TRITON_CACHE_DIR", str(where / "triton"))
    mp.setattr(compile_cache, "directory", lambda: where)
    yield where
    mp.undo()


@pytest.fixture
def fallback_warns(monkeypatch):
    """For tests about fallback: it warns and runs eagerly; the record starts empty."""
    import kiln
    monkeypatch.setenv("KILN_FALLBACK", "warn")
    kiln.stats(reset=True)
    yield
    kiln.stats(reset=True)
