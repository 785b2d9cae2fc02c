"""Triton's JIT time per kernel, into kiln's phase record (kiln.ir.timings).

Triton compiles a kernel for each new specialization at its first launch (or loads it
from its cache directory), inside whatever phase launched it: a compiled graph's first
call, a CUDA-graph warm-up. Its runtime hooks mark the start and end of each compile:
`jit_cache_hook` runs before, `jit_post_compile_hook` after. Both are single slots, so a
hook someone else set first is kept and called too.
"""
from __future__ import annotations

import threading

from kiln.ir import timings

_installed = False


def time_jit() -> bool:
    """Times every Triton JIT compile from now on as a phase `triton jit <kernel>`; False
    where this Triton has no such hooks (before 3.4)."""
    global _installed
    if _installed:
        return True
    try:
        from triton import knobs
        runtime = knobs.runtime
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        return False
    local = threading.local()   # per thread: the stop functions of its open compiles

    def started(*args, fn=None, **kwargs):
        name = getattr(fn, "name", None) or "kernel"
        stop = timings.start(f"triton jit {name.rsplit('.', 1)[-1]}")
        if before is not None and before(*args, fn=fn, **kwargs):
            stop()   # the other hook skips this compile
            return True
        local.__dict__.setdefault("open", []).append(stop)
        return False

    def finished(*args, **kwargs):
        if getattr(local, "open", None):
            local.open.pop()()
        return after(*args, **kwargs) if after is not None else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = started, finished
    _installed = True
    return True
