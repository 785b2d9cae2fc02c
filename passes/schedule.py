"""schedule: what the fusion rules left over, grouped into generated kernels.

The rules fuse the patterns they know into `kiln.*` ops (library kernels and templates,
chosen per target by `backends/targets.py`). What remains between them is glue: residual
adds, dtype casts, rotary tables, mask arithmetic. Run as torch ops, each is a launch and a
round trip through memory. This pass finds connected groups of elementwise ops that the
target's code generator can lower (`ctx.options["can_generate"]`, given by the compiler for
targets with one) and outlines each group into a function of the graph, called through
`kiln.call`; the backend turns each function into one kernel.

A group is legal when:
- every value inside broadcasts to the group's shape S, and every value it hands out (used
  after it, or a graph output) has shape S: one flat index over S computes all of them.
  With last-dim reductions (sum, mean, amax, amin with keepdim: what a norm or a softmax
  the rules did not know is made of), S is the reduced tensor's shape, the kernel works
  row by row, and outputs may also be one value per row (S[:-1] + [1]);
- it is convex: no path leaves the group and comes back (networkx on the dataflow view),
  else the call would depend on its own output;
- it has at least two ops (one op alone is already one kernel);
- siblings (ops reading the same value, like cos and sin of the rotary angles) may share
  a group: one kernel with several outputs.
Identical groups (same ops, types, literals) share one function. Constants
(`aten.scalar_tensor`) join a group when all their users are in it.

Why Python and not a `.kiln` rule: a group is not a fixed pattern but a partition of
whatever glue is left, of any size and shape, decided by legality over the whole set
(broadcast shapes, convexity on the dataflow graph) rather than by matching statements.
"""
from __future__ import annotations

import networkx as nx

from kiln.ir import Graph, Node, TensorType, Value, get_op, print_graph

from .canonicalize import dce
from .manager import PassContext, register_pass

MAX_GROUP = 64
_CONSTANTS = {"aten.scalar_tensor"}


def _shape(v: Value):
    return v.type.shape if isinstance(v.type, TensorType) else None


def _broadcasts_to(shape, target) -> bool:
    if shape is None or len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


class _Groups:
    """Union-find over the candidate nodes, with each group's members in graph order."""

    def __init__(self, nodes: list[Node]):
        self.parent = {n: n for n in nodes}
        self.members = {n: [n] for n in nodes}

    def find(self, n: Node) -> Node:
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: Node, b: Node) -> None:
        a, b = self.find(a), self.find(b)
        self.parent[b] = a
        self.members[a] = self.members[a] + self.members.pop(b)


def _outputs(members: set[Node], users: dict, graph_outputs: set[Value]) -> list[Value]:
    out = []
    for n in members:
        for r in n.results:
            if r in graph_outputs or any(u not in members for u in users.get(r, ())):
                out.append(r)
    return out


def _group_shape(members: set[Node], users, graph_outputs):
    """The group's domain S, or None when the group cannot be one kernel: every member
    broadcasts to S; outputs have shape S, or with a reduction S[:-1] + [1] (one value per
    row); every reduction reduces the last dim of an S-shaped value."""
    outs = _outputs(members, users, graph_outputs)
    if not outs or any(o.producer.op in _CONSTANTS for o in outs):
        return None
    reductions = [n for n in members if get_op(n.op).has("reduction")]
    if reductions:
        shape = _shape(reductions[0].args[0])
        if shape is None or any(_shape(n.args[0]) != shape for n in reductions):
            return None
        allowed = {tuple(shape), tuple(shape[:-1]) + (1,)}
    else:
        shape = _shape(outs[0])
        allowed = {tuple(shape)} if shape is not None else set()
    if shape is None or any(tuple(_shape(o) or ()) not in allowed for o in outs):
        return None
    if any(not _broadcasts_to(_shape(r), shape) for n in members for r in n.results):
        return None
    return shape


def _creates_cycle(dg: nx.DiGraph, a: set[Node], b: set[Node], order: dict) -> bool:
    """Whether merging a and b leaves a path that exits the merged group and re-enters it."""
    merged = a | b
    hi = max(order[n] for n in merged)
    frontier = [s for n in merged for s in dg.successors(n) if s not in merged]
    seen = set()
    while frontier:
        x = frontier.pop()
        if x in seen or order.get(x, hi + 1) > hi:
            continue
        seen.add(x)
        for s in dg.successors(x):
            if s in merged:
                return True
            frontier.append(s)
    return False


