"""kiln: a declarative graph compiler for LLM inference.

    torch.compile(model, backend="kiln", options={"target": "cpu"})
    kiln.compile(model_or_graph, target="cpu")
"""
from __future__ import annotations

__version__ = "0.1.0"


def stats(reset: bool = False) -> dict:
    """What ran eagerly instead of compiled, and what the compile cache did, since start-up
    (or the last reset): `{"fallbacks": total, "by_kind": {"graph": n, "cudagraph": n},
    "events": [messages], "compile_cache": {"hit": n, "miss": n, "rebuilt": n, "stored": n,
    "unwritable": n}}`."""
    from kiln.ir import fallback

    from .compile_cache import counts
    events = fallback.events()
    out = {"fallbacks": len(events), "by_kind": fallback.counts(),
           "events": [e.message for e in events], "compile_cache": counts(reset)}
    if reset:
        fallback.reset()
    return out


def timings(reset: bool = False) -> str:
    """Where compile time went since start-up (or the last reset), as a tree of phases
    (capture, passes, codegen, kernel compilation, weight preparation, graph capture, ...)
    with the compile cache's counts; what --timings and KILN_TIMINGS=1 print."""
    from kiln.ir import timings as record

    from .driver import kiln_timings
    text = kiln_timings()
    if reset:
        record.reset()
    return text


def compile(model_or_graph, target: str = "cpu", passes=None, **options):
    """Compiles a kiln `Graph` (returns a CompiledGraph) or an nn.Module / function
    (returns `torch.compile(model, backend="kiln")` with these options)."""
    from kiln.ir import Graph

    from .config import CompileOptions
    from .driver import compile_graph
    opts = CompileOptions.make(options, target=target, passes=passes)
    if isinstance(model_or_graph, Graph):
        return compile_graph(model_or_graph, opts)
    import functools

    import torch

    from .backend import kiln_backend
    backend = kiln_backend
    if isinstance(model_or_graph, torch.nn.Module):   # name its weights by identity
        backend = functools.partial(kiln_backend, module=model_or_graph)
    return torch.compile(model_or_graph, backend=backend, options=opts.as_dict())
