"""FX graph (AOTAutograd inference graph or torch.export program) -> kiln Graph.

Every call_function becomes one node. Known ATen ops keep their overload-packet name
(`aten.add`); their leading tensor/scalar arguments are positional and the rest named after
the schema, with defaults dropped. Ops kiln has no schema for become opaque
`torch.<ns>.<op>.<overload>` nodes (with a warning). `getitem` on a multi-result op is
folded into that node's results; SymInt arithmetic becomes `sym.*` nodes. Tensors the
graph reads as attributes (`get_attr`: constants that tracing created, such as a
`torch.tensor(...)` in model code) become `weight` inputs after the others, and the
converted graph's `meta["constants"]` maps their names to their values, in that order: the
caller appends them to every call (or binds them like any weight).
"""
from __future__ import annotations

import operator
import re
from typing import Any, Sequence

import sympy
import torch
import torch.fx

from kiln.ir import Graph, ScalarType, SymIntType, TensorType, Value
from kiln.ir.ops import REGISTRY, warn_opaque
from kiln.ir.roles import WEIGHT
from kiln.ir.types import DTYPE_NAMES, make_dim, sym

from . import torch_compat

# What dynamo writes for SymInt/SymBool arithmetic -> the kiln op (kiln.ir.ops.SYM_OPS).
_SYM_FNS = {operator.add: "sym.add", operator.sub: "sym.sub", operator.mul: "sym.mul",
            operator.floordiv: "sym.floordiv", operator.mod: "sym.mod", operator.neg: "sym.neg",
            torch.sym_max: "sym.max", torch.sym_min: "sym.min", torch.sym_sum: "sym.sum",
            torch.sym_ite: "sym.ite", torch.sym_not: "sym.not", operator.not_: "sym.not",
            operator.eq: "sym.eq", operator.ne: "sym.ne", operator.lt: "sym.lt",
            operator.le: "sym.le", operator.gt: "sym.gt", operator.ge: "sym.ge",
            operator.and_: "sym.and", operator.or_: "sym.or"}
# Dynamo's int_oo; printed ranges stay readable with a finite cap.
MAX_DIM = 2**31 - 1


class UnsupportedGraph(RuntimeError):
    pass


def op_name(target) -> str:
    """The kiln op name of an FX call_function target."""
    if isinstance(target, torch_compat.OpOverload):
        ns = target.namespace
        packet = f"{ns}.{torch_compat.schema(target).name.split('::')[-1]}"
        if packet in REGISTRY:
            return packet
        overload = torch_compat.overload_name(target)
        name = f"torch.{packet}.{overload}"
        warn_opaque(name)
        return name
    if target in _SYM_FNS:
        return _SYM_FNS[target]
    raise UnsupportedGraph(
        f"kiln cannot represent the call {getattr(target, '__name__', target)!r}: it is not a "
        f"torch operator. Rewrite it as a torch op or register it with torch.library")


def readable_name(fx_name: str) -> str:
    """A best-effort IR name from an FX node name, for inputs nothing else names:
    `l_self_modules_model_modules_norm_parameters_weight_` -> `model.norm.weight`. Only the
    text of the name is used, so it never decides what an input is."""
    n = re.sub(r"^[lL]_", "", fx_name)
    if re.search(r"_(modules|parameters|buffers)_", n):
        n = re.sub(r"^.*?_(?=(modules|parameters|buffers)_)", "", n)
        n = re.sub(r"_?(modules|parameters|buffers)_", ".", n)
    n = n.strip("_").strip(".")
    n = re.sub(r"[^\w.]", "_", n)
    return n or "arg"


