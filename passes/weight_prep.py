"""Weight preparation: the part of a graph that depends on weights alone, split off.

After the pipeline some nodes read nothing but weights: the `cat` of q/k/v weights that
fuse.parallel_linear writes, the weight quantisation that `quantize` inserts, a cast of a
weight. Their results are the same on every call, so they move to a second graph,
`prepare_weights`, that the wrapper runs once per set of weight tensors
(kiln.backends.prepared), and the forward graph takes its results as extra inputs
appended after its own. Views of weights move too: free on a device, each still costs a
dispatch on the host (a `permute` of every linear's weight, ~200 a SmolLM2 step).

A weight is a graph input with the `weight` role (kiln.ir.roles: the frontends give it to
parameters, buffers and lifted constants, by the tensor objects) that no op writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.ir import Graph, Node, Value
from kiln.ir.graph import map_values
from kiln.ir.ops import get_op, written_values
from kiln.ir.roles import WEIGHT, is_weight


@dataclass
class WeightSplit:
    prepare: Graph            # inputs: some of the weights; outputs: the prepared values
    forward: Graph            # the original inputs, then one per prepared value
    positions: list[int]      # index in the original inputs of each `prepare` input
    copied: list[int]         # `prepare` inputs some result copies (see `copied_inputs`)


def weight_inputs(g: Graph) -> set[Value]:
    written = {v for n in g.nodes for v in written_values(n)}
    return {v for v in g.inputs if is_weight(v) and v not in written}


def _weight_only(g: Graph, weights: set[Value]) -> list[Node]:
    """Nodes computed from weights alone (pure, at least one operand)."""
    derived = set(weights)
    out = []
    for n in g.nodes:
        operands = n.operands()
        if operands and get_op(n.op).pure and all(v in derived for v in operands):
            derived.update(n.results)
            out.append(n)
    return out


def split_weight_preparation(g: Graph) -> WeightSplit | None:
    """None when no node reads only weights."""
    weights = weight_inputs(g)
    prep_nodes = _weight_only(g, weights)
    if not prep_nodes:
        return None
    moved = {id(n) for n in prep_nodes}
    produced = {r for n in prep_nodes for r in n.results}
    # Prepared values: results of moved nodes that the nodes left behind or the outputs read.
    boundary: dict[Value, None] = {}     # (ordered, unique)
    for n in g.nodes:
        if id(n) not in moved:
            boundary.update((v, None) for v in n.operands() if v in produced)
    boundary.update((v, None) for v in g.outputs if v in produced)

    prep = Graph("prepare_weights")
    index = {v: i for i, v in enumerate(g.inputs)}
    read = {v for n in prep_nodes for v in n.operands()}
    used_weights = [v for v in g.inputs if v in read]
    # Only the symbols the weights use (none, usually): graphs of one model (prefill,
    # decode) then print the same preparation, which lets them share its results.
    syms = set().union(*(v.type.symbols() for v in used_weights))
    prep.sym_ranges = {k: r for k, r in g.sym_ranges.items() if k in syms}
    prep.sym_hints = {k: h for k, h in g.sym_hints.items() if k in syms}
    mapping = {v: prep.add_input(v.name, v.type, v.role) for v in used_weights}
    for n in prep_nodes:
        m = prep.add_node(n.op, map_values(n.args, mapping.__getitem__),
                          {k: map_values(a, mapping.__getitem__) for k, a in n.attrs.items()},
                          [r.type for r in n.results])
        mapping.update(zip(n.results, m.results))
    prep.outputs = [mapping[v] for v in boundary]

    fwd = Graph(g.name)
    fwd.sym_ranges, fwd.sym_hints, fwd.meta = dict(g.sym_ranges), dict(g.sym_hints), dict(g.meta)
    fwd.functions = dict(g.functions)
    remap = {v: fwd.add_input(v.name, v.type, v.role) for v in g.inputs}
    taken = {v.name for v in g.inputs}
    for v in boundary:
        name = _prepared_name(v, taken)
        remap[v] = fwd.add_input(name, v.type, WEIGHT)
    for n in g.nodes:
        if id(n) in moved:
            continue
        m = fwd.add_node(n.op, map_values(n.args, remap.__getitem__),
                         {k: map_values(a, remap.__getitem__) for k, a in n.attrs.items()},
                         [r.type for r in n.results])
        m.meta = dict(n.meta)
        remap.update(zip(n.results, m.results))
    fwd.outputs = [remap[v] for v in g.outputs]
    return WeightSplit(prep, fwd, [index[v] for v in used_weights], copied_inputs(prep))


def copied_inputs(prep: Graph) -> list[int]:
    """Indices of the preparation's inputs that a copying op reads (through views): an
    in-place write to one of those must prepare again. A prepared view sees such a write
    by itself, so the other inputs need only an identity check on each call (the version
    counters of hundreds of weights are most of that check's host time). `reshape` may
    copy, so it counts as copying."""
    sources: dict[Value, set[Value]] = {v: {v} for v in prep.inputs}
    copied: set[Value] = set()
    for n in prep.nodes:
        read = set().union(*(sources.get(v, set()) for v in n.operands()))
        if get_op(n.op).has("view") and n.op != "aten.reshape":
            sources.update((r, read) for r in n.results)
        else:
            copied |= read
    return [i for i, v in enumerate(prep.inputs) if v in copied]


def _prepared_name(v: Value, taken: set[str]) -> str:
    """`<first weight>.<op>`: the prepared value named after what it is made of."""
    n = v.producer
    first = next((x for x in _weights_under(n) if x.name), None)
    base = f"{first.name if first else 'weights'}.{n.op.split('.')[-1].strip('_')}"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    taken.add(name)
    return name


def _weights_under(n: Node):
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        for v in m.operands():
            if v.producer is None:
                yield v
            elif id(v.producer) not in seen:
                seen.add(id(v.producer))
                todo.append(v.producer)
