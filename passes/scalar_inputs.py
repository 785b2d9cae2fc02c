"""capture.scalar_inputs: Python ints that change on every call, held on the device instead.

A CUDA graph bakes every kernel argument in. A graph input that is a Python int and
changes every step (transformers' sliding-window StaticCache passes its fill level,
`cumulative_length_int`, as one) would make every decode step a new graph, so no step
would replay. Where such an int only ever feeds values, never a shape, it can live in a
0-d int64 tensor that the caller's int is written into before each call (role `scalar`;
the driver keeps one device buffer per input and fills it, so the buffer's address is
what the graph reads): the symbolic arithmetic on it (`sym.sub`, `sym.max`, ...) becomes
the same arithmetic on 0-d tensors, and elementwise ops take the tensor where they took
the int. An int that reaches a shape or an attribute stays an int. Ints the graph returns
that are computed from such inputs alone (dynamo returns the cache's next fill level,
`s0 + 1`, to set the attribute) leave the graph: `graph.meta["host_outputs"]` keeps each one's
place among the outputs and its value as an expression of the inputs' symbols, and the
driver computes it on the host (no device read, nothing baked into a graph).

Runs only for targets that replay graphs, with CUDA graphs on (option `cudagraphs`).
"""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node, SymIntType, TensorType, Value
from kiln.ir.ops import get_op
from kiln.ir.roles import SCALAR

from .canonicalize import dce
from .manager import PassContext, register_pass

# sym op -> the aten op on 0-d tensors
_TENSOR_FORM = {"sym.add": "aten.add", "sym.sub": "aten.sub", "sym.mul": "aten.mul",
                "sym.neg": "aten.neg", "sym.floordiv": "aten.floor_divide",
                "sym.mod": "aten.remainder", "sym.max": "aten.maximum", "sym.min": "aten.minimum"}
# maximum/minimum take two tensors; against a literal they are clamps
_WITH_LITERAL = {"aten.maximum": "aten.clamp_min", "aten.minimum": "aten.clamp_max"}
I64 = TensorType(torch.int64, ())


def _derived(g: Graph, root: Value, users) -> list[Node] | None:
    """The sym.* nodes computed from `root` (in graph order), or None when a value derived
    from it is used where a tensor cannot stand in for it."""
    derived, todo, nodes = {root}, [root], []
    while todo:
        v = todo.pop()
        for u in users.get(v, []):
            if u.op in _TENSOR_FORM:
                if u not in nodes:
                    nodes.append(u)
                    derived.update(u.results)
                    todo.extend(u.results)
                continue
            if not get_op(u.op).has("elementwise") or u.op.startswith("sym."):
                return None
            if any(v in (a if isinstance(a, list) else [a]) for a in u.attrs.values()):
                return None
    for n in nodes:   # other operands of the arithmetic: derived values or literals
        if any(isinstance(a, Value) and a not in derived for a in n.args):
            return None
        if not isinstance(n.args[0], Value) and n.op in ("sym.floordiv", "sym.mod"):
            return None                              # literal // tensor: not worth a form
    order = {n: i for i, n in enumerate(g.nodes)}
    return sorted(nodes, key=order.__getitem__)


def _shapes_use(g: Graph, symbols: set) -> bool:
    """Whether any tensor type in the graph (a shape) mentions one of `symbols`."""
    for v in list(g.inputs) + [r for n in g.nodes for r in n.results]:
        t = v.type
        if isinstance(t, TensorType) and any(getattr(d, "free_symbols", set()) & symbols
                                             for d in t.shape):
            return True
    return False


def _host_outputs(g: Graph, symbols: set) -> list[tuple[int, str]] | None:
    """(index, expression) of each int output computed from `symbols` alone; None when an
    int output mixes them with anything else."""
    out = []
    for i, v in enumerate(g.outputs):
        if isinstance(v.type, SymIntType) and v.type.expr.free_symbols & symbols:
            if not v.type.expr.free_symbols <= symbols:
                return None
            out.append((i, str(v.type.expr)))
    return out


@register_pass("capture.scalar_inputs", "Python-int inputs that only feed values (a sliding-"
               "window cache's length) -> 0-d device tensors, so CUDA graphs replay them")
def scalar_inputs(g: Graph, ctx: PassContext) -> int:
    target = ctx.options.get("target")
    if not ctx.options.get("cudagraphs") or target is None or not target.graph_capture:
        return 0
    dce(g)
    users = g.users()
    candidates = {}
    for v in g.inputs:
        if not isinstance(v.type, SymIntType) or not v.type.expr.is_Symbol:
            continue
        nodes = _derived(g, v, users)
        if nodes is None or _shapes_use(g, {v.type.expr}):
            continue
        if any(isinstance(w.type, SymIntType) and w is not v
               and v.type.expr in w.type.expr.free_symbols for w in g.inputs):
            continue
        candidates[v] = nodes
    host = _host_outputs(g, {v.type.expr for v in candidates})
    if not candidates or host is None or not ctx.allow():
        return 0
    if host:
        g.meta["host_outputs"] = {"outputs": len(g.outputs), "values": host,
                                  "symbols": {str(v.type.expr): v.name for v in candidates}}
        dropped = {i for i, _ in host}
        g.outputs = [o for i, o in enumerate(g.outputs) if i not in dropped]
    for v, nodes in candidates.items():
        v.type, v.role = I64, SCALAR
        for n in nodes:
            op, args = _TENSOR_FORM[n.op], list(n.args)
            if not all(isinstance(a, Value) for a in args):
                op = _WITH_LITERAL.get(op, op)
            if op in ("aten.clamp_min", "aten.clamp_max", "aten.add", "aten.mul") \
                    and not isinstance(args[0], Value):
                args.reverse()                      # max(0, x) -> clamp_min(x, 0)
            if op == "aten.sub" and not isinstance(args[0], Value):   # c - x = -(x - c)
                args = [g.add_node("aten.sub", [args[1], args[0]], {}, [I64],
                                   before=n).results[0]]
                op = "aten.neg"
            n.op, n.args, n.attrs = op, args, {}
            for r in n.results:
                r.type = I64
    dce(g)
    return len(candidates)