class _SymbolNamer:
    """Renames dynamo's symbols (s52, u3, ...) to s0, s1, ... / u0, ... in order of appearance."""

    def __init__(self):
        self.map: dict[sympy.Symbol, sympy.Symbol] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.hints: dict[str, int] = {}

    def dim(self, d, shape_env=None):
        if isinstance(d, int):
            return d
        expr = d.node.expr if isinstance(d, torch.SymInt) else d
        if shape_env is not None:
            # Apply what the capture proved (s15 == s99, say): one symbol per distinct size.
            expr = shape_env.simplify(expr)
            if expr.is_Integer:
                return int(expr)
        for s in sorted(expr.free_symbols, key=lambda s: s.name):
            if s not in self.map:
                prefix = "u" if s.name.startswith("u") else "s"
                k = sum(1 for v in self.map.values() if v.name.startswith(prefix))
                new = sym(f"{prefix}{k}")
                self.map[s] = new
                lo, hi = 1, MAX_DIM
                r = torch_compat.symbol_range(shape_env, s) if shape_env is not None else None
                if r is not None:
                    lo, hi = _finite(r[0], 0), _finite(r[1], MAX_DIM)
                self.ranges[new.name] = (lo, hi)
                hint = torch_compat.capture_hint(shape_env, s)
                if hint is not None and getattr(hint, "is_Integer", False) and lo <= int(hint) <= hi:
                    self.hints[new.name] = int(hint)
        return make_dim(expr.xreplace(self.map))


def _finite(x, default):
    if not getattr(x, "is_Integer", isinstance(x, int)):
        return default  # int_oo and friends
    v = int(x)
    return min(max(v, 0), MAX_DIM)


def _type_of(val, namer: _SymbolNamer, shape_env):
    if isinstance(val, torch.Tensor):
        if val.dtype not in DTYPE_NAMES:
            raise UnsupportedGraph(f"kiln IR has no dtype for {val.dtype}")
        return TensorType(val.dtype, tuple(namer.dim(d, shape_env) for d in val.shape))
    if isinstance(val, torch.SymInt):
        return SymIntType(namer.dim(val, shape_env))
    if isinstance(val, (bool, torch.SymBool)):
        return ScalarType("bool")
    if isinstance(val, int):
        return SymIntType(val)
    if isinstance(val, (float, torch.SymFloat)):
        return ScalarType("float")
    raise UnsupportedGraph(f"kiln cannot type the value {val!r} ({type(val).__name__})")


def _shape_env(gm: torch.fx.GraphModule):
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            env = torch_compat.shape_env_of(t)
            if env is not None:
                return env
    return None


def split_arguments(target, args: Sequence, kwargs: dict) -> tuple[list, dict]:
    """Positional = the schema's leading Tensor/Scalar arguments; the rest named, defaults dropped."""
    if not isinstance(target, torch_compat.OpOverload):
        return list(args), dict(kwargs)
    schema = torch_compat.schema(target)
    bound: dict[str, Any] = {}
    for a, v in zip(schema.arguments, args):
        bound[a.name] = v
    bound.update(kwargs)
    positional, named = [], {}
    leading = True
    for a in schema.arguments:
        if a.name not in bound:
            leading = False
            continue
        v = bound[a.name]
        if leading and not a.kwarg_only and _tensorish(a.type):
            positional.append(v)
            continue
        leading = False
        if a.has_default_value() and _same_default(v, a.default_value):
            continue
        named[a.name] = v
    return positional, named


def _tensorish(t) -> bool:
    """Tensor, Scalar, Tensor? and lists of them: the data arguments written positionally."""
    if isinstance(t, (torch._C.TensorType, torch._C.NumberType)):
        return True
    if isinstance(t, (torch._C.OptionalType, torch._C.ListType)):
        return _tensorish(t.getElementType())
    return False


def _same_default(v, default) -> bool:
    if isinstance(v, torch.fx.Node):
        return False
    try:
        return type(v) is type(default) and v == default or (v is None and default is None)
    except Exception:  # noqa: BLE001 - incomparable values are never defaults
        return False


