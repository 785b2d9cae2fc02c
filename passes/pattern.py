"""Patterns over kiln graphs: the objects rules compile to, the matcher, and the rewriter.

A `Pattern` is a small dataflow graph of statements (`Stmt`) whose operands are pattern
variables: `%x` names a value (a graph input or an intermediate produced outside the
match), `$c` names a constant (a literal in a positional or attribute slot), and each
statement's results name the values it produces. `yields` are the values the match
hands to the replacement; everything else the match covers is *interior* and is removed
when the rewrite happens.

Both front ends build the same objects: `.kiln` rule files (`kiln.passes.rules`) and the
Python `PatternBuilder` below, for the few fusions a rule cannot say (MoE). Both end in
`Matcher` and `rewrite`, so they share every semantic:

- Op names match exactly; ops with the `commutative` trait also match with their two
  positional operands swapped.
- Positional operands match by position and count. Named attributes match by name; an
  attribute the pattern does not mention must be absent from the node (the frontends drop
  attributes that equal the schema default), unless the statement ends with `...`. A
  pattern attribute `name=P default D` matches a node without that attribute as if it
  carried D.
- `cast(%x)` matches a dtype-only cast (`kiln.ir.ops.is_dtype_cast`: an op with the `cast`
  trait and at most dtype/layout/device/memory_format); `cast?(%x)` also matches `%x`
  itself. Generally `op?(...)` is optional: it matches the op, or, if that fails, its
  passthrough operand (`Stmt.passthrough`: the one value operand, or the one the rule's
  `else` names); pattern variables used only inside it are then bound to none.
- Interior values (results of matched statements that are not yielded) may only be used
  inside the match; a yielded value may have any number of outside uses. A statement
  marked `shared` may have outside users: it is matched but never removed (dead ones go
  with the DCE at the end of the pass).
- `where` constraints are evaluated on the bound match (see `Expr`); constraints that
  came from an optional part are only checked when that part is present.
- The replacement is type-checked before the graph is touched: each new yielded value
  must have exactly the type of the value it replaces, else `KilnRuleError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import sympy
import torch

from kiln.ir import Graph, Node, ScalarType, SymIntType, TensorType, Value
from kiln.ir.graph import walk_values
from kiln.ir.ops import cast_ops, get_op, infer_types, is_dtype_cast, written_values
from kiln.ir.printer import format_literal, value_names
from kiln.ir.types import DTYPES, dtype_name

__all__ = ["KilnRuleError", "Var", "Const", "Lit", "ListPat", "AttrPat", "Stmt", "Constraint",
           "Pattern", "Match", "Matcher", "PatternBuilder", "ReplaceBuilder", "rewrite",
           "apply_patterns", "CAST_OPS"]


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
            op = get_op(s.op)
            if s.optional and not s.args:
                raise self.error(f"optional `{s.op}?` needs a first argument to stand for "
                                 f"it when absent", s.line, s.column)
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


# ---------------------------------------------------------------- casts

CAST_OPS = cast_ops()


def match_linear(n: Node) -> tuple[Value, Value, object] | None:
    """(x, W, bias) of a linear layer as captured: `mm(x, permute(W, [1, 0]))` or
    `addmm(bias, x, permute(W, [1, 0]))` with W a rank-2 [N, K] tensor; else None."""
    if n.op == "aten.mm" and len(n.args) == 2:
        bias, (x, wt) = None, n.args
    elif n.op == "aten.addmm" and len(n.args) == 3:
        bias, x, wt = n.args
    else:
        return None
    if set(n.attrs) - {"beta", "alpha"} or any(a != 1 for a in n.attrs.values()):
        return None
    if not isinstance(x, Value) or not isinstance(wt, Value) or wt.producer is None:
        return None
    p = wt.producer
    if p.op != "aten.permute" or list(p.attrs.get("dims", [])) != [1, 0]:
        return None
    w = p.args[0]
    if not isinstance(w, Value) or not isinstance(w.type, TensorType) or w.type.rank != 2:
        return None
    return x, w, bias


ROUTER_USERS = {"aten._softmax", "aten.topk", "aten._log_softmax"}


def feeds_router(v: Value, users: dict) -> bool:
    """True when `v` (a linear's output) reaches softmax / top-k within a few views or
    casts: an MoE router, whose pattern fuse.moe matches and which stays full precision."""
    todo = [v]
    for _ in range(4):
        nxt = []
        for x in todo:
            for u in users.get(x, []):
                if u.op in ROUTER_USERS:
                    return True
                if is_cast(u) or get_op(u.op).has("view"):
                    nxt.extend(u.results)
        todo = nxt
    return False


def is_cast(n: Node) -> bool:
    """A dtype cast, as `cast(%x)` in a rule matches it (kiln.ir.ops.is_dtype_cast)."""
    return is_dtype_cast(n)


# ---------------------------------------------------------------- the match

class Match:
    """A successful match: bindings of the pattern's names to graph values and literals,
    and the graph node each matched statement covers."""

    def __init__(self, pattern: Pattern, graph: Graph, values: dict, nodes: dict):
        self.pattern = pattern
        self.graph = graph
        self.values = values          # "%x" / "$c" -> Value | literal | None
        self.nodes = nodes            # stmt index -> Node (absent optionals: not present)

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


# ---------------------------------------------------------------- the matcher

_PASS = "passthrough"


def lit_equal(a, b) -> bool:
    if isinstance(a, Value) or isinstance(b, Value):
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(lit_equal(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and a == b
    except Exception:  # noqa: BLE001
        return False


class _State:
    __slots__ = ("values", "nodes")

    def __init__(self, values, nodes):
        self.values = values
        self.nodes = nodes

    def bind(self, name, value) -> "_State":
        v = dict(self.values)
        v[name] = value
        return _State(v, self.nodes)

    def bind_stmt(self, i, node, names_values) -> "_State":
        v = dict(self.values)
        v.update(names_values)
        n = dict(self.nodes)
        n[i] = node
        return _State(v, n)


class Matcher:
    """Finds matches of one pattern in one graph. `users` maps each value to its user
    nodes; the caller keeps it current across rewrites."""

    MAX_STATES = 2000   # alternatives tried per anchor before giving up on it

    def __init__(self, pattern: Pattern, graph: Graph, users: dict[Value, list[Node]],
                 outputs: set[Value] | None = None):
        self.p = pattern
        self.g = graph
        self.users = users
        self.outputs = outputs if outputs is not None else set(graph.outputs)
        self.best: tuple[int, str] | None = None   # (statements matched, why it stopped)
        self.rejections: list[str] = []            # full matches refused by checks
        self.truncated: list[str] = []             # anchors left after MAX_STATES alternatives

    # -- diagnostics
    def _fail(self, st: _State, why: str) -> None:
        depth = len(st.nodes)
        if self.best is None or depth > self.best[0]:
            self.best = (depth, why)

    def _name(self, v) -> str:
        if not isinstance(v, Value):
            return format_literal(v, {}) if not isinstance(v, list) else str(v)
        if v.name:
            return "%" + v.name
        names = getattr(self, "_names", None)
        if names is None:
            names = self._names = value_names(self.g)
        return "%" + names.get(v, "?")

    # -- structural matching
    def match_value(self, ref, gv, st: _State) -> Iterator[_State]:
        if isinstance(ref, Var):
            if ref.name == "_":
                if isinstance(gv, Value):
                    yield st
                else:
                    self._fail(st, f"%_ expects a value, the graph has {self._name(gv)}")
                return
            key = "%" + ref.name
            if key in st.values:
                if st.values[key] is gv:
                    yield st
                else:
                    self._fail(st, f"%{ref.name} is bound to {self._name(st.values[key])} "
                                   f"but is used here with {self._name(gv)}")
                return
            if ref.name in self.p.producer:
                yield from self.match_stmt(*self.p.producer[ref.name], gv, st)
                return
            if not isinstance(gv, Value) and gv is not None:
                # (none in an optional tensor slot binds: the variable is then none)
                self._fail(st, f"%{ref.name} expects a value, the graph has the literal "
                               f"{self._name(gv)}")
                return
            yield st.bind(key, gv)
        elif isinstance(ref, Const):
            if isinstance(gv, Value):
                self._fail(st, f"${ref.name} expects a literal, the graph has the value "
                               f"{self._name(gv)}")
                return
            if ref.name == "_":
                yield st
                return
            key = "$" + ref.name
            if key in st.values:
                if lit_equal(st.values[key], gv):
                    yield st
                else:
                    self._fail(st, f"${ref.name} is {st.values[key]!r} but here {gv!r}")
                return
            yield st.bind(key, gv)
        elif isinstance(ref, Lit):
            if lit_equal(ref.value, gv):
                yield st
            else:
                self._fail(st, f"expected the literal {ref}, the graph has {self._name(gv)}")
        elif isinstance(ref, ListPat):
            if not isinstance(gv, (list, tuple)) or len(gv) != len(ref.items):
                self._fail(st, f"expected a list of {len(ref.items)}, the graph has "
                               f"{self._name(gv)}")
                return
            yield from self.match_all(list(zip(ref.items, gv)), st)
        else:
            raise TypeError(f"bad pattern element {ref!r}")

    def match_all(self, pairs: list, st: _State) -> Iterator[_State]:
        if not pairs:
            yield st
            return
        (ref, gv), rest = pairs[0], pairs[1:]
        for st2 in self.match_value(ref, gv, st):
            yield from self.match_all(rest, st2)

    def match_stmt(self, i: int, r: int, gv, st: _State) -> Iterator[_State]:
        s = self.p.stmts[i]
        if s.optional:
            # a missing optional op is not a failure worth reporting
            best = self.best
            yield from self._match_node(i, s, r, gv, st)
            if self.best is not best and self.best is not None and self.best[0] == len(st.nodes):
                self.best = best
        else:
            yield from self._match_node(i, s, r, gv, st)
        if s.optional and i not in st.nodes:
            # absent: the statement's value is its first argument
            names = {"%" + s.results[0]: gv} if s.results[0] != "_" else {}
            yield from self.match_value(s.passthrough, gv, _State({**st.values, **names}, st.nodes))

    def _match_node(self, i: int, s: Stmt, r: int, gv, st: _State) -> Iterator[_State]:
        if not isinstance(gv, Value) or gv.producer is None:
            self._fail(st, f"`{s}` (line {s.line}): {self._name(gv)} is "
                           f"{'a graph input' if isinstance(gv, Value) else 'a literal'}")
            return
        node = gv.producer
        if s.op == "cast":
            if not is_cast(node):
                self._fail(st, f"`{s}` (line {s.line}): {self._name(gv)} comes from "
                               f"{node.op}, not a dtype cast")
                return
        elif node.op != s.op:
            self._fail(st, f"`{s}` (line {s.line}): {self._name(gv)} comes from {node.op}")
            return
        if gv.index != r or len(node.results) != len(s.results):
            self._fail(st, f"`{s}` (line {s.line}): {node.op} has {len(node.results)} "
                           f"results, the pattern {len(s.results)}")
            return
        if s.op == "cast":
            attrs_ok = True
            pos = [(s.args[0], node.args[0])]
            attr_pairs = [(a.pat, node.attrs.get(k, a.default)) for k, a in s.attrs.items()]
            if any(v is MISSING for _, v in attr_pairs):
                attrs_ok = False
        else:
            if len(node.args) != len(s.args):
                self._fail(st, f"`{s}` (line {s.line}): {node.op} has {len(node.args)} "
                               f"positional operands, the pattern {len(s.args)}")
                return
            extra = set(node.attrs) - set(s.attrs)
            if extra and not s.any_attrs:
                self._fail(st, f"`{s}` (line {s.line}): the node also has "
                               f"{', '.join(sorted(extra))} (add them, or `...`)")
                return
            attr_pairs = []
            attrs_ok = True
            for k, a in s.attrs.items():
                if k in node.attrs:
                    attr_pairs.append((a.pat, node.attrs[k]))
                elif a.default is not MISSING:
                    attr_pairs.append((a.pat, a.default))
                else:
                    attrs_ok = False
                    self._fail(st, f"`{s}` (line {s.line}): the node has no attribute {k}")
                    break
            pos = list(zip(s.args, node.args))
        if not attrs_ok:
            return
        # bind the statement before its operands: shared sub-patterns see it bound
        names = {"%" + n: v for n, v in zip(s.results, node.results) if n != "_"}
        for key, v in names.items():
            if key in st.values and st.values[key] is not v:
                self._fail(st, f"`{s}`: {key} already bound elsewhere")
                return
        st = st.bind_stmt(i, node, names)
        orders = [pos]
        if s.op != "cast" and len(pos) == 2 and get_op(node.op).has("commutative"):
            orders.append([(pos[0][0], pos[1][1]), (pos[1][0], pos[0][1])])
        attr_pairs = [(p, _none_ok(v)) for p, v in attr_pairs]
        for order in orders:
            yield from self.match_all(order + attr_pairs, st)

    # -- whole matches
    def matches_at(self, node: Node) -> Iterator[Match]:
        anchor = self.p.yields[0]
        tried = 0
        for gv in node.results:
            for st in self.match_value(Var(anchor), gv, _State({}, {})):
                tried += 1
                if tried > self.MAX_STATES:
                    self.truncated.append(self._name(gv))
                    return
                m = self._finish(st)
                if m is not None:
                    yield m

    def _finish(self, st: _State) -> Match | None:
        values = dict(st.values)
        for p in self.p.params:
            values.setdefault(p, None)
        for s in self.p.stmts:
            for r in s.results:
                if r != "_":
                    values.setdefault("%" + r, None)
        for y in self.p.yields:
            if not isinstance(values.get("%" + y), Value):
                self._reject(f"yield %{y} is not bound to a value")
                return None
        m = Match(self.p, self.g, values, dict(st.nodes))
        for c in self.p.constraints:
            if c.guard is not None and c.guard not in m.nodes:
                continue
            try:
                ok = c.fn(m)
            except KilnRuleError:
                raise
            except Exception as e:  # noqa: BLE001 - any error is the rule's, and says so
                anchor = m.values.get("%" + self.p.yields[0])
                raise self.p.error(f"`where {c.text}` raised {type(e).__name__}: {e} (matching "
                                   f"{self._name(anchor)} in @{self.g.name}); a condition must "
                                   f"hold or fail, not raise: guard it, as in `is_none(%m) or "
                                   f"rank(%m) == 4`", c.line) from None
            if not ok:
                self._reject(f"`where {c.text}` is false")
                return None
        why = self.interior_violation(m)
        if why:
            self._reject(why)
            return None
        return m

    def _reject(self, why: str) -> None:
        if len(self.rejections) < 5:
            self.rejections.append(why)
        depth = len(self.p.stmts) + 1
        if self.best is None or depth >= self.best[0]:
            self.best = (depth, why)

    def interior_violation(self, m: Match) -> str | None:
        m.dead = []
        removed = m.removed_nodes()
        removed_ids = {id(n) for n in removed}
        yielded = set(m.yielded())
        # Pure nodes outside the match whose every use is in the match die with it (a
        # `sym.size` of an interior value feeding a shared `empty`): they go too.
        shared = [m.nodes[i] for i, s in enumerate(self.p.stmts) if s.shared and i in m.nodes]
        cands = {id(u): u for n in removed for r in n.results if r not in yielded
                 for u in self.users.get(r, ()) if id(u) not in removed_ids}
        cands.update({id(n): n for n in shared})
        changed = True
        while changed and cands:
            changed = False
            for key, c in list(cands.items()):
                if key in removed_ids or not get_op(c.op).pure:
                    continue
                if all(r not in self.outputs and all(id(u) in removed_ids
                                                     for u in self.users.get(r, ()))
                       for r in c.results):
                    removed_ids.add(key)
                    m.dead.append(c)
                    del cands[key]
                    changed = True
        for n in removed:
            for r in n.results:
                if r in yielded:
                    continue
                if r in self.outputs:
                    return f"interior value {self._name(r)} ({n.op}) is a graph output"
                for u in self.users.get(r, ()):
                    if id(u) not in removed_ids:
                        return (f"interior value {self._name(r)} ({n.op}) is also used by "
                                f"{u.op} outside the match")
        return None


def _none_ok(v):
    return None if v is MISSING else v


# ---------------------------------------------------------------- replacement building

class ReplaceBuilder:
    """Builds the replacement's nodes off-graph (typed by each op's type inference)."""

    def __init__(self, graph: Graph, pattern: Pattern):
        self.graph = graph
        self.pattern = pattern
        self.nodes: list[Node] = []

    def op(self, name: str, *args, **attrs) -> Value | list[Value]:
        try:
            opdef = get_op(name)
        except KeyError as e:
            raise self.pattern.error(str(e.args[0])) from None
        # An attribute equal to its default is absent (the IR's convention).
        attrs = {k: a for k, a in attrs.items()
                 if not (k in opdef.attr_defaults and a == opdef.attr_defaults[k])}
        try:
            types = infer_types(name, list(args), attrs, self.graph)
        except KilnRuleError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self.pattern.error(f"replacement op {name} cannot be typed on these "
                                     f"operands: {type(e).__name__}: {e}") from None
        node = Node(name, list(args), attrs, types)
        self.nodes.append(node)
        return node.results[0] if len(node.results) == 1 else list(node.results)


def _types_match(new, old) -> bool:
    if new == old:
        return True
    # sizes that are symbolic in one and equal in the other after simplification
    if isinstance(new, TensorType) and isinstance(old, TensorType):
        return new.dtype == old.dtype and new.rank == old.rank and all(
            dims_equal(a, b) for a, b in zip(new.shape, old.shape))
    return False


class _Index:
    """Node positions and users, kept current across the rewrites of one pass."""

    def __init__(self, g: Graph):
        self.g = g
        self.users: dict[Value, list[Node]] = g.users()
        self.outputs = set(g.outputs)
        self._pos: dict[int, int] | None = None

    def pos(self) -> dict[int, int]:
        if self._pos is None:
            self._pos = {id(n): i for i, n in enumerate(self.g.nodes)}
        return self._pos

    def invalidate(self):
        self._pos = None


def rewrite(m: Match, index: "_Index", allow: Callable[[], bool] | None = None) -> str:
    """Applies the pattern's replacement to `m`: "done"; "skip" (graph untouched) when
    the replacement cannot be placed; "stop" when `allow()` refuses (KILN_PASS_LIMIT).
    Raises KilnRuleError, graph untouched, when the replacement is ill-typed."""
    p, g = m.pattern, m.graph
    b = ReplaceBuilder(g, p)
    new = p.replace(m, b)
    new = [new] if isinstance(new, Value) else list(new)
    old = m.yielded()
    if len(new) != len(old):
        raise p.error(f"the replacement yields {len(new)} values, the match {len(old)}")
    for y, o, n in zip(p.yields, old, new):
        if not isinstance(n, Value):
            raise p.error(f"the replacement yields {n!r} for %{y}, not a value")
        if not _types_match(n.type, o.type):
            raise p.error(f"the replacement yields {n.type} for %{y}, which has type "
                          f"{o.type} in the graph")
    pos = index.pos()
    removed = m.removed_nodes()
    removed_ids = {id(n) for n in removed}
    new_ids = {id(n) for n in b.nodes}
    # where the new nodes may go: after every operand they read, before every outside
    # user of a yielded value
    lo = -1
    for n in b.nodes:
        for v in n.operands():
            if v.producer is not None and id(v.producer) not in new_ids:
                if id(v.producer) in removed_ids:
                    raise p.error(f"the replacement reads {v.producer.op}'s result, which "
                                  f"the rewrite removes (use a pattern input instead)")
                lo = max(lo, pos[id(v.producer)])
    hi = len(g.nodes)
    for o in old:
        for u in index.users.get(o, ()):
            if id(u) not in removed_ids:
                hi = min(hi, pos[id(u)])
    last = max((pos[id(n)] for n in removed), default=lo)
    at = min(last + 1, hi)
    if at <= lo:
        return "skip"
    # never move a read of a buffer across a write to it
    reads = {v for n in b.nodes for v in n.operands()}
    first = min((pos[id(n)] for n in removed), default=at)
    for n in g.nodes[min(first, at):max(first, at)]:
        if id(n) not in removed_ids and any(v in reads for v in written_values(n)):
            return "skip"
    if allow is not None and not allow():
        return "stop"
    # commit
    for n in b.nodes:
        n.meta["rule"] = p.name
    mapping = dict(zip(old, new))
    g.nodes[at:at] = b.nodes
    for o, nv in mapping.items():
        for u in index.users.pop(o, []):
            if id(u) not in removed_ids:
                u.replace_uses({o: nv})
                index.users.setdefault(nv, []).append(u)
    if any(o in index.outputs for o in old):
        g.outputs = [mapping.get(v, v) for v in g.outputs]
        index.outputs = set(g.outputs)
    g.remove_nodes(removed)
    for n in removed:
        for v in set(n.operands()):
            us = index.users.get(v)
            if us:
                index.users[v] = [u for u in us if u is not n]
        for r in n.results:
            index.users.pop(r, None)
    for n in b.nodes:
        for v in set(n.operands()):
            index.users.setdefault(v, []).append(n)
    index.invalidate()
    return "done"


def apply_patterns(g: Graph, patterns: Sequence[Pattern], ctx=None, require_match: bool = False,
                   max_rounds: int = 4) -> int:
    """Applies each pattern, in order, everywhere it matches (repeating while a sweep
    still rewrites). Asks `ctx.allow()` before each rewrite. Returns the rewrite count.

    With `require_match`, a pattern that matches nothing raises KilnRuleError saying how
    far the closest attempt got."""
    total = 0
    index = _Index(g)
    note = getattr(ctx, "note", None) or (lambda text: None)
    by_rule: dict[str, list] = {}   # name -> [rewrites, closest failed attempt], over its spellings
    for p in patterns:
        if p.replace is None:
            raise p.error("has no replacement")
        count = 0
        ops = p.anchor_ops()
        truncated: list[str] = []
        for _ in range(max_rounds):
            matcher = Matcher(p, g, index.users, index.outputs)
            matcher.truncated = truncated
            done = 0
            dead: set[int] = set()
            for node in list(g.nodes):
                if id(node) in dead or (ops is not None and node.op not in ops):
                    continue
                if node.meta.get("rule") == p.name:
                    continue   # never rewrite a pattern's own output: no rewrite loops
                matcher.outputs = index.outputs
                for m in matcher.matches_at(node):
                    removed = m.removed_nodes()
                    status = rewrite(m, index, ctx.allow if ctx is not None else None)
                    if status == "stop":
                        return total + count + done
                    if status == "done":
                        dead.update(id(n) for n in removed)
                        done += 1
                        break
            count += done
            if not done:
                break
        else:
            if done:
                note(f"rule {p.name}: still rewriting after {max_rounds} rounds in @{g.name} "
                     f"({count} rewrites); what later rounds would match is left")
        if truncated:
            note(f"rule {p.name}: gave up on {len(truncated)} anchor(s) in @{g.name} after "
                 f"{Matcher.MAX_STATES} alternatives each ({', '.join(truncated[:3])}"
                 f"{', ...' if len(truncated) > 3 else ''}); a match there may be missed")
        seen = by_rule.setdefault(p.name, [0, None, p])
        seen[0] += count
        if matcher.best and (seen[1] is None or matcher.best[0] > seen[1][0]):
            seen[1] = matcher.best
        elif seen[1] is None and not matcher.best:
            seen[1] = (-1, "no node has the anchor op " + ", ".join(sorted(ops or [])))
        total += count
    for count, best, p in by_rule.values() if require_match else ():
        if count == 0:
            raise p.error(f"matched nothing in @{g.name}; the closest attempt failed at: {best[1]}")
    return total


# ---------------------------------------------------------------- the Python pattern API

class PatternBuilder:
    """Builds a `Pattern` in Python, for fusions a rule cannot say:

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
        out = []
        for n in names:
            self.params.append("%" + n)
            out.append(Var(n))
        return out[0] if len(out) == 1 else out

    def const(self, *names: str):
        out = []
        for n in names:
            self.params.append("$" + n)
            out.append(Const(n))
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


# ---------------------------------------------------------------- expression helpers

def dims_equal(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float, sympy.Basic)) and isinstance(b, (int, float, sympy.Basic)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b:
            return True
        if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
            return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0
        return False
    return lit_equal(a, b)


def type_of(v) -> TensorType | None:
    return v.type if isinstance(v, Value) and isinstance(v.type, TensorType) else None


def dtype_literal(name: str) -> torch.dtype:
    return DTYPES[name]


__all__ += ["dims_equal", "type_of", "is_cast", "lit_equal", "dtype_name", "dtype_literal",
            "ScalarType", "SymIntType", "walk_values", "Iterable"]
