"""Capture through dynamo + AOTAutograd: an inference graph in core ATen, with input
mutations (HF StaticCache updates) kept as `aten.copy_` into the mutated inputs and
SymInt inputs for dynamic sizes.

Graph inputs are identified by the tensor objects dynamo hands the backend, never by its
placeholder names (which change between releases): a tensor that is a parameter or buffer
of the captured module becomes a `weight` input named after `named_parameters()`
(`model.layers.0.self_attn.q_proj.weight`). When the module is unknown (a plain
`torch.compile(model, backend="kiln")`), the name comes from where dynamo read the tensor
(kiln.frontends.torch_compat), and parameters are weights by their type.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from kiln.ir import Graph, timings
from kiln.ir.fallback import report

from . import torch_compat
from .fx import UnsupportedGraph, from_fx, readable_name


def decompositions() -> dict:
    """Core ATen decompositions, less scaled_dot_product_attention: kept whole so that
    fuse.attention sees one op instead of expand/bmm/where/softmax/bmm."""
    table = torch_compat.core_aten_decompositions()
    return {k: v for k, v in table.items() if "scaled_dot_product" not in str(k)}


@dataclass(frozen=True)
class InputSpec:
    """What one flat graph input is: its IR name, and whether it is read-only module state."""
    name: str
    weight: bool = False


def state_inputs(module: torch.nn.Module) -> dict[int, InputSpec]:
    """Parameters and buffers of `module` by tensor identity, named as `named_parameters()`
    names them (the first name of a tied tensor)."""
    out: dict[int, InputSpec] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        out.setdefault(id(t), InputSpec(name, True))
    return out


_STATE_KEYS = ("_modules", "_parameters", "_buffers")
_SOURCE_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)|(\(\))")


def _source_parts(source: str) -> list[str] | None:
    parts = []
    for m in _SOURCE_PART.finditer(source):
        if m.group(4):   # a call (`.size()`): not a plain object path
            return None
        parts.append(next(g for g in m.groups() if g is not None))
    return parts


def state_path(source: str | None) -> str | None:
    """`L['args'][0]._modules['model']._parameters['weight']` -> `model.weight`; None when
    the source does not read module state."""
    parts = _source_parts(source) if source else None
    if not parts or not any(p in _STATE_KEYS for p in parts):
        return None
    start = next(i for i, p in enumerate(parts) if p in _STATE_KEYS)
    return ".".join(p for p in parts[start:] if p not in _STATE_KEYS)


def argument_name(source: str | None) -> str | None:
    """`L['input_ids']` / `L['kwargs']['input_ids']` -> `input_ids`, `L['args'][1]` -> `args_1`."""
    parts = _source_parts(source) if source else None
    if not parts:
        return None
    if parts[-1].isdigit() and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1] if re.fullmatch(r"[A-Za-z_]\w*", parts[-1]) else None


def describe_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence,
                    known: Mapping[int, InputSpec] | None = None) -> list[InputSpec]:
    """One spec per flat input of the AOT graph: the dynamo graph's own parameters and
    buffers (AOTAutograd lifts them first), then dynamo's placeholders. `known` names
    tensors by identity (`state_inputs(model)`, a call's named arguments)."""
    known = known or {}
    specs = []
    for name, t in (list(gm.named_parameters(remove_duplicate=False))
                    + list(gm.named_buffers(remove_duplicate=False))):
        specs.append(known.get(id(t)) or InputSpec(readable_name(name), True))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        spec = known.get(id(example))
        if spec is None:
            source = torch_compat.dynamo_source(node)
            path = state_path(source)
            weight = path is not None or isinstance(example, torch.nn.Parameter)
            name = path or argument_name(source) or readable_name(node.name)
            spec = InputSpec(name, weight)
        specs.append(spec)
    return specs


# Dynamo's compile of a frame, timed (kiln.ir.timings): from its start callback to the
# backend's call is tracing, "dynamo"; the backend's AOTAutograd is "aot_autograd", kiln's
# compile nested in it; the rest up to the end callback (guards, bytecode) is "dynamo" again.
_frame_phases: list = []   # stop functions of the frame's open phases, innermost last


def _frame_started(args) -> None:
    _frame_phases.append(timings.start(f"torch.compile frame {torch_compat.compile_id(args)}".strip()))
    _frame_phases.append(timings.start("dynamo"))


def _frame_ended(args) -> None:
    while _frame_phases:
        _frame_phases.pop()()


def time_frames() -> None:
    """Times dynamo's frame compiles from now on (again after a `torch._dynamo.reset()`)."""
    torch_compat.on_frame_compile(_frame_started, _frame_ended)


time_frames()


@contextlib.contextmanager
def in_backend():
    """Dynamo's backend runs: its time is not dynamo's (the frame's "dynamo" phase pauses)."""
    time_frames()   # for the next frame, if a reset dropped the callbacks before this one
    paused = len(_frame_phases) == 2
    if paused:
        _frame_phases.pop()()
    try:
        yield
    finally:
        if paused and _frame_phases:
            _frame_phases.append(timings.start("dynamo"))


def aot_module(gm: torch.fx.GraphModule, example_inputs, fw_compiler: Callable):
    """AOTAutograd over dynamo's graph as kiln captures: core ATen with kiln's
    decompositions, input mutations kept in the graph. `fw_compiler(fx_gm, fw_inputs)`
    gets the inference graph."""
    with in_backend(), timings.phase("aot_autograd"):
        return torch_compat.aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                                  decompositions=decompositions(),
                                                  keep_inference_input_mutations=True)


