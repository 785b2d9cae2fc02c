"""canonicalize: remove no-op views, reshapes, clones and casts; fold algebraic identities
and integer arithmetic on sizes; CSE; DCE. Runs first so every rule sees one spelling."""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node, SymIntType, TensorType, Value
from kiln.ir.ops import get_op, is_dtype_cast, written_values

from .manager import PassContext, register_pass

_RESHAPES = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand", "aten.alias"}
# IR types carry no strides, so layout-only ops (clone to contiguous) are dropped and every
# view becomes a reshape, which copies exactly when the layout needs it.
_TO_RESHAPE = {"aten.view", "aten._unsafe_view"}
# Casts through these wider types and back are exact.
_WIDER = {
    torch.float16: {torch.float32, torch.float64}, torch.bfloat16: {torch.float32, torch.float64},
    torch.float32: {torch.float64}, torch.int32: {torch.int64}, torch.int16: {torch.int32, torch.int64},
    torch.int8: {torch.int16, torch.int32, torch.int64}, torch.bool: {torch.int64, torch.int32, torch.float32},
}


def _is_tensor(v) -> bool:
    return isinstance(v, Value) and isinstance(v.type, TensorType)




def _noop_source(n: Node, mutated: set[Value]) -> Value | None:
    """The value `n` equals, if `n` is a no-op."""
    if len(n.results) != 1 or not n.args or not _is_tensor(n.args[0]):
        return None
    x, out = n.args[0], n.results[0]
    if x.type != out.type:
        # cast(cast(x, wider), x.dtype) == x
        if is_dtype_cast(n, fold=True) and not x.is_input:
            inner = x.producer
            if (is_dtype_cast(inner, fold=True) and _is_tensor(inner.args[0])
                    and inner.args[0].type == out.type
                    and x.type.dtype in _WIDER.get(out.type.dtype, ())):
                return inner.args[0]
        return None
    if n.op in _RESHAPES:
        return x
    if is_dtype_cast(n, fold=True):
        return x
    if n.op == "aten.clone" and set(n.attrs) <= {"memory_format"} and x not in mutated:
        return x
    if n.op == "aten.permute" and list(n.attrs.get("dims", [])) == list(range(x.type.rank)):
        return x
    if n.op == "aten.slice" and n.attrs.get("step", 1) == 1:
        # a unit-step range as long as its dim is the whole dim, whatever its bounds
        # (`x[:, -1:]` of a one-token decode step)
        return x
    if n.op in ("aten.add", "aten.sub") and len(n.args) == 2 and n.args[1] == 0 and \
            not isinstance(n.args[1], bool) and "alpha" not in n.attrs:
        return x
    if n.op in ("aten.mul", "aten.div") and len(n.args) == 2 and n.args[1] == 1 and \
            not isinstance(n.args[1], bool):
        return x
    return None


def _fold_sym(n: Node) -> int | None:
    """Integer arithmetic on sizes whose operands are all known."""
    if not n.op.startswith("sym.") or n.op == "sym.size":
        return None
    t = n.results[0].type
    if isinstance(t, SymIntType) and isinstance(t.expr, int):
        return t.expr
    return None


def _key(n: Node):
    def k(a):
        if isinstance(a, Value):
            return ("v", a.uid)
        if isinstance(a, (list, tuple)):
            return ("l",) + tuple(k(x) for x in a)
        if isinstance(a, float):
            return ("f", repr(a))
        return (type(a).__name__, a)
    return (n.op, tuple(k(a) for a in n.args), tuple(sorted((name, k(a)) for name, a in n.attrs.items())))


@register_pass("canonicalize", "no-op views/reshapes/clones/casts, identities, size arithmetic, CSE, DCE")
def canonicalize(g: Graph, ctx: PassContext) -> int:
    changed = 0
    mutated = {v for n in g.nodes for v in written_values(n)}
    # 1. no-ops and folding, one forward sweep (replacements chain naturally)
    replace: dict[Value, Value] = {}
    kept: list[Node] = []
    seen: dict = {}
    for n in g.nodes:
        n.replace_uses(replace)
        if n.op in _TO_RESHAPE:
            n.op = "aten.reshape"
            n.attrs = {("shape" if k == "size" else k): a for k, a in n.attrs.items()}
            changed += 1
        src = _noop_source(n, mutated)
        if src is not None and ctx.allow():
            replace[n.results[0]] = src
            changed += 1
            continue
        op = get_op(n.op)
        if op.pure and not op.has("random"):
            key = _key(n)
            prev = seen.get(key)
            if prev is not None and len(prev.results) == len(n.results) and \
                    all(a.type == b.type for a, b in zip(prev.results, n.results)) and ctx.allow():
                for a, b in zip(n.results, prev.results):
                    replace[a] = b
                changed += 1
                continue
            seen[key] = n
        kept.append(n)
    g.nodes = kept
    g.outputs = [replace.get(v, v) for v in g.outputs]
    changed += _fold_sizes(g, ctx)
    changed += dce(g)
    return changed


def _fold_sizes(g: Graph, ctx: PassContext) -> int:
    """Size values whose expression is a known integer become literals in attributes."""
    known = {r: _fold_sym(n) for n in g.nodes for r in n.results if _fold_sym(n) is not None}
    if not known:
        return 0
    count = 0

    def sub(a):
        nonlocal count
        if isinstance(a, Value) and a in known:
            count += 1
            return known[a]
        if isinstance(a, list):
            return [sub(x) for x in a]
        return a
    for n in g.nodes:
        n.attrs = {k: sub(a) for k, a in n.attrs.items()}
    return count


def dce(g: Graph) -> int:
    """Drops pure nodes none of whose results is used."""
    live: set[Value] = set(g.outputs)
    kept: list[Node] = []
    removed = 0
    for n in reversed(g.nodes):
        op = get_op(n.op)
        if op.pure and not any(r in live for r in n.results):
            removed += 1
            continue
        kept.append(n)
        live.update(n.operands())
    kept.reverse()
    g.nodes = kept
    return removed
