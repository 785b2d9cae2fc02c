"""kiln: a declarative graph compiler for LLM inference.

    torch.compile(model, backend="kiln", options={"target": "cpu"})
    kiln.compile(model_or_graph, target="cpu")
"""
from __future__ import annotations

__version__ = "0.1.0"


def compile(model_or_graph, target: str = "cpu", passes=None, **options):
    """Compiles a kiln `Graph` (returns a CompiledGraph) or an nn.Module / function
    (returns `torch.compile(model, backend="kiln")` with these options)."""
    from kiln.ir import Graph

    from .config import CompileOptions
    from .driver import compile_graph
    opts = CompileOptions.make(options, target=target, passes=passes)
    if isinstance(model_or_graph, Graph):
        return compile_graph(model_or_graph, opts)
    import torch

    from .backend import kiln_backend
    return torch.compile(model_or_graph, backend=kiln_backend, options=opts.as_dict())