def from_fx(gm: torch.fx.GraphModule, inputs: Sequence | None = None,
            name: str = "forward") -> Graph:
    """`inputs`: one spec per placeholder (`.name`, `.weight`; kiln.frontends.dynamo's
    InputSpec); without them inputs are named after the placeholders, none a weight."""
    g = Graph(name)
    shape_env = _shape_env(gm)
    namer = _SymbolNamer()
    env: dict[torch.fx.Node, Any] = {}
    used_names: set[str] = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if inputs is not None and len(inputs) != len(placeholders):
        raise UnsupportedGraph(f"the graph has {len(placeholders)} inputs but {len(inputs)} "
                               f"were described (a capture kiln does not understand)")
    constants: dict[str, torch.Tensor] = {}

    def unique(base: str) -> str:
        n, k = base, 1
        while n in used_names or n.isdigit():
            n, k = f"{base}_{k}", k + 1
        used_names.add(n)
        return n

    def convert(a):
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return [convert(x) for x in a]
        if isinstance(a, torch.SymInt):
            raise UnsupportedGraph(f"unexpected free symbolic value {a} in an argument")
        return a

    for i, n in enumerate(gm.graph.nodes):
        if n.op == "placeholder":
            spec = inputs[placeholders.index(n)] if inputs is not None else None
            base = spec.name if spec is not None else readable_name(n.name)
            val = n.meta.get("val", n.meta.get("example_value"))
            env[n] = g.add_input(unique(base), _type_of(val, namer, shape_env),
                                 WEIGHT if spec is not None and spec.weight else "")
        elif n.op == "call_function":
            if n.target is operator.getitem:
                src = env[n.args[0]]
                if isinstance(src, list):
                    env[n] = src[n.args[1]]
                    continue
                raise UnsupportedGraph(f"getitem on a single value at {n.name}")
            if n.target is torch.ops.aten.sym_size.int:
                node = g.add_node("sym.size", [env[n.args[0]]], {"dim": n.args[1]},
                                  [_type_of(n.meta["val"], namer, shape_env)])
                env[n] = node.results[0]
                continue
            opname = op_name(n.target)
            args, attrs = split_arguments(n.target, n.args, n.kwargs)
            args = [convert(a) for a in args]
            attrs = {k: convert(v) for k, v in attrs.items()}
            val = n.meta.get("val")
            multi = isinstance(val, (list, tuple))
            vals = list(val) if multi else [val]
            if any(v is None for v in vals):
                # Unused optional results (e.g. SDPA's debug mask); typed as absent scalars.
                types = [ScalarType("int") if v is None else _type_of(v, namer, shape_env) for v in vals]
            else:
                types = [_type_of(v, namer, shape_env) for v in vals]
            node = g.add_node(opname, args, attrs, types)
            env[n] = list(node.results) if multi else node.results[0]
        elif n.op == "output":
            outs = n.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            flat = []
            for o in outs:
                v = convert(o)
                if not isinstance(v, Value):
                    raise UnsupportedGraph(f"graph output {o!r} is not a value; kiln graphs "
                                           f"return values only")
                flat.append(v)
            g.outputs = flat
        elif n.op == "get_attr":
            value = _attribute(gm, n.target)
            if not isinstance(value, torch.Tensor):
                raise UnsupportedGraph(
                    f"graph reads the attribute {n.target!r}, a {type(value).__name__}; kiln "
                    f"lifts tensor attributes only (make it a tensor, or an argument)")
            lifted = g.add_input(unique(f"const.{readable_name(n.target)}"),
                                 _type_of(value, namer, shape_env), WEIGHT)
            constants[lifted.name] = value
            env[n] = lifted
        else:
            raise UnsupportedGraph(f"unsupported FX node kind {n.op} ({n.name})")
    # FX lists placeholders first, so lifted constants come after the caller's inputs.
    g.sym_ranges = dict(namer.ranges)
    g.sym_hints = dict(namer.hints)
    g.meta["constants"] = constants
    return g


def _attribute(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