def find_groups(g: Graph, can_generate) -> list[list[Node]]:
    candidates = [n for n in g.nodes if can_generate(n)]
    if not candidates:
        return []
    cand = set(candidates)
    users = g.users()
    graph_outputs = set(g.outputs)
    dg = g.to_networkx()
    order = {n: i for i, n in enumerate(g.nodes)}
    groups = _Groups(candidates)

    def try_merge(x: Node, y: Node) -> None:
        ga, gb = groups.find(x), groups.find(y)
        if ga is gb:
            return
        a, b = set(groups.members[ga]), set(groups.members[gb])
        merged = a | b
        if len(merged) > MAX_GROUP or _group_shape(merged, users, graph_outputs) is None:
            return
        if _creates_cycle(dg, a, b, order):
            return
        groups.union(ga, gb)

    # Producer -> consumer edges between candidates, in graph order: chains grow forward.
    for n in candidates:
        for v in n.operands():
            if v.producer in cand:
                try_merge(v.producer, n)
    # Siblings: candidates reading the same value (cos and sin of the rotary angles) become
    # one kernel with several outputs, reading it once.
    for v, consumers in users.items():
        siblings = [u for u in dict.fromkeys(consumers) if u in cand]
        for u in siblings[1:]:
            try_merge(siblings[0], u)
    out = []
    for root, members in groups.members.items():
        if len(members) < 2:   # scalar_tensor is a launch too (a fill) on a GPU
            continue
        members = sorted(members, key=order.__getitem__)
        if _group_shape(set(members), users, graph_outputs) is None:
            continue
        out.append(members)
    return sorted(out, key=lambda ms: order[ms[0]])


def _outline(g: Graph, members: list[Node], name: str, users, graph_outputs) -> tuple[Graph, list, list]:
    """The group as a function: inputs are the values it reads from outside (in order of
    first use), outputs the values used after it."""
    member_set = set(members)
    f = Graph(name)
    f.sym_ranges, f.sym_hints = dict(g.sym_ranges), dict(g.sym_hints)
    inside: dict[Value, Value] = {}
    reads: list[Value] = []
    for n in members:
        for v in n.operands():
            if v not in inside and (v.producer not in member_set) and v not in reads:
                reads.append(v)
    for i, v in enumerate(reads):
        inside[v] = f.add_input(f"a{i}", v.type)
    for n in members:
        m = f.add_node(n.op, [inside.get(a, a) if isinstance(a, Value) else a for a in n.args],
                       {k: inside.get(a, a) if isinstance(a, Value) else a for k, a in n.attrs.items()},
                       [r.type for r in n.results])
        for old, new in zip(n.results, m.results):
            inside[old] = new
    outs = sorted(_outputs(member_set, users, graph_outputs), key=lambda v: (members.index(v.producer), v.index))
    f.outputs = [inside[v] for v in outs]
    return f, reads, outs


def _signature(f: Graph) -> str:
    """The function's text with its name blanked: equal for identical groups."""
    return print_graph(f).split("(", 1)[1]


def _stable_toposort(g: Graph) -> None:
    """Reorders the nodes topologically, keeping the old order wherever it is free."""
    order = {n: i for i, n in enumerate(g.nodes)}
    dg = g.to_networkx()
    g.nodes = [n for n in nx.lexicographical_topological_sort(dg, key=lambda x: order.get(x, -1))
               if isinstance(n, Node)]


def schedule(g: Graph, ctx: PassContext) -> int:
    can_generate = ctx.options.get("can_generate")
    if can_generate is None:
        return 0          # the target has no code generator: everything stays a torch call
    groups = find_groups(g, can_generate)
    if not groups:
        return 0
    users = g.users()
    graph_outputs = set(g.outputs)
    by_signature: dict[str, str] = {}
    done = 0
    for members in groups:
        if not ctx.allow():
            break
        ops = "_".join(dict.fromkeys(n.op.split(".")[-1].lstrip("_") for n in members
                                     if n.op not in _CONSTANTS))
        name = f"fused_{len(g.functions)}_{ops}"[:60].rstrip("_")
        f, reads, outs = _outline(g, members, name, users, graph_outputs)
        key = _signature(f)
        if key in by_signature:
            name = by_signature[key]
        else:
            by_signature[key] = name
            g.functions[name] = f
        call = g.add_node("kiln.call", list(reads), {"callee": name}, [v.type for v in outs],
                          before=members[-1])
        g.replace_uses(dict(zip(outs, call.results)))
        g.remove_nodes(members)
        done += 1
    _stable_toposort(g)
    dce(g)
    return done


register_pass("schedule", "group leftover elementwise chains into generated kernels (kiln.call)")(schedule)
