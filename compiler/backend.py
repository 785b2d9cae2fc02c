"""`torch.compile(model, backend="kiln", options={...})`, found through the
`torch_dynamo_backends` entry point."""
from __future__ import annotations

from kiln.frontends.dynamo import aot_capture

from .config import CompileOptions
from .driver import compile_graph


def kiln_backend(gm, example_inputs, options: dict | None = None, mode: str | None = None):
    if mode not in (None, "default"):
        raise ValueError(f"kiln has no compile mode {mode!r}; pass options={{...}} instead")
    opts = CompileOptions.make(options)
    return aot_capture(gm, example_inputs, lambda graph: compile_graph(graph, opts))
