"""`torch.compile(model, backend="kiln", options={...})`, found through the
`torch_dynamo_backends` entry point."""
from __future__ import annotations

import json

import torch

from kiln.frontends.dynamo import (aot_capture, call_without_aot, describe_inputs,
                                   dynamo_graph_text, in_backend, needs_autograd,
                                   state_inputs)
from kiln.ir import print_graph, timings

from . import compile_cache
from .config import CompileOptions
from .driver import CapturedText, compile_graph


# Lifted constants the capture made (transformers' DynamicCache starts from `torch.tensor([])`)
# are stored with a cached capture up to this many elements in all: literals, not weights.
SMALL_CONSTANTS = 1024


def kiln_backend(gm, example_inputs, options: dict | None = None, mode: str | None = None,
                 module=None):
    """`module` (kiln.compile passes it): the compiled nn.Module, whose parameters and
    buffers name the graph's weight inputs by identity.

    With the compile cache on, a graph dynamo traced before (the same code over inputs of
    the same types) whose AOTAutograd wrapper was trivial skips AOTAutograd too: the cache
    holds the kiln graph AOTAutograd gave (an "aot" entry), and the compiled graph is called
    with the lifted state and dynamo's arguments, as that wrapper called it."""
    if mode not in (None, "default"):
        raise ValueError(f"kiln has no compile mode {mode!r}; pass options={{...}} instead")
    opts = CompileOptions.make(options)
    known = state_inputs(module) if module is not None else None
    source = type(module).__name__ if module is not None else None
    with in_backend():
        key = None
        if opts.cache and not opts.dump_dir and not needs_autograd(gm, example_inputs):
            with timings.phase("aot cache lookup"):
                key = compile_cache.key_of("aot", {
                    "dynamo": dynamo_graph_text(gm, example_inputs),
                    "inputs": [(s.name, s.weight) for s in describe_inputs(gm, example_inputs, known)]})
                files = compile_cache.load(key, "aot")
            if files is not None:
                wrapper = json.loads(files[AOT_WRAPPER])
                constants = _constants_from_json(wrapper["constants"])
                captured = CapturedText(files[compile_cache.CAPTURED],
                                        {"constants": constants, "source": source})
                return call_without_aot(gm, compile_graph(captured, opts), list(constants.values()),
                                        dict(wrapper["returned_inputs"]))

        captured = []   # (graph text, constants, passthrough, about) of a graph to store

        def keep(graph, passthrough: dict | None) -> None:
            constants = graph.meta["constants"]
            if key is not None and passthrough is not None \
                    and sum(t.numel() for t in constants.values()) <= SMALL_CONSTANTS:
                captured.append((print_graph(graph), constants, passthrough,
                                 {"model": source, "graph": graph.name, "nodes": len(graph.nodes),
                                  "target": "-", "capture": True}))

        fn = aot_capture(gm, example_inputs, lambda graph: compile_graph(graph, opts), known,
                         opts.fallback, source, keep)
        # Stored once AOTAutograd is done: inside it, fake tensors rule and the constants'
        # values cannot be read.
        for text, constants, passthrough, about in captured:
            wrapper = {"constants": _constants_to_json(constants),
                       "returned_inputs": sorted(passthrough.items())}
            compile_cache.store(key, {compile_cache.CAPTURED: text,
                                      AOT_WRAPPER: json.dumps(wrapper)}, about, "aot")
        return fn


# An "aot" entry's file beside the captured graph: what the skipped wrapper did (the small
# constants, the outputs that are inputs).
AOT_WRAPPER = "aot.json"


def _constants_to_json(constants: dict) -> dict:
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "device": str(t.device),
                   "shape": list(t.shape), "values": t.flatten().tolist()}
            for name, t in constants.items()}


def _constants_from_json(constants: dict) -> dict:
    return {name: torch.tensor(c["values"], dtype=getattr(torch, c["dtype"]),
                               device=c["device"]).reshape(c["shape"])
            for name, c in constants.items()}
