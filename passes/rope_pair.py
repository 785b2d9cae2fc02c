"""fuse.rope_pair: the two kiln.rope of a layer (q and k, rotated by the same cos/sin) become
one kiln.rope_pair, one launch instead of two.

A decode step of a small model is bound by kernel launches, not by the few bytes RoPE
moves, so on targets with Triton kernels each q rope is paired with the nearest later
rope of the same cos/sin whose input already exists where the q rope is (so neither
depends on the other and the pair can take the q rope's place). Horizontal merging of
independent nodes, which the rule language's backward walk from one result cannot
express, as in fuse.parallel_linear.
"""
from __future__ import annotations

from kiln.ir import Graph, Node

from .manager import PassContext, register_pass


@register_pass("fuse.rope_pair", "kiln.rope of q and of k with the same cos/sin -> one "
               "kiln.rope_pair (one launch; Triton targets)")
def rope_pair(g: Graph, ctx: PassContext) -> int:
    target = ctx.options.get("target")
    if target is None or target.triton_backend is None:
        return 0
    position = {n: i for i, n in enumerate(g.nodes)}
    ropes = [n for n in g.nodes if n.op == "kiln.rope"]
    paired: set[Node] = set()
    pairs = 0
    for i, first in enumerate(ropes):
        if first in paired:
            continue
        for second in ropes[i + 1:]:
            x = second.args[0]
            if (second in paired or second.args[1:] != first.args[1:]
                    or not (x.is_input or position[x.producer] < position[first])):
                continue
            if not ctx.allow():
                return pairs
            node = g.add_node("kiln.rope_pair", [first.args[0], x, *first.args[1:]], {},
                              [first.results[0].type, second.results[0].type], before=first)
            g.replace_all_uses(first.results[0], node.results[0])
            g.replace_all_uses(second.results[0], node.results[1])
            g.remove_nodes([first, second])
            paired.update((first, second))
            pairs += 1
            break
    return pairs
