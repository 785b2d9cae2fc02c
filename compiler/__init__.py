"""kiln: a declarative graph compiler for LLM inference.

    torch.compile(model, backend="kiln", options={"target": "cpu"})
    kiln.compile(model_or_graph, target="cpu")
"""
from __future__ import annotations

__version__ = "0.1.0"


def stats(reset: bool = False) -> dict:
    """What ran eagerly instead of compiled, since start-up (or the last reset):
    `{"fallbacks": total, "by_kind": {"graph": n, "cudagraph": n}, "events": [messages]}`."""
    from kiln.ir import fallback
    events = fallback.events()
    out = {"fallbacks": len(events), "by_kind": fallback.counts(),
           "events": [e.message for e in events]}
    if reset:
        fallback.reset()
    return out


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
