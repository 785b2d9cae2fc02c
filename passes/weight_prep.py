"""Weight preparation: the part of a graph that depends on weights alone, split off.

After the pipeline some nodes read nothing but weights: the `cat` of q/k/v weights that
fuse.parallel_linear writes, the weight quantisation that `quantize` inserts, a cast of a
weight. Their results are the same on every call, so they move to a second graph,
`prepare_weights`, that the wrapper runs once per set of weight tensors
(kiln.backends.prepared), and the forward graph takes its results as extra inputs
appended after its own. Views of weights stay where they are (free); a view that only a
moved node read moves with it.

A weight is a graph input named after module state (`model.layers.0.mlp.up_proj.weight`:
the frontends name parameters and buffers by their dotted path) that no op writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.ir import Graph, Node, Value
from kiln.ir.graph import map_values
from kiln.ir.ops import get_op


@dataclass
class WeightSplit:
    prepare: Graph            # inputs: some of the weights; outputs: the prepared values
    forward: Graph            # the original inputs, then one per prepared value
    positions: list[int]      # index in the original inputs of each `prepare` input


def weight_inputs(g: Graph) -> set[Value]:
    written = set()
    for n in g.nodes:
        op = get_op(n.op)
        if op.has("mutates"):
            for k in op.extra.get("mutated_operands", (0,)):
                if k < len(n.args) and isinstance(n.args[k], Value):
                    written.add(n.args[k])
    return {v for v in g.inputs if v.name and "." in v.name and v not in written}


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
    """None when no node is worth preparing (only views of weights, or none at all)."""
    weights = weight_inputs(g)
    candidates = _weight_only(g, weights)
    moved = {id(n) for n in candidates if not get_op(n.op).has("view")}
    if not moved:
        return None
    # The views a moved node reads move (as copies) with it.
    needed: set[int] = set(moved)
    for n in reversed(candidates):
        if id(n) in needed:
            for v in n.operands():
                if v.producer is not None:
                    needed.add(id(v.producer))
    prep_nodes = [n for n in candidates if id(n) in needed]
    produced = {r for n in prep_nodes if id(n) in moved for r in n.results}
    # Prepared values: results of moved nodes that stay-behind nodes or the outputs read.
    boundary: list[Value] = []
    for n in g.nodes:
        if id(n) in moved:
            continue
        for v in n.operands():
            if v in produced and v not in boundary:
                boundary.append(v)
    for v in g.outputs:
        if v in produced and v not in boundary:
            boundary.append(v)

    prep = Graph("prepare_weights")
    prep.sym_ranges, prep.sym_hints = dict(g.sym_ranges), dict(g.sym_hints)
    index = {v: i for i, v in enumerate(g.inputs)}
    used_weights = [v for v in g.inputs if any(v in n.operands() for n in prep_nodes)]
    mapping = {v: prep.add_input(v.name, v.type) for v in used_weights}
    for n in prep_nodes:
        m = prep.add_node(n.op, map_values(n.args, mapping.__getitem__),
                          {k: map_values(a, mapping.__getitem__) for k, a in n.attrs.items()},
                          [r.type for r in n.results])
        mapping.update(zip(n.results, m.results))
    prep.outputs = [mapping[v] for v in boundary]

    fwd = Graph(g.name)
    fwd.sym_ranges, fwd.sym_hints, fwd.meta = dict(g.sym_ranges), dict(g.sym_hints), dict(g.meta)
    fwd.functions = dict(g.functions)
    remap = {v: fwd.add_input(v.name, v.type) for v in g.inputs}
    taken = {v.name for v in g.inputs}
    for v in boundary:
        name = _prepared_name(v, taken)
        remap[v] = fwd.add_input(name, v.type)
    kept = [n for n in g.nodes if id(n) not in moved]
    live = _live(kept, g.outputs)
    for n in kept:
        if id(n) not in live:
            continue
        m = fwd.add_node(n.op, map_values(n.args, remap.__getitem__),
                         {k: map_values(a, remap.__getitem__) for k, a in n.attrs.items()},
                         [r.type for r in n.results])
        m.meta = dict(n.meta)
        remap.update(zip(n.results, m.results))
    fwd.outputs = [remap[v] for v in g.outputs]
    return WeightSplit(prep, fwd, [index[v] for v in used_weights])


def _live(nodes: list[Node], outputs) -> set[int]:
    """Nodes whose results something reads (impure nodes always run)."""
    needed = set(outputs)
    live: set[int] = set()
    for n in reversed(nodes):
        if not get_op(n.op).pure or any(r in needed for r in n.results):
            live.add(id(n))
            needed.update(n.operands())
    return live


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
