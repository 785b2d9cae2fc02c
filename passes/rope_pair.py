"""fuse.rope_pair: the two kiln.rope of a layer (q and k, rotated by the same cos/sin) become
one kiln.rope_pair, one launch instead of two; fuse.rope_store then folds the layer's
KV-cache writes of rotated k and of v into it (kiln.rope_pair_store), one launch instead of
three.

A decode step of a small model is bound by kernel launches, not by the few bytes RoPE
moves, so on targets with Triton kernels each q rope is paired with the nearest later
rope of the same cos/sin whose input already exists where the q rope is (so neither
depends on the other and the pair can take the q rope's place). Horizontal merging of
independent nodes, which the rule language's backward walk from one result cannot
express, as in fuse.parallel_linear.
"""
from __future__ import annotations

import torch

from kiln.ir import Graph, Node, TensorType, Value
from kiln.ir.ops import aliases

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


def _cache_write(n: Node) -> tuple[Value, Value, Value] | None:
    """(cache, rows, new) when `n` writes `new` [B, H, S, D] into rows `rows` [S] of a
    [B, H, L, D] cache in place: a StaticCache update, `cache[:, :, rows] = new` as
    index_put_ or index_copy_ along dim 2."""
    if n.op == "aten.index_put_" and len(n.args) == 3 and not n.attrs.get("accumulate"):
        cache, indices, new = n.args
        if not (isinstance(indices, (list, tuple)) and len(indices) == 3
                and indices[0] is None and indices[1] is None):
            return None
        rows = indices[2]
    elif n.op == "aten.index_copy_" and len(n.args) in (3, 4):
        cache, *rest = n.args
        dim = rest[0] if len(rest) == 3 else n.attrs.get("dim")
        rows, new = rest[-2:]
        if dim not in (2, -2):
            return None
    else:
        return None
    if not all(isinstance(v, Value) and isinstance(v.type, TensorType)
               for v in (cache, rows, new)):
        return None
    c, r, x = cache.type, rows.type, new.type
    if (c.rank != 4 or x.rank != 4 or r.rank != 1 or r.dtype not in (torch.int32, torch.int64)
            or x.dtype != c.dtype or x.shape[:2] != c.shape[:2] or x.shape[3] != c.shape[3]
            or x.shape[2] != r.shape[0]):
        return None
    return cache, rows, new


@register_pass("fuse.rope_store", "kiln.rope_pair + the KV-cache writes of rotated k and of v "
               "-> kiln.rope_pair_store (one launch; Triton targets)")
def rope_store(g: Graph, ctx: PassContext) -> int:
    """A decode layer writes its rotated k and its v into the cache rows of the step's
    positions, two index kernels after the RoPE launch. The fused op takes the k write's
    place: the rope_pair moves down to it (nothing reads rotated q before it), the v write
    moves to it when v exists there and nothing in between touches the v cache (reads the
    old value, or writes it) or reads the write's result."""
    target = ctx.options.get("target")
    if target is None or target.triton_backend is None:
        return 0
    fused = 0
    for pair in [n for n in g.nodes if n.op == "kiln.rope_pair"]:
        position = {n: i for i, n in enumerate(g.nodes)}
        users = g.users()
        q_rot, k_rot = pair.results
        k_writes = users.get(k_rot, [])
        if len(k_writes) != 1 or (k_write := _cache_write(k_writes[0])) is None \
                or k_write[2] is not k_rot:
            continue
        k_node = k_writes[0]
        k_cache, rows, _ = k_write
        at = position[k_node]
        if any(position[u] < at for u in users.get(q_rot, [])):
            continue
        v_node = _v_write(users, position, k_node, k_cache, rows, k_rot)
        if v_node is None:
            continue
        v_cache, _, v = _cache_write(v_node)
        if not all(_defined_before(x, position, at) for x in (v, v_cache)):
            continue
        if not _untouched_between(g, position, at, v_node, v_cache):
            continue
        if not ctx.allow():
            break
        q, k, cos, sin = pair.args
        node = g.add_node("kiln.rope_pair_store", [q, k, v, cos, sin, k_cache, v_cache, rows],
                          {}, [q_rot.type, k_cache.type, v_cache.type], before=k_node)
        g.replace_all_uses(q_rot, node.results[0])
        g.replace_all_uses(k_node.results[0], node.results[1])
        g.replace_all_uses(v_node.results[0], node.results[2])
        g.remove_nodes([pair, k_node, v_node])
        fused += 1
    return fused


def _v_write(users, position, k_node, k_cache, rows, k_rot) -> Node | None:
    """The write of v into another cache at the same rows nearest to the k write."""
    candidates = [n for n in users.get(rows, []) if n is not k_node
                  and (w := _cache_write(n)) is not None and w[1] is rows
                  and w[0] is not k_cache and w[2].type.shape == k_rot.type.shape]
    if not candidates:
        return None
    k_at = position[k_node]
    return min(candidates, key=lambda n: abs(position[n] - k_at))


def _defined_before(v: Value, position, at: int) -> bool:
    return v.is_input or position[v.producer] < at


def _untouched_between(g: Graph, position, at: int, write: Node, cache: Value) -> bool:
    """Moving `write` to position `at` changes no node between them: none takes the cache
    (or a view of it) or the write's result as an operand, to read it or to write it."""
    lo, hi = sorted((at, position[write]))
    touched = aliases(g, cache) | {write.results[0]}
    return not any(v in touched for n in g.nodes[lo + 1:hi] for v in n.operands())
