"""Capture through dynamo + AOTAutograd: an inference graph in core ATen, with input
mutations (HF StaticCache updates) kept as `aten.copy_` into the mutated inputs and
SymInt inputs for dynamic sizes."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch._decomp import core_aten_decompositions
from torch._functorch.aot_autograd import aot_module_simplified

from kiln.ir import Graph

from .fx import UnsupportedGraph, from_fx


def decompositions() -> dict:
    """Core ATen decompositions, less scaled_dot_product_attention: kept whole so that
    fuse.attention sees one op instead of expand/bmm/where/softmax/bmm."""
    table = core_aten_decompositions()
    return {k: v for k, v in table.items() if "scaled_dot_product" not in str(k)}


def input_names(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the AOT graph's inputs: lifted parameters and buffers, then dynamo's inputs."""
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    names += [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return names


def aot_capture(gm: torch.fx.GraphModule, example_inputs,
                compile_graph: Callable[[Graph], Callable]) -> Callable:
    """Runs AOTAutograd on dynamo's graph; `compile_graph` turns each kiln Graph into the
    callable that AOTAutograd will call with the flat inputs."""
    names = input_names(gm)

    def fw_compiler(fx_gm: torch.fx.GraphModule, fw_inputs):
        try:
            graph = from_fx(fx_gm, names)
        except UnsupportedGraph as e:
            warnings.warn(f"kiln: cannot capture this graph ({e}); it runs eagerly", stacklevel=2)
            return fx_gm
        return compile_graph(graph)

    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                 decompositions=decompositions(),
                                 keep_inference_input_mutations=True)


def export_capture(program: "torch.export.ExportedProgram") -> tuple[Graph, list]:
    """A torch.export program -> (kiln Graph, the lifted constants in input order).

    The program is run through `run_decompositions` with kiln's table; parameters, buffers
    and constants that export lifts become named graph inputs."""
    program = program.run_decompositions(decompositions())
    gm = program.graph_module
    sig = program.graph_signature
    names, consts = [], []
    state = program.state_dict
    constants = getattr(program, "constants", {})
    for spec in sig.input_specs:
        target = spec.target
        names.append(target if target is not None else spec.arg.name)
        if target is None:
            consts.append(None)
        elif target in state:
            consts.append(state[target])
        else:
            consts.append(constants[target])
    graph = from_fx(gm, names)
    return graph, consts
