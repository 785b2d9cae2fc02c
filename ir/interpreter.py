"""Reference interpreter: runs a graph node by node with each op's reference
implementation. The oracle for numerics tests; not used on the hot path."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .graph import Graph, Value, map_values
from .ops import callee_of, get_op


def reference_impl(op: str) -> Callable:
    return get_op(op).impl


def run(g: Graph, inputs: Sequence[Any], impl: Callable[[str], Callable] = reference_impl) -> list[Any]:
    """The graph's outputs on `inputs`; `impl(op)` is the function that computes an op (its
    reference implementation unless a caller, such as the MLIR export, traces another)."""
    if len(inputs) != len(g.inputs):
        raise ValueError(f"{g.name} takes {len(g.inputs)} inputs, got {len(inputs)}")
    env: dict[Value, Any] = dict(zip(g.inputs, inputs))
    fetch = lambda v: env[v]  # noqa: E731
    for n in g.nodes:
        if n.op == "kiln.call":
            out = run(callee_of(g, n.attrs), map_values(n.args, fetch), impl)
            out = out[0] if len(n.results) == 1 else out
        else:
            out = impl(n.op)(*map_values(n.args, fetch),
                             **{k: map_values(a, fetch) for k, a in n.attrs.items()})
        if len(n.results) == 1:
            env[n.results[0]] = out
        elif n.results:
            for r, o in zip(n.results, out):
                env[r] = o
    return [env[v] for v in g.outputs]