def aot_capture(gm: torch.fx.GraphModule, example_inputs,
                compile_graph: Callable[[Graph], Callable],
                known: Mapping[int, InputSpec] | None = None,
                fallback: str | None = None, source: str | None = None,
                captured: Callable[[Graph, dict | None], None] | None = None) -> Callable:
    """Runs AOTAutograd on dynamo's graph; `compile_graph` turns each kiln Graph into the
    callable that AOTAutograd will call with the flat inputs. A graph kiln cannot represent
    runs eagerly, reported as a fallback (`fallback`: the policy, kiln.ir.fallback).
    `source` names what was captured (the module's class) in `graph.meta["source"]`;
    `captured(graph, passthrough)` sees each graph before it compiles, with what
    AOTAutograd's wrapper around it does when that is trivial (torch_compat.aot_passthrough;
    `call_without_aot` may then replace it), else None."""
    specs = describe_inputs(gm, example_inputs, known)

    def fw_compiler(fx_gm: torch.fx.GraphModule, fw_inputs):
        try:
            graph = from_fx(fx_gm, specs)
        except UnsupportedGraph as e:
            report("graph", str(e), f"kiln: cannot capture this graph ({e}); it runs eagerly",
                   fallback)
            return fx_gm
        if source is not None:
            graph.meta["source"] = source
        if captured is not None:
            captured(graph, torch_compat.aot_passthrough(len(specs), fx_gm))
        compiled = compile_graph(graph)
        constants = tuple(graph.meta["constants"].values())
        if not constants:
            return compiled
        return lambda *args: compiled(*args, *constants)

    return aot_module(gm, example_inputs, fw_compiler)


def module_state(gm: torch.fx.GraphModule) -> list:
    """The parameters and buffers of dynamo's graph module, in the order AOTAutograd lifts
    them in front of dynamo's arguments (describe_inputs names them in the same order)."""
    return ([t for _, t in gm.named_parameters(remove_duplicate=False)]
            + [t for _, t in gm.named_buffers(remove_duplicate=False)])


def call_without_aot(gm: torch.fx.GraphModule, compiled: Callable, constants: list = (),
                     returned_inputs: dict[int, int] | None = None) -> Callable:
    """For a graph whose AOTAutograd wrapper only passes inputs through
    (torch_compat.aot_passthrough): `compiled` called as that wrapper and aot_capture would
    call it (the lifted state, then dynamo's arguments, then the capture's lifted
    constants), with the outputs that are inputs handed back as those very inputs
    (`returned_inputs`: {output index: flat input index}), as the wrapper does."""
    state, constants = tuple(module_state(gm)), tuple(constants)
    returned = sorted((returned_inputs or {}).items())
    if not state and not constants and not returned:
        return compiled

    def call(*args):
        flat = state + args
        out = compiled(*flat, *constants)
        if not returned:
            return out
        out = list(out)
        for o, i in returned:
            out[o] = flat[i]
        return tuple(out)
    return call


def needs_autograd(gm: torch.fx.GraphModule, example_inputs) -> bool:
    """Whether AOTAutograd would trace a training (joint) graph here: grad mode on and some
    input or lifted tensor requiring grad."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in [*module_state(gm), *example_inputs])


def dynamo_graph_text(gm: torch.fx.GraphModule, example_inputs) -> str:
    """What AOTAutograd makes of dynamo's graph depends on, besides torch's version and
    kiln's decompositions: the code of the graph and of each graph submodule, and the type
    of each lifted tensor and each placeholder (shape with its symbols and their ranges,
    strides, dtype, device, requires_grad); and the autocast state it is traced under."""
    lines = [f"autocast {torch._C._is_any_autocast_enabled()}"]
    for name, module in gm.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            lines.append(f"module {name or '.'}:\n{module.code}")
    state = (list(gm.named_parameters(remove_duplicate=False))
             + list(gm.named_buffers(remove_duplicate=False)))
    lines += [f"state {name}: {_value_text(t)}" for name, t in state]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        value = node.meta.get("example_value", example)
        lines.append(f"input {node.name}: {_value_text(value)}")
    return "\n".join(lines)


def _value_text(v) -> str:
    if isinstance(v, torch.Tensor):
        return (f"{type(v).__name__} {v.dtype} {v.device} [{', '.join(map(_size_text, v.shape))}] "
                f"strides [{', '.join(map(_size_text, v.stride()))}] grad={v.requires_grad}")
    if isinstance(v, torch.SymInt):
        return f"symint {_size_text(v)}"
    return f"{type(v).__name__} {v!r}"


def _size_text(d) -> str:
    if not isinstance(d, torch.SymInt):
        return str(d)
    env, expr = torch_compat.shape_env_of(d), d.node.expr
    ranges = ", ".join(f"{s} in {torch_compat.symbol_range(env, s)}"
                       for s in sorted(expr.free_symbols, key=str))
    return f"{expr} ({ranges})"


def export_capture(program: "torch.export.ExportedProgram") -> tuple[Graph, list]:
    """A torch.export program -> (kiln Graph, the lifted constants in input order).

    The program is run through `run_decompositions` with kiln's table; parameters, buffers
    and constants that export lifts become named graph inputs."""
    program = program.run_decompositions(decompositions())
    gm = program.graph_module
    sig = program.graph_signature
    specs, consts = [], []
    state = program.state_dict
    constants = getattr(program, "constants", {})
    for spec in sig.input_specs:
        target = spec.target
        specs.append(InputSpec(target, True) if target is not None else InputSpec(spec.arg.name))
        if target is None:
            consts.append(None)
        elif target in state:
            consts.append(state[target])
        else:
            consts.append(constants[target])
    graph = from_fx(gm, specs)
    return graph, consts
