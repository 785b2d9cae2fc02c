"""reinplace: functional updates of mutated inputs become in-place updates.

AOTAutograd functionalizes a KV-cache write into `y = index_put(cache, idx, new)` followed,
at the end of the graph, by `copy_(cache, y)`: two full copies of the cache per layer per
step. When nothing reads the old cache after the update, the update can write the cache
in place and the final copy disappears.
"""
from __future__ import annotations

from kiln.ir import Graph, Value
from kiln.ir.ops import aliases

from .manager import PassContext, register_pass

# functional update -> its in-place form (same arguments)
INPLACE = {"aten.index_put": "aten.index_put_", "aten.index_copy": "aten.index_copy_"}


@register_pass("reinplace", "functional updates of mutated inputs (KV-cache writes) done in place")
def reinplace(g: Graph, ctx: PassContext) -> int:
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
