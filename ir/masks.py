"""What an attention mask computes, read off the ops that build it.

Models build their masks from position indices: transformers compares `kv_idx <= q_idx`
(causal) and `kv_idx > q_idx - window` (sliding window) on broadcast index tensors and
ANDs the terms together; others write `tril`-style aranges or compare position ids. This
module interprets such a mask's producers abstractly, so that `fuse.attention` can turn a
mask into `kiln.attention`'s `causal` and `window` attributes (no mask tensor, no mask
reads, and kernels that skip the keys nobody sees) and `serve.kv_cache` can tell a causal
mask from a sliding window — whatever order or spelling the terms come in.

The abstract values:
- `Affine`: an integer tensor whose element at index (..., a, b) is
  const + sum(coef * atom), an atom being the index along one axis (`("axis", k)`, k
  counted from the right: -1 is the last axis) or an element of a 1-D integer graph input
  read at the index along one axis (`("at", input, k)`: `position_ids[b]`).
- `Conj`: a bool tensor that is the AND of linear constraints `affine >= 0` and of terms
  the interpretation does not understand (`opaque`: their Values).
- `Additive`: a float mask that is 0 where a `Conj` holds and -inf (or the dtype's lowest
  value) elsewhere.
Everything else is unknown (None), and a comparison of unknowns is an opaque term.

`mask_form` then reads the constraints in attention's coordinates, query i on axis -2 and
key j on axis -1, either as indices or as positions read from one input.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from .graph import Value
from .types import SymIntType, TensorType


@dataclass(frozen=True)
class Affine:
    coeffs: tuple = ()          # ((atom, coef), ...), sorted, no zero coefficients
    const: object = 0           # int or a sympy expression of the graph's symbols

    @staticmethod
    def make(coeffs: dict, const) -> "Affine":
        return Affine(tuple(sorted(((a, c) for a, c in coeffs.items() if c != 0), key=repr)),
                      sympy.sympify(const))

    def terms(self) -> dict:
        return dict(self.coeffs)

    def plus(self, other: "Affine", sign: int = 1) -> "Affine":
        t = self.terms()
        for a, c in other.coeffs:
            t[a] = t.get(a, 0) + sign * c
        return Affine.make(t, self.const + sign * other.const)

    def times(self, k: int) -> "Affine":
        return Affine.make({a: c * k for a, c in self.coeffs}, self.const * k)

    def map_atoms(self, fn) -> "Affine":
        """fn(atom) -> Affine to put in its place."""
        out = Affine.make({}, self.const)
        for a, c in self.coeffs:
            out = out.plus(fn(a).times(c))
        return out


@dataclass(frozen=True)
class Conj:
    constraints: tuple = ()     # Affine expressions, each >= 0
    opaque: tuple = ()          # bool Values ANDed in


@dataclass(frozen=True)
class Additive:
    where: Conj


@dataclass(frozen=True)
class MaskForm:
    """A mask in attention's terms. `positions`: None when the constraints compare indices
    (query i, key j), else the input whose elements they compare (positions[i] and
    positions[j]). `window`: keys j with p_i - j < window (kiln.attention's attribute)."""
    causal: bool
    window: int | None
    positions: Value | None = None
    opaque: tuple = ()


def _literal(x):
    """An int (or sympy expression) from a node argument, or None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, Value) and isinstance(x.type, SymIntType):
        return x.type.expr
    return None


def _float_literal(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _rank(v: Value) -> int | None:
    return v.type.rank if isinstance(v.type, TensorType) else None


def _shape(v: Value):
    return v.type.shape if isinstance(v.type, TensorType) else None


def _drop_unit_axes(a: Affine, v: Value) -> Affine | None:
    """An index along an axis of size 1 is always 0; an input read there is one unknown
    element (None)."""
    shape = _shape(v)
    if shape is None:
        return a

    def unit(k):
        return -k <= len(shape) and shape[k] == 1

    def fn(atom):
        if atom[0] == "axis":
            return Affine.make({}, 0) if unit(atom[1]) else Affine.make({atom: 1}, 0)
        if unit(atom[2]):
            raise _Unknown
        return Affine.make({atom: 1}, 0)
    return _map_or_none(a, fn)


class _Unknown(Exception):
    pass


def _map_or_none(a: Affine, fn) -> Affine | None:
    try:
        return a.map_atoms(fn)
    except _Unknown:
        return None


def _shift_axes(a: Affine, moved) -> Affine:
    """Renumber atoms' axes: moved(k) -> new k."""
    def fn(atom):
        if atom[0] == "axis":
            return Affine.make({("axis", moved(atom[1])): 1}, 0)
        return Affine.make({("at", atom[1], moved(atom[2])): 1}, 0)
    return a.map_atoms(fn)


class _Interp:
    def __init__(self):
        self.memo: dict[Value, object] = {}

    def value(self, v) -> object:
        if not isinstance(v, Value):
            lit = _literal(v)
            return Affine.make({}, lit) if lit is not None else _float_literal(v)
        if v not in self.memo:
            self.memo[v] = self._eval(v)
        return self.memo[v]

    def _eval(self, v: Value):
        if v.is_input:
            shape = _shape(v)
            if (shape is not None and v.type.dtype in (torch.int64, torch.int32)
                    and sum(1 for s in shape if s != 1) == 1 and shape[-1] != 1):
                return Affine.make({("at", v, -1): 1}, 0)
            lit = _literal(v)
            return Affine.make({}, lit) if lit is not None else None
        n = v.producer
        rule = _TRANSFER.get(n.op)
        out = rule(self, n) if rule else None
        if isinstance(out, Affine):
            out = _drop_unit_axes(out, v)
        if out is None and isinstance(v.type, TensorType) and v.type.dtype == torch.bool:
            return Conj((), (v,))
        return out


# -- transfer functions ----------------------------------------------------------------------

def _arange(it, n):
    args = list(n.args)
    if n.attrs.get("step", 1) != 1 or len(args) > 2:
        return None
    start, end = (0, args[0]) if len(args) == 1 else args
    start = _literal(start)
    return None if start is None else Affine.make({("axis", -1): 1}, start)


def _unsqueeze(it, n):
    x = it.value(n.args[0])
    r = _rank(n.args[0])
    if not isinstance(x, (Affine, Conj)) or r is None:
        return None
    d = n.attrs["dim"]
    d = d + r + 1 if d < 0 else d          # position in the result

    def moved(k):                          # axes left of d move one further from the right
        return k - 1 if r + k < d else k
    if isinstance(x, Conj):
        return Conj(tuple(_shift_axes(c, moved) for c in x.constraints), x.opaque)
    return _shift_axes(x, moved)


def _same_axes(it, n):
    """Views that keep every non-unit axis in place counted from the right: expand, and
    reshapes that only add or drop unit axes."""
    x = it.value(n.args[0])
    src, dst = _shape(n.args[0]), _shape(n.results[0])
    if src is None or dst is None:
        return None
    if n.op != "aten.expand":
        big_src = [(k, s) for k, s in enumerate(src) if s != 1]
        big_dst = [(k, s) for k, s in enumerate(dst) if s != 1]
        if [s for _, s in big_src] != [s for _, s in big_dst]:
            return None
        pos = {ks - len(src): kd - len(dst) for (ks, _), (kd, _) in zip(big_src, big_dst)}
        if isinstance(x, Affine):
            return _shift_axes(x, lambda k: pos.get(k, k))
        if isinstance(x, Conj):
            return Conj(tuple(_shift_axes(c, lambda k: pos.get(k, k)) for c in x.constraints),
                        x.opaque)
        return None
    return x if isinstance(x, (Affine, Conj)) else None


def _slice(it, n):
    x = it.value(n.args[0])
    shape = _shape(n.args[0])
    if not isinstance(x, Affine) or shape is None or n.attrs.get("step", 1) != 1:
        return None
    dim = n.attrs.get("dim", 0)
    k = dim - len(shape) if dim >= 0 else dim
    start = _literal(n.attrs.get("start") or 0)
    if start is None:
        return None
    if sympy.sympify(start).is_negative:
        start = start + shape[k]

    def fn(atom):
        if (atom[1] if atom[0] == "axis" else atom[2]) != k or start == 0:
            return Affine.make({atom: 1}, 0)
        if atom[0] == "at":
            raise _Unknown                # position_ids[j + start]: not an atom
        return Affine.make({atom: 1}, start)
    return _map_or_none(x, fn)


def _arith(sign):
    def rule(it, n):
        a, b = it.value(n.args[0]), it.value(n.args[1])
        if n.attrs.get("alpha", 1) != 1 or not isinstance(a, Affine) or not isinstance(b, Affine):
            return None
        return a.plus(b, sign)
    return rule


def _mul(it, n):
    a, b = it.value(n.args[0]), it.value(n.args[1])
    if isinstance(a, Affine) and isinstance(b, Affine):
        if not b.coeffs and isinstance(b.const, sympy.Integer):
            return a.times(int(b.const))
        if not a.coeffs and isinstance(a.const, sympy.Integer):
            return b.times(int(a.const))
    return None


def _neg(it, n):
    a = it.value(n.args[0])
    return a.times(-1) if isinstance(a, Affine) else None


def _compare(kind):
    def rule(it, n):
        a, b = it.value(n.args[0]), it.value(n.args[1])
        if not isinstance(a, Affine) or not isinstance(b, Affine):
            return None
        one = Affine.make({}, 1)
        cons = {"ge": [a.plus(b, -1)], "gt": [a.plus(b, -1).plus(one, -1)],
                "le": [b.plus(a, -1)], "lt": [b.plus(a, -1).plus(one, -1)],
                "eq": [a.plus(b, -1), b.plus(a, -1)]}[kind]
        return Conj(tuple(cons))
    return rule


def _and(it, n):
    a, b = it.value(n.args[0]), it.value(n.args[1])
    if isinstance(a, Conj) and isinstance(b, Conj):
        return Conj(a.constraints + b.constraints, a.opaque + b.opaque)
    return None


def _negate(a) -> Conj | None:
    """not (e >= 0)  <=>  -e - 1 >= 0, for a single constraint."""
    if isinstance(a, Conj) and len(a.constraints) == 1 and not a.opaque:
        return Conj((a.constraints[0].times(-1).plus(Affine.make({}, 1), -1),))
    return None


def _not(it, n):
    return _negate(it.value(n.args[0]))


def _full(it, n):
    fill = n.attrs.get("fill_value", n.args[1] if len(n.args) > 1 else None)
    if n.results[0].type.dtype == torch.bool and fill is True:
        return Conj()
    return _float_literal(fill)           # a constant, whatever its shape


def _ones(it, n):
    return Conj() if n.results[0].type.dtype == torch.bool else None


def _scalar_tensor(it, n):
    return _float_literal(n.args[0])


def _cast(it, n):
    x = it.value(n.args[0])
    src, dst = n.args[0].type, n.results[0].type
    if isinstance(x, Conj) and dst.dtype == torch.bool:
        return x
    if isinstance(x, Affine) and not dst.dtype.is_floating_point and dst.dtype != torch.bool:
        return x
    if isinstance(x, float) or (isinstance(x, Affine) and src.rank == 0):
        return x
    return None


def _index(it, n):
    """x[i0, i1, ...] with tensor indices: reading an input along one axis at positions
    that are indices of the result."""
    x, idx = it.value(n.args[0]), n.args[1]
    shape = _shape(n.args[0])
    if not isinstance(x, Affine) or shape is None or not isinstance(idx, list):
        return None
    reads = {}
    for axis, i in enumerate(idx):
        k = axis - len(shape)
        val = it.value(i) if i is not None else None
        if i is None or not isinstance(val, Affine):
            return None
        if shape[k] == 1:
            if val.coeffs or val.const != 0:
                return None
            continue                      # reading a unit axis at 0
        if val.const != 0 or len(val.coeffs) != 1 or val.coeffs[0][1] != 1:
            return None
        reads[k] = val.coeffs[0][0]
    if len(idx) != len(shape):
        return None

    def fn(atom):
        ax = atom[1] if atom[0] == "axis" else atom[2]
        target = reads.get(ax)
        if target is None or target[0] != "axis":
            raise _Unknown
        if atom[0] == "axis":
            return Affine.make({target: 1}, 0)
        return Affine.make({("at", atom[1], target[1]): 1}, 0)
    return _map_or_none(x, fn)


def _number(x) -> float | None:
    if isinstance(x, float):
        return x
    if isinstance(x, Affine) and not x.coeffs and x.const.is_number:
        return float(x.const)
    return None


def _where(it, n):
    """where(mask, 0, -inf): the additive form (HF's eager masks use the dtype's lowest
    value instead of -inf; after softmax the two agree for any row that sees a key)."""
    c, a, b = it.value(n.args[0]), _number(it.value(n.args[1])), _number(it.value(n.args[2]))
    dtype = n.results[0].type.dtype
    if not dtype.is_floating_point:
        return None

    def lowest(x):
        return x is not None and (x == float("-inf") or x <= torch.finfo(dtype).min)
    if isinstance(c, Conj) and a == 0.0 and lowest(b):
        return Additive(c)
    if lowest(a) and b == 0.0 and _negate(c) is not None:    # triu(full(-inf), 1)
        return Additive(_negate(c))
    return None


def _identity(it, n):
    x = it.value(n.args[0])
    return x if isinstance(x, (Affine, Conj, Additive, float)) else None


_TRANSFER = {
    "aten.arange": _arange, "aten.unsqueeze": _unsqueeze,
    "aten.expand": _same_axes, "aten.view": _same_axes, "aten.reshape": _same_axes,
    "aten._unsafe_view": _same_axes, "aten.slice": _slice,
    "aten.add": _arith(1), "aten.sub": _arith(-1), "aten.mul": _mul, "aten.neg": _neg,
    "aten.ge": _compare("ge"), "aten.gt": _compare("gt"), "aten.le": _compare("le"),
    "aten.lt": _compare("lt"), "aten.eq": _compare("eq"),
    "aten.bitwise_and": _and, "aten.logical_and": _and, "aten.mul.bool": _and,
    "aten.bitwise_not": _not, "aten.logical_not": _not,
    "aten.full": _full, "aten.ones": _ones, "aten.scalar_tensor": _scalar_tensor,
    "aten._to_copy": _cast, "prims.convert_element_type": _cast,
    "aten.index": _index, "aten.where": _where,
    "aten.clone": _identity, "aten.alias": _identity, "aten.lift_fresh_copy": _identity,
}


# -- reading a mask in attention's coordinates ---------------------------------------------

def mask_form(mask: Value | None, sq, skv) -> MaskForm | None:
    """`mask` (bool or additive, broadcast to [..., Sq, Skv]) as causal and window terms, or
    None when it is not such a mask. Its constraints must compare either indices (query i
    on axis -2 with key j on axis -1) or the elements at i and j of one 1-D integer input
    (`positions`); terms of anything else come back as `opaque`."""
    if not isinstance(mask, Value):
        return None
    m = _Interp().value(mask)
    if isinstance(m, Additive):
        m = m.where
    if not isinstance(m, Conj):
        return None
    diag = sympy.sympify(skv - sq)
    causal, window, spaces = False, None, set()
    for c in m.constraints:
        t = c.terms()
        if not t:
            if c.const.is_nonnegative:
                continue                   # always true
            return None
        if {a[0] for a in t} == {"axis"}:
            qi, kj, offset, space = ("axis", -2), ("axis", -1), diag, None
        elif {a[0] for a in t} == {"at"} and len({a[1] for a in t}) == 1:
            src = next(iter(t))[1]
            qi, kj, offset, space = ("at", src, -2), ("at", src, -1), 0, src
        else:
            return None
        spaces.add(space)
        if set(t) != {qi, kj} or len(spaces) > 1:
            return None
        if t[qi] == 1 and t[kj] == -1:        # j <= i + const: causal on the diagonal
            if sympy.simplify(c.const - offset) != 0:
                return None
            causal = True
        elif t[qi] == -1 and t[kj] == 1:      # p_i - j <= const + offset: a window
            w = sympy.simplify(c.const + offset + 1)
            if not (w.is_integer and w.is_positive):
                return None
            window = int(w) if window is None else min(window, int(w))
        else:
            return None
    if not causal and window is None:
        return None
    return MaskForm(causal, window, next(iter(spaces)), tuple(dict.fromkeys(m.opaque)))
