"""IR types: dtypes, symbolic dims, tensor and symbolic-integer types.

A dim is an int or a sympy expression over named symbols (`s0`, `s1`, ...). Symbols carry
dynamic batch/sequence sizes; their ranges live on the Graph (`where s0 in [1, 8192]`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import sympy
import torch
from torch.utils._sympy.functions import FloorDiv, Mod

# Short dtype names used in IR text, declared once; everything else derives from this table.
DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
    "f8e4m3fn": torch.float8_e4m3fn, "f8e4m3fnuz": torch.float8_e4m3fnuz,
    "f8e5m2": torch.float8_e5m2,
    "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
    "u8": torch.uint8, "bool": torch.bool, "c64": torch.complex64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

Dim = Union[int, sympy.Expr]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"kiln IR has no name for dtype {dtype}; add it to kiln.ir.types.DTYPES") from None


def make_dim(d) -> Dim:
    """Normalise an int, a sympy expression or a torch SymInt's expression to a Dim."""
    if isinstance(d, bool):
        raise TypeError(f"a dim must be an int or a symbolic expression, got {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Integer):
        return int(d)
    if isinstance(d, sympy.Expr):
        return int(d) if d.is_Integer else d
    raise TypeError(f"a dim must be an int or a symbolic expression, got {d!r}")


def dim_symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else {s.name for s in d.free_symbols}


# ---- printing dims: canonical, so that parse(print(x)) prints identically ----

def format_dim(d: Dim) -> str:
    if isinstance(d, int):
        return str(d)
    return _fmt(d)


def _fmt(e: sympy.Expr) -> str:
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, sympy.Add):
        terms = e.as_ordered_terms()
        out = _fmt_term(terms[0])
        for t in terms[1:]:
            coeff, rest = t.as_coeff_Mul()
            if coeff.is_negative:
                out += " - " + _fmt_term(-t)
            else:
                out += " + " + _fmt_term(t)
        return out
    if isinstance(e, sympy.Mul):
        return _fmt_term(e)
    if isinstance(e, FloorDiv):
        return f"floordiv({_fmt(e.args[0])}, {_fmt(e.args[1])})"
    if isinstance(e, Mod):
        return f"mod({_fmt(e.args[0])}, {_fmt(e.args[1])})"
    if isinstance(e, sympy.Max):
        return "max(" + ", ".join(_fmt(a) for a in _sorted_args(e)) + ")"
    if isinstance(e, sympy.Min):
        return "min(" + ", ".join(_fmt(a) for a in _sorted_args(e)) + ")"
    raise TypeError(f"kiln IR cannot express the symbolic size {e} ({type(e).__name__}); "
                    f"supported: + - * floordiv mod max min over integers and symbols")


def _sorted_args(e):
    return sorted(e.args, key=sympy.default_sort_key)


def _fmt_term(t: sympy.Expr) -> str:
    if isinstance(t, sympy.Mul):
        coeff, rest = t.as_coeff_Mul()
        factors = [_fmt_atom(f) for f in sympy.Mul.make_args(rest)]
        if coeff == 1:
            return "*".join(factors)
        if coeff == -1:
            return "-" + "*".join(factors)
        return "*".join([str(int(coeff)) if coeff.is_Integer else str(coeff)] + factors)
    return _fmt_atom(t)


def _fmt_atom(a: sympy.Expr) -> str:
    s = _fmt(a)
    return f"({s})" if isinstance(a, sympy.Add) else s


def dim_from_ast(tree) -> Dim:
    """Builds a Dim from the parser's nested tuples: ("int", n), ("sym", name), (op, a, b)."""
    return make_dim(_build(tree))


def _build(t):
    kind = t[0]
    if kind == "int":
        return sympy.Integer(t[1])
    if kind == "sym":
        return sympy.Symbol(t[1], integer=True, positive=True)
    if kind == "neg":
        return -_build(t[1])
    a, b = _build(t[1]), _build(t[2]) if len(t) > 2 else None
    if kind == "add":
        return a + b
    if kind == "sub":
        return a - b
    if kind == "mul":
        return a * b
    if kind == "floordiv":
        return FloorDiv(a, b)
    if kind == "mod":
        return Mod(a, b)
    if kind == "max":
        return sympy.Max(*[_build(x) for x in t[1:]])
    if kind == "min":
        return sympy.Min(*[_build(x) for x in t[1:]])
    raise ValueError(f"unknown dim expression {kind}")


def sym(name: str) -> sympy.Symbol:
    """The symbol `name` as the IR creates it (positive integer)."""
    return sympy.Symbol(name, integer=True, positive=True)


# ---- types ----

@dataclass(frozen=True)
class TensorType:
    dtype: torch.dtype
    shape: tuple[Dim, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(make_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            out |= dim_symbols(d)
        return out

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{', '.join(format_dim(d) for d in self.shape)}]"


@dataclass(frozen=True)
class SymIntType:
    """A symbolic integer (a dynamic size) whose value equals `expr`."""
    expr: Dim

    def __post_init__(self):
        object.__setattr__(self, "expr", make_dim(self.expr))

    def symbols(self) -> set[str]:
        return dim_symbols(self.expr)

    def __str__(self) -> str:
        return f"sym({format_dim(self.expr)})"


@dataclass(frozen=True)
class ScalarType:
    """A Python scalar computed at run time (e.g. a float from a symbolic expression)."""
    kind: str  # "int", "float" or "bool"

    def symbols(self) -> set[str]:
        return set()

    def __str__(self) -> str:
        return f"scalar({self.kind})"


Type = Union[TensorType, SymIntType, ScalarType]
