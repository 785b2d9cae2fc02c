"""reinplace: functional updates of mutated inputs become in-place updates.

AOTAutograd functionalizes a KV-cache write into `y = index_put(cache, idx, new)` followed,
at the end of the graph, by `copy_(cache, y)`: two full copies of the cache per layer per
step. When nothing reads the old cache after the update, the update can write the cache
in place and the final copy disappears.

Counters take the same path: transformers' StaticCache layers (5.17 and later) each keep
their length in a 0-d tensor and add the step's tokens to it, `copy_(n, add(n, k))` per
layer, two launches a layer for a few bytes. Each becomes `add_(n, k)` where the copy was,
and the in-place adds of one scalar at the end of the graph become one
`_foreach_add_([n0, n1, ...], k)`: a single launch for every layer's counter.
"""
from __future__ import annotations

from kiln.ir import Graph, Value
from kiln.ir.ops import aliases

from .manager import PassContext, register_pass

# functional update -> its in-place form (same arguments)
INPLACE = {"aten.index_put": "aten.index_put_", "aten.index_copy": "aten.index_copy_"}


@register_pass("reinplace", "functional updates of mutated inputs (KV-cache writes) done in place")
def reinplace(g: Graph, ctx: PassContext) -> int:
    return _functional_updates(g, ctx) + _counter_updates(g, ctx)


def _functional_updates(g: Graph, ctx: PassContext) -> int:
    position = {id(n): i for i, n in enumerate(g.nodes)}
    readers: dict[Value, list[int]] = {}
    for i, n in enumerate(g.nodes):
        for v in n.operands():
            readers.setdefault(v, []).append(i)
    changed = 0
    dead = []
    replaced: dict[Value, Value] = {}
    for i, n in enumerate(g.nodes):
        if n.op != "aten.copy_" or len(n.args) != 2:
            continue
        target, value = n.args
        if not (isinstance(target, Value) and target.is_input and isinstance(value, Value)
                and not value.is_input and value.producer.op in INPLACE):
            continue
        update = value.producer
        if update.args[0] is not target or target.type != value.type:
            continue
        at = position[id(update)]
        # The old value, or a view of it (which would alias the updated storage), must
        # not be read after the update.
        if any(r > at and r != i for v in aliases(g, target) for r in readers.get(v, [])):
            continue
        if not ctx.allow():
            break
        update.op = INPLACE[update.op]
        dead.append(n)
        replaced[n.results[0]] = value
        changed += 1
    g.remove_nodes(dead)
    g.replace_uses(replaced)   # once: a walk over the graph per update is quadratic
    return changed


def _counter_updates(g: Graph, ctx: PassContext) -> int:
    """`copy_(x, add(x, k))` of an input x, the sum used by nothing else -> `add_(x, k)` at
    the copy; then runs of such in-place adds of the same k, with nothing between them
    touching their tensors, -> one `_foreach_add_`."""
    users = g.users()
    for v in g.outputs:   # a graph output is read after the graph
        users.setdefault(v, []).append(None)
    changed = 0
    for n in list(g.nodes):
        if n.op != "aten.copy_" or len(n.args) != 2 or n.attrs:
            continue
        target, value = n.args
        if not (isinstance(target, Value) and target.is_input and isinstance(value, Value)
                and not value.is_input):
            continue
        add = value.producer
        if (add.op != "aten.add" or add.attrs or len(add.args) != 2 or add.args[0] is not target
                or isinstance(add.args[1], (Value, bool)) or value.type != target.type
                or users.get(value, []) != [n] or users.get(n.results[0])):
            continue
        if not ctx.allow():
            return changed
        g.add_node("aten.add_", [target, add.args[1]], {}, [target.type], before=n)
        g.remove_nodes([n, add])
        changed += 1
    return changed + _merge_adds(g, ctx)


def _merge_adds(g: Graph, ctx: PassContext) -> int:
    users = g.users()
    for v in g.outputs:
        users.setdefault(v, []).append(None)
    merged = 0
    i = 0
    while i < len(g.nodes):
        run = [g.nodes[i]] if _lone_add(g.nodes[i], users) else []
        j = i + 1
        while run and j < len(g.nodes) and _lone_add(g.nodes[j], users) \
                and g.nodes[j].args[1] == run[0].args[1] \
                and type(g.nodes[j].args[1]) is type(run[0].args[1]) \
                and g.nodes[j].args[0] not in {r.args[0] for r in run}:
            run.append(g.nodes[j])
            j += 1
        if len(run) > 1 and ctx.allow():
            g.add_node("aten._foreach_add_", [[r.args[0] for r in run], run[0].args[1]], {}, [],
                       before=run[0])
            g.remove_nodes(run)
            merged += 1
            i += 1
        else:
            i = j if run else i + 1
    return merged


def _lone_add(n, users) -> bool:
    """An in-place add of a scalar to an input whose result nothing reads."""
    return (n.op == "aten.add_" and len(n.args) == 2 and isinstance(n.args[0], Value)
            and n.args[0].is_input and not isinstance(n.args[1], (Value, bool))
            and not users.get(n.results[0]))
