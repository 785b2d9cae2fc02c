"""The op registry, declared once as data.

Three families:
- `aten.*` / `prims.*`: captured PyTorch ops. The table below lists every one kiln knows,
  with its traits; schema and reference implementation come from torch itself (the op
  overload packet), and type inference runs the op on fake tensors with symbolic shapes.
- `kiln.*`: fused LLM operators (declared in `kiln_ops.py`), each with a torch reference
  implementation that defines its semantics.
- `sym.*`: integer arithmetic on dynamic sizes.
Any other torch op is an opaque `torch.<namespace>.<op>.<overload>` node: it runs by calling
that op, its result types come from fake execution (or capture), and no rule fuses it
unless the rule names it.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch

from .graph import Value, map_values
from .types import (ScalarType, SymIntType, TensorType, Type, make_dim, sym)


@dataclass
class OpDef:
    name: str
    impl: Callable                     # reference implementation: impl(*args, **attrs)
    traits: frozenset[str] = frozenset()
    infer: Callable | None = None      # (args, attrs) -> list[Type]; default: fake execution of impl
    doc: str = ""
    # kiln ops: declared operand and attribute names, checked by the verifier
    operands: tuple[str, ...] | None = None
    attr_names: tuple[str, ...] | None = None
    attr_defaults: dict[str, Any] = field(default_factory=dict)   # optional attributes
    num_results: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pure(self) -> bool:
        # Opaque ops may have side effects kiln cannot see: never CSE'd or dropped. A
        # collective (kiln.all_reduce, ...) meets the same op on every other rank: never
        # merged with another, dropped or hoisted into weight preparation.
        return not self.traits & {"mutates", "random", "opaque", "collective"}

    def has(self, trait: str) -> bool:
        return trait in self.traits


REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name} registered twice")
    REGISTRY[op.name] = op
    return op


# ---- aten / prims: name -> traits. Schema and semantics come from torch. ----
_E, _C, _V, _R, _CAST = "elementwise", "commutative", "view", "reduction", "cast"
ATEN_OPS: dict[str, tuple[str, ...]] = {
    # elementwise arithmetic
    "aten.add": (_E, _C), "aten.mul": (_E, _C), "aten.sub": (_E,), "aten.div": (_E,),
    "aten.pow": (_E,), "aten.neg": (_E,), "aten.rsqrt": (_E,), "aten.sqrt": (_E,),
    "aten.exp": (_E,), "aten.log": (_E,), "aten.abs": (_E,), "aten.reciprocal": (_E,),
    "aten.sigmoid": (_E,), "aten.tanh": (_E,), "aten.silu": (_E,), "aten.gelu": (_E,),
    "aten.relu": (_E,), "aten.cos": (_E,), "aten.sin": (_E,), "aten.erf": (_E,),
    "aten.maximum": (_E, _C), "aten.minimum": (_E, _C), "aten.clamp": (_E,),
    "aten.clamp_min": (_E,), "aten.clamp_max": (_E,), "aten.where": (_E,),
    "aten.eq": (_E,), "aten.ne": (_E,), "aten.lt": (_E,), "aten.le": (_E,), "aten.gt": (_E,),
    "aten.ge": (_E,), "aten.logical_and": (_E, _C), "aten.logical_or": (_E, _C),
    "aten.logical_not": (_E,), "aten.bitwise_and": (_E, _C), "aten.bitwise_or": (_E, _C),
    "aten.bitwise_not": (_E,), "aten.isnan": (_E,), "aten.round": (_E,), "aten.floor": (_E,),
    "aten.ceil": (_E,), "aten.masked_fill": (_E,), "aten.fill": (_E,),
    "aten.floor_divide": (_E,), "aten.remainder": (_E,), "aten.sign": (_E,),
    "aten._to_copy": (_E, _CAST), "prims.convert_element_type": (_E, _CAST), "aten.clone": (_E,),
    # reductions and normalisation
    "aten.mean": (_R,), "aten.sum": (_R,), "aten.amax": (_R,), "aten.amin": (_R,),
    "aten.max": (_R,), "aten.argmax": (_R,), "aten.any": (_R,), "aten.all": (_R,),
    "aten.prod": (_R,), "aten.var_mean": (_R,), "aten._softmax": (_R,),
    "aten._log_softmax": (_R,), "aten.cumsum": (), "aten.topk": (), "aten.sort": (),
    "aten.argsort": (), "aten.rms_norm": (), "aten._fused_rms_norm": (),
    "aten.native_layer_norm": (),
    # linear algebra
    "aten.mm": (), "aten.bmm": (), "aten.addmm": (), "aten.matmul": (), "aten.linear": (),
    "aten.baddbmm": (), "aten._grouped_mm": (),
    "aten.scaled_dot_product_attention": (), "aten._scaled_dot_product_flash_attention": (),
    "aten._scaled_dot_product_efficient_attention": (),
    "aten._scaled_dot_product_flash_attention_for_cpu": (),
    "aten._scaled_dot_product_cudnn_attention": (),
    # views and layout
    "aten.view": (_V,), "aten._unsafe_view": (_V,), "aten.reshape": (_V,),
    "aten.permute": (_V,), "aten.transpose": (_V,), "aten.t": (_V,),
    "aten.unsqueeze": (_V,), "aten.squeeze": (_V,), "aten.expand": (_V,),
    "aten.slice": (_V,), "aten.select": (_V,), "aten.alias": (_V,), "aten.split": (_V,),
    "aten.split_with_sizes": (_V,), "aten.chunk": (_V,), "aten.unbind": (_V,),
    "aten.as_strided": (_V,), "aten.diagonal": (_V,), "aten.unfold": (_V,),
    "aten.contiguous": (), "aten.cat": (), "aten.stack": (), "aten.repeat": (),
    "aten.repeat_interleave": (), "aten.flip": (), "aten.roll": (), "aten.constant_pad_nd": (),
    # indexing and scatter
    "aten.embedding": (), "aten.index": (), "aten.index_select": (), "aten.gather": (),
    "aten.scatter": (), "aten.scatter_add": (), "aten.index_put": (), "aten.index_add": (),
    "aten.index_copy": (), "aten.slice_scatter": (), "aten.select_scatter": (),
    "aten.one_hot": (), "aten.nonzero": (), "aten.masked_select": (), "aten.tril": (),
    "aten.triu": (), "aten.bincount": (), "aten.histc": (), "aten.searchsorted": (),
    # creation
    "aten.full": (), "aten.full_like": (), "aten.zeros": (), "aten.zeros_like": (),
    "aten.ones": (), "aten.ones_like": (), "aten.empty": (), "aten.empty_like": (),
    "aten.empty_strided": (), "aten.empty_permuted": (), "aten.arange": (), "aten.scalar_tensor": (),
    "aten.lift_fresh_copy": (), "aten.new_zeros": (), "aten.new_ones": (),
    "aten.new_full": (), "aten.new_empty": (), "aten.new_empty_strided": (),
    # in-place writes into graph inputs (kept by keep_inference_input_mutations)
    "aten.copy_": ("mutates",), "aten.copy": (), "aten.index_put_": ("mutates",),
    "aten.index_copy_": ("mutates",), "aten.fill_": ("mutates",), "aten.add_": ("mutates",),
    "aten._foreach_add_": ("mutates",),   # its first operand is a list of tensors
    "aten._assert_tensor_metadata": ("mutates",),
    "aten.sym_constrain_range_for_size": ("mutates",),
    # random
    "aten.rand": ("random",), "aten.randn": ("random",), "aten.bernoulli": ("random",),
    "aten.multinomial": ("random",), "aten.exponential": ("random",),
    "aten.uniform": ("random",),
}


def _torch_op(qualname: str):
    """`aten.add` -> torch.ops.aten.add (overload packet); `aten.add.Tensor` -> the overload."""
    ns, _, rest = qualname.partition(".")
    name, _, overload = rest.partition(".")
    packet = getattr(getattr(torch.ops, ns), name)
    return getattr(packet, overload) if overload else packet


def _constant_pad_nd_infer(args, attrs):
    """Typed by arithmetic, not fake execution: with a symbolic pad amount (SDPA pads masks
    by `align - size % align`) fake tensors fail (torch 2.13) or specialise the size to its
    example (torch 2.11), and every later type in that env with it."""
    x = args[0]
    pad = attrs.get("pad", args[1] if len(args) > 1 else [])
    shape = list(x.type.shape)
    for i in range(len(pad) // 2):
        before, after = (_sym_expr(p) for p in pad[2 * i: 2 * i + 2])
        if before is None or after is None:
            raise ValueError(f"aten.constant_pad_nd: pad {pad} is not made of sizes")
        d = len(shape) - 1 - i
        shape[d] = make_dim(sympy.sympify(shape[d]) + before + after)
    return [TensorType(x.type.dtype, tuple(shape))]


def _histc_infer(args, attrs):
    """Typed by rule: `bins` counts in the input's dtype. Fake execution runs on CPU, whose
    histc takes floats only, while the MoE capture on CUDA counts int32 expert ids."""
    x = args[0]
    bins = attrs.get("bins", args[1] if len(args) > 1 else 100)
    return [TensorType(x.type.dtype, (bins,))]


_INFER_BY_RULE = {"aten.constant_pad_nd": _constant_pad_nd_infer, "aten.histc": _histc_infer}

for _name, _traits in ATEN_OPS.items():
    try:
        _impl = _torch_op(_name)
    except (AttributeError, RuntimeError):
        continue  # an op this torch build lacks
    register(OpDef(_name, _impl, frozenset(_traits), infer=_INFER_BY_RULE.get(_name)))


# ---- sym.*: arithmetic on dynamic sizes, typed by exact symbolic expressions ----
def _sym_infer(fn):
    def infer(args, attrs):
        vals = [_sym_expr(a) for a in _flat(args)]
        if fn is None or any(v is None for v in vals):
            return [ScalarType("int")]
        return [SymIntType(fn(*vals))]
    return infer


def _bool_infer(args, attrs):
    return [ScalarType("bool")]


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _sym_expr(a):
    if isinstance(a, Value):
        return sympy.Integer(a.type.expr) if isinstance(a.type, SymIntType) and isinstance(
            a.type.expr, int) else (a.type.expr if isinstance(a.type, SymIntType) else None)
    if isinstance(a, int) and not isinstance(a, bool):
        return sympy.Integer(a)
    return None


def _floordiv(a, b):
    from torch.utils._sympy.functions import FloorDiv
    return FloorDiv(a, b)


def _mod(a, b):
    from torch.utils._sympy.functions import Mod
    return Mod(a, b)


# The SymInt arithmetic dynamo emits (Python operators and torch.sym_*): runtime function,
# symbolic function for the result type (None: an int the IR cannot express exactly) or
# "bool", and the Python the wrapper writes for it.
SYM_OPS: dict[str, tuple[Callable, Callable | str | None, str]] = {
    "sym.add": (operator.add, operator.add, "{} + {}"),
    "sym.sub": (operator.sub, operator.sub, "{} - {}"),
    "sym.mul": (operator.mul, operator.mul, "{} * {}"),
    "sym.floordiv": (operator.floordiv, _floordiv, "{} // {}"),
    "sym.mod": (operator.mod, _mod, "{} % {}"),
    "sym.neg": (operator.neg, operator.neg, "-{}"),
    "sym.max": (max, sympy.Max, "max({}, {})"),
    "sym.min": (min, sympy.Min, "min({}, {})"),
    "sym.sum": (sum, lambda *xs: sympy.Add(*xs), "sum({})"),
    "sym.ite": (lambda c, a, b: a if c else b, None, "({1} if {0} else {2})"),
    "sym.not": (operator.not_, "bool", "(not {})"),
    "sym.eq": (operator.eq, "bool", "({} == {})"),
    "sym.ne": (operator.ne, "bool", "({} != {})"),
    "sym.lt": (operator.lt, "bool", "({} < {})"),
    "sym.le": (operator.le, "bool", "({} <= {})"),
    "sym.gt": (operator.gt, "bool", "({} > {})"),
    "sym.ge": (operator.ge, "bool", "({} >= {})"),
    "sym.and": (operator.and_, "bool", "({} and {})"),
    "sym.or": (operator.or_, "bool", "({} or {})"),
}
for _name, (_rt, _symfn, _py) in SYM_OPS.items():
    register(OpDef(_name, _rt, frozenset({"sym"}),
                   infer=_bool_infer if _symfn == "bool" else _sym_infer(_symfn)))


def _sym_size_infer(args, attrs):
    x = args[0]
    return [SymIntType(x.type.shape[attrs["dim"]])]


register(OpDef("sym.size", lambda x, dim: x.shape[dim], frozenset({"sym"}), infer=_sym_size_infer))


# ---- lookup ----
_warned: set[str] = set()


# Attributes a dtype cast may carry besides its dtype (as capture writes `.to(dtype)`).
_CAST_ATTRS = {"dtype", "layout", "device", "memory_format", "non_blocking"}


def is_dtype_cast(node, fold: bool = False) -> bool:
    """`node` (an op with the `cast` trait) changes its one operand's dtype and nothing else
    the IR shows: strided layout, blocking. A `device` or `memory_format` attribute, which
    the IR cannot compare with the operand's, still counts for matching (`cast(%x)` in a
    rule); with `fold` (removing or merging casts) only the dtype may be given, or
    nothing (a copy that changes nothing)."""
    if not get_op(node.op).has(_CAST) or len(node.args) != 1:
        return False
    if node.op == "prims.convert_element_type":
        return True
    if fold:
        return set(node.attrs) <= {"dtype"}
    if "dtype" not in node.attrs or not set(node.attrs) <= _CAST_ATTRS:
        return False
    return node.attrs.get("layout", torch.strided) in (None, torch.strided) and \
        not node.attrs.get("non_blocking", False)


def cast_ops() -> tuple[str, ...]:
    """The ops with the `cast` trait."""
    return tuple(name for name, traits in ATEN_OPS.items() if _CAST in traits)


def is_opaque(name: str) -> bool:
    return name.startswith("torch.")


def written_values(node) -> list[Value]:
    """The values `node` writes in place: none for pure ops; for a `mutates` op its first
    operand, or the operands its `mutated_operands` names (a kernel that updates caches),
    and, when such an operand is a view, the values it views (a write into
    `slice(cache, ...)` writes `cache`: shard.tensor_parallel writes each rank's heads of a
    KV-cache input through such a view)."""
    op = get_op(node.op)
    if not op.has("mutates"):
        return []
    out = []
    for k in op.extra.get("mutated_operands", (0,)):
        arg = node.args[k] if k < len(node.args) else None
        out += [a for a in (arg if isinstance(arg, (list, tuple)) else [arg]) if isinstance(a, Value)]
    for v in list(out):
        while v.producer is not None and get_op(v.producer.op).has("view") and v.producer.args \
                and isinstance(v.producer.args[0], Value):
            v = v.producer.args[0]
            out.append(v)
    return out


def aliases(g, root: Value) -> set[Value]:
    """`root` and every value of graph `g` that may share its storage through view ops."""
    out = {root}
    for n in g.nodes:
        if get_op(n.op).has("view") and n.args and n.args[0] in out:
            out.update(n.results)
    return out


def get_op(name: str) -> OpDef:
    op = REGISTRY.get(name)
    if op is not None:
        return op
    if is_opaque(name):
        try:
            impl = _torch_op(name[len("torch."):])
        except (AttributeError, RuntimeError):
            raise KeyError(f"unknown op {name}: torch has no operator "
                           f"{name[len('torch.'):]} (is the library that defines it imported?)") from None
        op = OpDef(name, impl, frozenset({"opaque"}))
        REGISTRY[name] = op
        return op
    raise KeyError(f"unknown op {name}: not in kiln's registry (see `kiln ops`); ops kiln "
                   f"has no schema for are written torch.<namespace>.<op>.<overload>")


def warn_opaque(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"kiln: {name} has no kiln schema; it stays an opaque node that calls "
                      f"the torch op and is never fused unless a rule names it", stacklevel=3)


# ---- type inference by fake execution ----
class FakeEnv:
    """Fake tensors with symbolic sizes for the symbols of one graph."""

    def __init__(self, sym_ranges: dict[str, tuple[int, int]] | None = None,
                 sym_hints: dict[str, int] | None = None):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.sym_ranges = sym_ranges or {}
        self.sym_hints = sym_hints or {}
        self._symints: dict[str, Any] = {}
        self._back: dict[sympy.Symbol, sympy.Symbol] = {}

    def symint(self, name: str):
        if name not in self._symints:
            from torch._dynamo.source import ConstantSource
            from torch.fx.experimental.symbolic_shapes import DimDynamic
            from torch.utils._sympy.value_ranges import ValueRanges
            # Distinct hints > 1 keep the shape env from specialising symbols to 0/1 or to
            # each other; the graph's declared range bounds them, so that comparisons the
            # capture proved (a sequence within the cache length, say) come out the same.
            lo, hi = self.sym_ranges.get(name, (2, 2**31 - 1))
            hint = self.sym_hints.get(name) or min(max(17 + 8 * len(self._symints), lo, 2), hi)
            s = self.shape_env.create_symbol(hint, source=ConstantSource(f"kiln_{name}"),
                                             dynamic_dim=DimDynamic.DYNAMIC)
            self.shape_env.var_to_range[s] = ValueRanges(max(lo, 2), hi)
            self._symints[name] = self.shape_env.create_symintnode(s, hint=hint)
            self._back[s] = sym(name)
        return self._symints[name]

    def size(self, d):
        if isinstance(d, int):
            return d
        subs = {s: self.symint(s.name) for s in d.free_symbols}
        return _eval_sym(d, subs)

    def fake(self, v: Value):
        t = v.type
        if isinstance(t, TensorType):
            with self.mode:
                return torch.empty([self.size(d) for d in t.shape], dtype=t.dtype)
        if isinstance(t, SymIntType):
            return self.size(t.expr)
        return {"int": 3, "float": 0.5, "bool": True}[t.kind]

    def to_type(self, obj) -> Type:
        if isinstance(obj, torch.Tensor):
            return TensorType(obj.dtype, tuple(self.to_dim(d) for d in obj.shape))
        if isinstance(obj, torch.SymInt):
            return SymIntType(self.to_dim(obj))
        if isinstance(obj, bool):
            return ScalarType("bool")
        if isinstance(obj, int):
            return SymIntType(obj)
        if isinstance(obj, (float, torch.SymFloat)):
            return ScalarType("float")
        raise TypeError(f"cannot type result {obj!r}")

    def to_dim(self, d):
        if isinstance(d, int):
            return d
        expr = d.node.expr
        return make_dim(expr.xreplace(self._back))


def _eval_sym(e: sympy.Expr, subs: dict):
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        return subs[e]
    args = [_eval_sym(a, subs) for a in e.args]
    if isinstance(e, sympy.Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(e, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    name = type(e).__name__
    if name == "FloorDiv":
        return args[0] // args[1]
    if name in ("Mod", "PythonMod"):
        return args[0] % args[1]
    if isinstance(e, sympy.Max):
        return torch.sym_max(*args)
    if isinstance(e, sympy.Min):
        return torch.sym_min(*args)
    raise TypeError(f"cannot evaluate symbolic size {e}")


_CPU = torch.device("cpu")


_INFER_CACHE: dict = {}


def _signature(a):
    if isinstance(a, Value):
        return ("v", a.type)
    if isinstance(a, (list, tuple)):
        return ("l", tuple(_signature(x) for x in a))
    if isinstance(a, float):
        return ("f", repr(a))
    return (type(a).__name__, a)


def infer_types(name: str, args: list, attrs: dict, graph=None, env: FakeEnv | None = None
                ) -> list[Type]:
    """Result types of `name(*args, **attrs)`, memoised on the operand types, literals and
    the graph's symbol ranges: a model's layers repeat the same signatures, and fake
    execution (of a fused op's reference especially) is slow."""
    if name == "kiln.call":   # typed by its callee; names repeat across graphs: no memo
        return callee_of(graph, attrs).output_types()
    sym_info = (tuple(sorted(graph.sym_ranges.items())), tuple(sorted(graph.sym_hints.items()))
                ) if graph is not None else ()
    try:
        key = (name, _signature(args), tuple(sorted((k, _signature(v)) for k, v in attrs.items())),
               sym_info)
        hash(key)
    except TypeError:
        return _infer_types(name, args, attrs, graph, env)
    out = _INFER_CACHE.get(key)
    if out is None:
        out = _infer_types(name, args, attrs, graph, env)
        if len(_INFER_CACHE) > 8192:
            _INFER_CACHE.clear()
        _INFER_CACHE[key] = out
    return list(out)


def callee_of(graph, attrs: dict):
    """The function a kiln.call node names, looked up in its graph."""
    name = attrs.get("callee")
    functions = getattr(graph, "functions", None) or {}
    if name not in functions:
        raise KeyError(f"kiln.call names @{name}, which is not a function of the graph "
                       f"(functions: {', '.join(functions) or 'none'})")
    return functions[name]


def _infer_types(name: str, args: list, attrs: dict, graph, env: FakeEnv | None) -> list[Type]:
    op = get_op(name)
    if op.infer is not None:
        return op.infer(args, attrs)
    env = env or (FakeEnv(graph.sym_ranges, graph.sym_hints) if graph is not None else FakeEnv())

    def fake(v):
        return env.fake(v)

    def literal(a):
        return _CPU if isinstance(a, torch.device) else a

    fargs = map_values([literal(a) if not isinstance(a, Value) else a for a in args], fake)
    fattrs = {k: map_values(literal(a) if not isinstance(a, Value) else a, fake)
              for k, a in attrs.items()}
    fargs = [_devices_to_cpu(a) for a in fargs]
    fattrs = {k: _devices_to_cpu(a) for k, a in fattrs.items()}
    with env.mode:
        out = op.impl(*fargs, **fattrs)
    if out is None:   # an in-place op with no result (`_foreach_add_`)
        return []
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [env.to_type(o) for o in outs]


def _devices_to_cpu(a):
    if isinstance(a, torch.device):
        return _CPU
    if isinstance(a, list):
        return [_devices_to_cpu(x) for x in a]
    return a


def describe(op: OpDef) -> str:
    kind = "opaque" if op.has("opaque") else op.name.split(".")[0]
    traits = ",".join(sorted(op.traits)) or "-"
    return f"{op.name:48s} {kind:6s} {traits}"
