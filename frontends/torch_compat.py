"""Every private PyTorch API the frontends use, in one place.

Dynamo and AOTAutograd have no public interface for what a graph compiler needs (an
operator's schema, the shape environment's ranges, where a graph input came from), and
minor releases rename these internals. Each accessor here tries the spellings known to
work (torch 2.10 to 2.13) and degrades to "unknown" (None) rather than failing, so the
callers stay correct when a name moves; only the capture entry points are required.
"""
from __future__ import annotations

import torch
from torch._decomp import core_aten_decompositions  # noqa: F401  (re-exported)
from torch._functorch.aot_autograd import aot_module_simplified  # noqa: F401  (re-exported)

OpOverload = torch._ops.OpOverload


def schema(op: OpOverload):
    return op._schema


def overload_name(op: OpOverload) -> str:
    return op._overloadname


def shape_env_of(value):
    """The ShapeEnv behind a fake tensor or SymInt, or None."""
    if isinstance(value, torch.Tensor):
        mode = getattr(value, "fake_mode", None)
        return getattr(mode, "shape_env", None)
    if isinstance(value, torch.SymInt):
        return value.node.shape_env
    return None


def symbol_range(shape_env, symbol):
    """(lower, upper) sympy bounds the capture proved for `symbol`, or None."""
    table = getattr(shape_env, "var_to_range", None) or {}
    r = table.get(symbol)
    return None if r is None else (r.lower, r.upper)


def capture_hint(shape_env, symbol):
    """The size a symbol had at capture (torch >= 2.13 renamed the table), or None."""
    if shape_env is None:
        return None
    table = getattr(shape_env, "backed_var_to_val", None)
    if table is None:
        table = getattr(shape_env, "var_to_val", {})
    return table.get(symbol)


def dynamo_source(node: torch.fx.Node) -> str | None:
    """Where dynamo read a placeholder from, as its source text
    (`L['self']._modules['lm_head']._parameters['weight']`), or None when unknown."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):
        try:
            name = name()
        except Exception:  # noqa: BLE001 - an unknown source kind is just unknown
            return None
    return name if isinstance(name, str) else None


def on_frame_compile(started, ended) -> None:
    """Calls `started(args)` / `ended(args)` when dynamo starts / finishes compiling a
    frame (the outermost compile, on the compiling thread; `compile_id(args)` names the
    frame). `torch._dynamo.reset()` drops
    such callbacks, so callers call this again before each capture (it registers once);
    a torch without them times nothing."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return
    if started not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(started)
    if ended not in callback_handler.end_callbacks:
        callback_handler.register_end_callback(ended)


def compile_id(callback_args) -> str:
    """The frame's compile id ("0/1") from dynamo's callback arguments, or ""."""
    return str(getattr(callback_args, "compile_id", "") or "")


def aot_passthrough(num_inputs: int, fx_gm) -> dict[int, int] | None:
    """What AOTAutograd's run-time wrapper does around the inference graph it hands the
    backend (`fx_gm`), when that is no more than passing the flat inputs through and
    handing back as themselves the outputs that are inputs: {output index: input index} of
    those outputs. That holds when the graph takes all `num_inputs` inputs (none
    deduplicated, no synthetic bases, effect tokens or RNG state), every input mutation is
    in the graph, no output aliases an input or an intermediate otherwise, and no input is
    a tensor subclass. None when it does more, or when that is unknown (another torch)."""
    try:
        from torch._functorch._aot_autograd.schemas import MutationType, OutputType
        meta = torch._guards.TracingContext.try_get().fw_metadata
        placeholders = sum(1 for n in fx_gm.graph.nodes if n.op == "placeholder")
        plain = (placeholders == num_inputs == len(meta.input_info)
                 and all(not i.mutates_metadata and i.mutation_type != MutationType.MUTATED_OUT_GRAPH
                         for i in meta.input_info)
                 and all(o.output_type in (OutputType.non_alias, OutputType.is_input)
                         for o in meta.output_info)
                 and meta.num_intermediate_bases == 0 and not meta.tokens
                 and not meta.is_rng_op_functionalized
                 and all(isinstance(m, int) or type(m).__name__ == "PlainTensorMeta"
                         for m in meta.subclass_inp_meta))
        if not plain:
            return None
        return {i: o.base_idx for i, o in enumerate(meta.output_info)
                if o.output_type == OutputType.is_input}
    except (AttributeError, ImportError, TypeError):   # another torch's internals: unknown
        return None
