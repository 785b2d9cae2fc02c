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
