"""`torch.compile(model, backend="kiln", options={...})`, found through the
`torch_dynamo_backends` entry point."""
from __future__ import annotations

from kiln.frontends.dynamo import aot_capture, state_inputs

from .config import CompileOptions
from .driver import compile_graph


def kiln_backend(gm, example_inputs, options: dict | None = None, mode: str | None = None,
                 module=None):
    """`module` (kiln.compile passes it): the compiled nn.Module, whose parameters and
    buffers name the graph's weight inputs by identity."""
    if mode not in (None, "default"):
        raise ValueError(f"kiln has no compile mode {mode!r}; pass options={{...}} instead")
    opts = CompileOptions.make(options)
    known = state_inputs(module) if module is not None else None
    return aot_capture(gm, example_inputs, lambda graph: compile_graph(graph, opts), known,
                       opts.fallback, type(module).__name__ if module is not None else None)
