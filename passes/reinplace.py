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

from kiln.ir import Graph, Node, Value
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
    """`copy_(x, add(x, k))` of an input x, the sum read by nothing else -> an in-place add
    where the copy was; consecutive such copies adding one k -> one `_foreach_add_` (nothing
    lies between them, so each update may move to the first one's place)."""
    users = g.users()
    for v in g.outputs:   # a graph output is read after the graph
        users.setdefault(v, []).append(None)
    runs: list[list[tuple[int, Node, Node]]] = []   # (position, copy_, add) runs
    for i, n in enumerate(g.nodes):
        add = _counter_add(n, users)
        if add is None:
            continue
        run = runs[-1] if runs else None
        k = add.args[1]
        if (run and run[-1][0] == i - 1 and type(run[0][2].args[1]) is type(k)
                and run[0][2].args[1] == k and all(c.args[0] is not n.args[0] for _, c, _ in run)):
            run.append((i, n, add))
        else:
            runs.append([(i, n, add)])
    changed, dead = 0, []
    for run in runs:
        if not ctx.allow():
            break
        targets = [copy.args[0] for _, copy, _ in run]
        k, first = run[0][2].args[1], run[0][1]
        if len(run) == 1:
            g.add_node("aten.add_", [targets[0], k], {}, [targets[0].type], before=first)
        else:
            g.add_node("aten._foreach_add_", [targets, k], {}, [], before=first)
        dead += [x for _, copy, add in run for x in (copy, add)]
        changed += 1
    g.remove_nodes(dead)
    return changed


def _counter_add(n: Node, users) -> Node | None:
    """The `add(x, k)` of a counter update `n = copy_(x, add(x, k))`: x an input, k a
    number, the sum and the copy's result read by nothing else."""
    if n.op != "aten.copy_" or len(n.args) != 2 or n.attrs:
        return None
    target, value = n.args
    if not (isinstance(target, Value) and target.is_input and isinstance(value, Value)
            and not value.is_input):
        return None
    add = value.producer
    if (add.op != "aten.add" or add.attrs or len(add.args) != 2 or add.args[0] is not target
            or isinstance(add.args[1], (Value, bool)) or value.type != target.type
            or users.get(value, []) != [n] or users.get(n.results[0])):
        return None
    return add
