"""The Python front end: `PatternBuilder` builds a `Pattern` in Python code instead of a
`.kiln` rule; it ends in the same matcher and rewriter."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from .objects import AttrPat, Const, Constraint, ListPat, Lit, Match, Pattern, Stmt, Var

if TYPE_CHECKING:
    from .rewriter import ReplaceBuilder


class PatternBuilder:
    """Builds a `Pattern` in Python, for code that generates patterns:

        p = PatternBuilder("silu_mul")
        g, u = p.inputs("gate", "up")
        s = p.op("aten.sigmoid", g)
        a = p.op("aten.mul", g, s)
        out = p.op("aten.mul", a, u)
        p.where(lambda m: m["gate"].type == m["up"].type, "same type")
        p.replace(lambda m, b: b.op("kiln.silu_mul", m["gate"], m["up"]))
        pattern = p.build(out)

    `p.op(...)` returns the Var naming the statement's result (a list for several), to use
    as an operand. Keyword arguments are attributes; a value wrapped in `p.default(pat,
    literal)` is optional with that default. `optional=True` makes the statement
    optional (its first argument stands for it when absent); `shared=True` lets it have
    outside users; `any_attrs=True` is the `...` of the rule language."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.params: list[str] = []
        self.stmts: list[Stmt] = []
        self.constraints: list[Constraint] = []
        self._replace = None
        self._n = 0

    def inputs(self, *names: str):
        return self._params("%", Var, names)

    def const(self, *names: str):
        return self._params("$", Const, names)

    def _params(self, sigil: str, kind, names) -> Any:
        self.params += [sigil + n for n in names]
        out = [kind(n) for n in names]
        return out[0] if len(out) == 1 else out

    @staticmethod
    def default(pat, value) -> AttrPat:
        return AttrPat(_as_pat(pat), value)

    def op(self, op: str, *args, results: int | Sequence[str] = 1, name: str | None = None,
           optional: bool = False, shared: bool = False, any_attrs: bool = False, **attrs):
        if isinstance(results, int):
            names = []
            for k in range(results):
                self._n += 1
                names.append(f"{name or 'v'}{self._n}" if results > 1 or not name else name)
        else:
            names = list(results)
        pargs = [_as_pat(a) for a in args]
        pattrs = {k: (a if isinstance(a, AttrPat) else AttrPat(_as_pat(a))) for k, a in attrs.items()}
        s = Stmt(names, op, pargs, pattrs, any_attrs, pargs[0] if optional else None, shared)
        self.stmts.append(s)
        vs = [Var(n) for n in names]
        return vs[0] if len(vs) == 1 else vs

    def cast(self, x, optional: bool = True, name: str | None = None):
        return self.op("cast", x, optional=optional, name=name)

    def where(self, fn: Callable[[Match], Any], text: str | None = None,
              guard: Var | None = None) -> None:
        g = None
        if guard is not None:
            g = next(i for i, s in enumerate(self.stmts) if guard.name in s.results)
        self.constraints.append(Constraint(fn, text or getattr(fn, "__name__", "<python>"), g))

    def replace(self, fn: Callable[[Match, ReplaceBuilder], Any]) -> None:
        self._replace = fn

    def build(self, *yields) -> Pattern:
        p = Pattern(self.name, self.params, self.stmts, [y.name for y in yields],
                    self.constraints, self._replace, self.doc, file="<python>")
        p.check()
        return p


def _as_pat(a):
    if isinstance(a, (Var, Const, Lit, ListPat, AttrPat)):
        return a
    if isinstance(a, (list, tuple)):
        return ListPat(tuple(_as_pat(x) for x in a))
    return Lit(a)
