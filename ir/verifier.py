"""Checks a graph: SSA order, known ops, declared operands/attributes of kiln ops, and
every result type against the op's own type inference."""
from __future__ import annotations

from .graph import Graph
from .ops import FakeEnv, get_op, infer_types
from .printer import format_literal, format_types, value_names
from .types import SymIntType, TensorType


class VerifyError(ValueError):
    pass


def verify(g: Graph, check_types: bool = True) -> None:
    names = value_names(g)
    defined = set()
    seen_names = set()
    for v in g.inputs:
        if v.name in seen_names:
            raise VerifyError(f"input %{v.name} is declared twice")
        seen_names.add(v.name)
        defined.add(v)
    symbols = g.symbols()
    env = FakeEnv(g.sym_ranges, g.sym_hints)

    def where(i, n):
        args = ", ".join([format_literal(a, names) for a in n.args] +
                         [f"{k}={format_literal(a, names)}" for k, a in n.attrs.items()])
        return f"node {i} ({n.op}({args}) : {format_types([r.type for r in n.results])})"

    for i, n in enumerate(g.nodes):
        for v in n.operands():
            if v not in defined:
                raise VerifyError(f"{where(i, n)} uses %{names.get(v, '?')} before it is defined")
        try:
            op = get_op(n.op)
        except KeyError as e:
            raise VerifyError(f"{where(i, n)}: {e.args[0]}") from None
        if op.operands is not None:
            if len(n.args) != len(op.operands):
                raise VerifyError(f"{where(i, n)}: {n.op} takes {len(op.operands)} operands "
                                  f"({', '.join(op.operands)}), got {len(n.args)}")
            required = set(op.attr_names) - set(op.attr_defaults)
            if not required <= set(n.attrs) <= set(op.attr_names):
                optional = "".join(f", optionally {a}" for a in sorted(op.attr_defaults))
                raise VerifyError(f"{where(i, n)}: {n.op} takes attributes "
                                  f"{sorted(required)}{optional}, got {sorted(n.attrs)}")
            defaulted = [a for a, d in op.attr_defaults.items() if a in n.attrs and n.attrs[a] == d]
            if defaulted:
                raise VerifyError(f"{where(i, n)}: {n.op} attribute {defaulted[0]}= equals its "
                                  f"default; leave it out")
        if n.op == "kiln.call":
            _check_call(where(i, n), g, n, check_types)
        if check_types:
            try:
                inferred = infer_types(n.op, n.args, n.attrs, g, env)
            except Exception as e:  # noqa: BLE001 - any failure of the op on these types
                if op.has("opaque"):
                    inferred = None  # an opaque op without a fake implementation
                else:
                    raise VerifyError(f"{where(i, n)}: type inference failed: "
                                      f"{type(e).__name__}: {e}") from None
            if inferred is not None:
                _check_types(where(i, n), inferred, [r.type for r in n.results], symbols)
        defined.update(n.results)
    for v in g.outputs:
        if v not in defined:
            raise VerifyError(f"output %{names.get(v, '?')} is not defined in the graph")


def _check_call(loc, g: Graph, n, check_types: bool) -> None:
    from .ops import callee_of
    try:
        callee = callee_of(g, n.attrs)
    except KeyError as e:
        raise VerifyError(f"{loc}: {e.args[0]}") from None
    if set(n.attrs) != {"callee"}:
        raise VerifyError(f"{loc}: kiln.call takes the attribute callee only, got {sorted(n.attrs)}")
    if len(n.args) != len(callee.inputs):
        raise VerifyError(f"{loc}: @{callee.name} takes {len(callee.inputs)} operands, got {len(n.args)}")
    for k, (a, p) in enumerate(zip(n.args, callee.inputs)):
        if not hasattr(a, "type") or a.type != p.type:
            got = a.type if hasattr(a, "type") else repr(a)
            raise VerifyError(f"{loc}: operand {k} is {got}, @{callee.name} declares %{p.name}: {p.type}")
    if callee.functions:
        raise VerifyError(f"{loc}: @{callee.name} has functions of its own; callees are flat")
    verify(callee, check_types)


def _check_types(loc, inferred, recorded, symbols):
    if len(inferred) != len(recorded):
        raise VerifyError(f"{loc}: the op gives {len(inferred)} results, the node has "
                          f"{len(recorded)}")
    for k, (a, b) in enumerate(zip(inferred, recorded)):
        if a == b:
            continue
        # Data-dependent sizes (nonzero, ...) infer to fresh symbols: compare what is known.
        if (isinstance(a, TensorType) and isinstance(b, TensorType) and a.dtype == b.dtype
                and a.rank == b.rank and not a.symbols() <= symbols):
            continue
        if isinstance(a, SymIntType) and isinstance(b, SymIntType) and not a.symbols() <= symbols:
            continue
        raise VerifyError(f"{loc}: result {k} is typed {b} but the op infers {a}")
