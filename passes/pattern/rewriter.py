"""The rewriter: `rewrite` replaces one match with the nodes its replacement builds
(`replace(match, b)`, each node made by `b.op(...)`, a `ReplaceBuilder`), and
`apply_patterns` applies patterns everywhere they match in a graph, the loop a pass runs.

The replacement is type-checked before the graph is touched: each new yielded value
must have exactly the type of the value it replaces, else `KilnRuleError`.
"""
from __future__ import annotations

from typing import Callable, Sequence

from kiln.ir import Graph, Node, TensorType, Value
from kiln.ir.ops import get_op, infer_types, written_values

from .equality import dims_equal
from .matcher import Matcher
from .objects import KilnRuleError, Match, Pattern, RuleContext


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
    context = RuleContext(g, index.users, index.outputs, getattr(ctx, "options", None) or {})
    note = getattr(ctx, "note", None) or (lambda text: None)
    by_rule: dict[str, list] = {}   # name -> [rewrites, closest failed attempt], over its spellings
    for p in patterns:
        if p.replace is None:
            raise p.error("has no replacement")
        count = 0
        ops = p.anchor_ops()
        truncated: list[str] = []
        for _ in range(max_rounds):
            matcher = Matcher(p, g, index.users, index.outputs, context)
            matcher.truncated = truncated
            done = 0
            dead: set[int] = set()
            for node in list(g.nodes):
                if id(node) in dead or (ops is not None and node.op not in ops):
                    continue
                if node.meta.get("rule") == p.name:
                    continue   # never rewrite a pattern's own output: no rewrite loops
                matcher.outputs = context.outputs = index.outputs
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
