"""The matcher: where a `Pattern` matches a graph, as `Match`es. What a pattern matches,
in both front ends:

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
- `where` constraints (`Constraint`) are evaluated on the bound match; constraints that
  came from an optional part are only checked when that part is present.
"""
from __future__ import annotations

from typing import Iterator

from kiln.ir import Graph, Node, Value
from kiln.ir.ops import get_op
from kiln.ir.printer import format_literal, value_names

from .equality import lit_equal
from .objects import (MISSING, Const, KilnRuleError, ListPat, Lit, Match, Pattern, RuleContext,
                      Stmt, Var)
from .op_classes import is_cast


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
                 outputs: set[Value] | None = None, context: RuleContext | None = None):
        self.p = pattern
        self.g = graph
        self.users = users
        self.outputs = outputs if outputs is not None else set(graph.outputs)
        self.context = context or RuleContext(graph, users, self.outputs)
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
        m = Match(self.p, self.g, values, dict(st.nodes), self.context)
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
