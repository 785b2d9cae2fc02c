"""The objects a pattern is made of: what both front ends build and the matcher reads.

A `Pattern` is a small dataflow graph of statements (`Stmt`) whose operands are pattern
variables: `%x` names a value (a graph input or an intermediate produced outside the
match), `$c` names a constant (a literal in a positional or attribute slot), and each
statement's results name the values it produces. `yields` are the values the match
hands to the replacement; everything else the match covers is *interior* and is removed
when the rewrite happens.

A `Match` binds a pattern's names to graph values and literals, and carries the
`RuleContext` it was found in (the graph's users and outputs, the compile options) for
functions that need more than the values (`is_lm_head(%y)`, `quant_dtype()`).
`KilnRuleError` is a bad rule, from either front end, the matcher or the rewriter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kiln.ir import Graph, Node, Value
from kiln.ir.ops import get_op, is_opaque
from kiln.ir.printer import format_literal

from .op_classes import CAST_OPS

if TYPE_CHECKING:
    from .rewriter import ReplaceBuilder


class KilnRuleError(ValueError):
    """A bad rule: a syntax error, an unknown op, a replacement of the wrong type, or (when
    asked to) a rule that matches nothing. Names the rule and, when known, file:line:column."""

    def __init__(self, message: str, rule: str | None = None, file: str | None = None,
                 line: int | None = None, column: int | None = None,
                 source: str | None = None):
        self.rule, self.file, self.line, self.column = rule, file, line, column
        where = ""
        if file or line is not None:
            where = f"{file or '<rules>'}:{line if line is not None else '?'}"
            where += f":{column}" if column is not None else ""
            where += ": "
        who = f"rule {rule}: " if rule else ""
        text = where + who + message
        if source is not None and line is not None:
            lines = source.splitlines()
            if 0 < line <= len(lines):
                text += f"\n  {lines[line - 1]}"
                if column is not None:
                    text += f"\n  {' ' * max(column - 1, 0)}^"
        self.bare = message
        super().__init__(text)


# ---------------------------------------------------------------- pattern objects

MISSING = object()


@dataclass(frozen=True)
class Var:
    """`%name`: a value. `%_` matches any value without binding it."""
    name: str

    def __str__(self):
        return "%" + self.name


@dataclass(frozen=True)
class Const:
    """`$name`: a literal (number, bool, dtype, list, none). `$_` matches any literal."""
    name: str

    def __str__(self):
        return "$" + self.name


@dataclass(frozen=True)
class Lit:
    value: Any

    def __str__(self):
        return format_literal(self.value, {})


@dataclass(frozen=True)
class ListPat:
    items: tuple

    def __str__(self):
        return "[" + ", ".join(str(i) for i in self.items) + "]"


@dataclass(frozen=True)
class AttrPat:
    pat: Any
    default: Any = MISSING    # a literal, used when the node lacks the attribute

    def __str__(self):
        d = "" if self.default is MISSING else f" default {format_literal(self.default, {})}"
        return f"{self.pat}{d}"


@dataclass
class Stmt:
    results: list[str]              # value names; "_" for results the pattern ignores
    op: str                         # an op name, or "cast" (any dtype-only cast)
    args: list = field(default_factory=list)
    attrs: dict[str, AttrPat] = field(default_factory=dict)
    any_attrs: bool = False         # `...`: other attributes may be present
    passthrough: Any = None         # optional statement: matches this instead when absent
    shared: bool = False            # may have outside users; matched but never removed
    line: int | None = None
    column: int | None = None

    @property
    def optional(self) -> bool:
        return self.passthrough is not None

    def __str__(self):
        args = [str(a) for a in self.args] + [f"{k}={a}" for k, a in self.attrs.items()]
        if self.any_attrs:
            args.append("...")
        res = ", ".join("%" + r for r in self.results)
        op = self.op + ("?" if self.optional else "")
        return f"{'shared ' if self.shared else ''}{res} = {op}({', '.join(args)})"


@dataclass
class Constraint:
    """A `where` condition: `fn(match) -> bool`. `guard`: the index of an optional
    statement; the condition is only checked when that statement matched a node."""
    fn: Callable[["Match"], Any]
    text: str
    guard: int | None = None
    line: int | None = None


@dataclass
class Pattern:
    name: str
    params: list[str]                     # "%x" / "$c", in declaration order
    stmts: list[Stmt]
    yields: list[str]                     # value names
    constraints: list[Constraint] = field(default_factory=list)
    # replace(match, builder) -> list of new Values (one per yield)
    replace: Callable[["Match", "ReplaceBuilder"], list] | None = None
    doc: str = ""
    file: str | None = None
    line: int | None = None
    source: str | None = None             # the rule's text (for messages)

    def __post_init__(self):
        self.producer: dict[str, tuple[int, int]] = {}
        for i, s in enumerate(self.stmts):
            for j, r in enumerate(s.results):
                if r != "_":
                    self.producer[r] = (i, j)

    def error(self, message: str, line: int | None = None, column: int | None = None):
        return KilnRuleError(message, self.name, self.file, line if line is not None else self.line,
                             column)

    def check(self) -> None:
        """Structural checks shared by both front ends."""
        if not self.yields:
            raise self.error("the match yields nothing")
        for y in self.yields:
            if y not in self.producer:
                raise self.error(f"yield %{y} is not a result of a match statement")
        seen = self.reachable(self.yields[0])
        for i, s in enumerate(self.stmts):
            if i not in seen:
                raise self.error(f"statement `{s}` is not reachable from the first yielded "
                                 f"value %{self.yields[0]}; the matcher walks operands "
                                 f"backwards from it", s.line, s.column)
        for i, s in enumerate(self.stmts):
            if s.op == "cast":
                continue
            if s.optional and not s.args:
                raise self.error(f"optional `{s.op}?` needs a first argument to stand for "
                                 f"it when absent", s.line, s.column)
            if is_opaque(s.op):   # no operand schema; its library may not be imported yet
                continue
            op = get_op(s.op)
            if op.operands is not None and len(s.args) != len(op.operands):
                raise self.error(f"{s.op} takes {len(op.operands)} operands "
                                 f"({', '.join(op.operands)}), the pattern gives {len(s.args)}",
                                 s.line, s.column)

    def reachable(self, name: str) -> set[int]:
        seen: set[int] = set()
        todo = [name]
        while todo:
            n = todo.pop()
            if n not in self.producer:
                continue
            i = self.producer[n][0]
            if i in seen:
                continue
            seen.add(i)
            s = self.stmts[i]
            for a in list(s.args) + [p.pat for p in s.attrs.values()] + (
                    [s.passthrough] if s.passthrough is not None else []):
                todo.extend(_var_names(a))
        return seen

    def anchor_ops(self) -> set[str] | None:
        """Ops a graph node must have to be the producer of the first yield (None: any)."""
        return self._ops_of(self.yields[0], set())

    def _ops_of(self, name, seen) -> set[str] | None:
        if name not in self.producer or name in seen:
            return None
        seen.add(name)
        s = self.stmts[self.producer[name][0]]
        ops = set(CAST_OPS) if s.op == "cast" else {s.op}
        if s.optional:
            names = list(_var_names(s.passthrough))
            if not isinstance(s.passthrough, Var) or len(names) != 1:
                return None
            more = self._ops_of(names[0], seen)
            if more is None:
                return None
            ops |= more
        return ops

    def __str__(self):
        lines = [f"rule {self.name} {{", f"  match ({', '.join(self.params)}) {{"]
        lines += [f"    {s}" for s in self.stmts]
        lines.append(f"    yield {', '.join('%' + y for y in self.yields)}")
        lines.append("  }")
        for c in self.constraints:
            lines.append(f"  where {c.text}")
        lines.append("}")
        return "\n".join(lines)


def _var_names(a) -> Iterator[str]:
    if isinstance(a, Var):
        if a.name != "_":
            yield a.name
    elif isinstance(a, ListPat):
        for x in a.items:
            yield from _var_names(x)
    elif isinstance(a, AttrPat):
        yield from _var_names(a.pat)


# ---------------------------------------------------------------- the match

@dataclass
class RuleContext:
    """What a match is evaluated in, beyond its values: the graph, each value's user nodes
    and the graph outputs (kept current by the rewriter across one pass), the compile
    options, and a per-pass `cache` for functions that derive something from the whole
    graph once."""
    graph: Graph
    users: dict
    outputs: set
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


class Match:
    """A successful match: bindings of the pattern's names to graph values and literals,
    and the graph node each matched statement covers."""

    def __init__(self, pattern: Pattern, graph: Graph, values: dict, nodes: dict,
                 context: RuleContext | None = None):
        self.pattern = pattern
        self.graph = graph
        self.values = values          # "%x" / "$c" -> Value | literal | None
        self.nodes = nodes            # stmt index -> Node (absent optionals: not present)
        self.context = context

    def __getitem__(self, name: str):
        if name[0] not in "%$":
            name = "%" + name if "%" + name in self.values else "$" + name
        return self.values.get(name)

    def get(self, name: str, default=None):
        v = self[name]
        return default if v is None else v

    def present(self, name: str) -> bool:
        """Whether the statement producing `name` matched a node (False for an absent
        optional statement)."""
        name = name.lstrip("%")
        i = self.pattern.producer.get(name, (None,))[0]
        return i is not None and i in self.nodes

    def node(self, name: str) -> Node | None:
        i = self.pattern.producer.get(name.lstrip("%"), (None,))[0]
        return self.nodes.get(i)

    def matched_nodes(self) -> list[Node]:
        out, seen = [], set()
        for n in self.nodes.values():
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
        return out

    def removed_nodes(self) -> list[Node]:
        """The nodes the rewrite removes: matched ones that are not shared, plus nodes
        outside the match that only feed them (e.g. `sym.size` of an interior value)."""
        shared = {id(self.nodes[i]) for i, s in enumerate(self.pattern.stmts)
                  if s.shared and i in self.nodes}
        return [n for n in self.matched_nodes() if id(n) not in shared] + self.dead

    dead: list = []   # set by the matcher's interior check

    def yielded(self) -> list[Value]:
        return [self.values["%" + y] for y in self.pattern.yields]
