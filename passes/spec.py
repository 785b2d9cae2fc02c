"""spec.draft: the layer-skip draft graph, derived from the model's own captured IR.

Self-speculation (`--speculative layerskip:K`) drafts with the model itself minus some of
its decoder layers. A decoder layer adds two branches to the residual stream,
`h = h + attention(norm(h))` then `h = h + mlp(norm(h))`; in the captured flat-batch graph
(kiln.serving.capture_serving) that stream is a chain of `aten.add`s starting at the token
embedding, two per layer. Skipping layer i makes both of its adds pass `h` through: their
branches (the layer's attention, its KV write, its MLP) lose their only use and are
removed, and the graph keeps the other layers, the final norm and the LM head, over the
same weight inputs. Compiled like any serving graph (serve.kv_cache numbers the caches of
the attentions left, in order), it reads and writes the kept layers' KV caches, which the
runner shares with the full model's: the draft's writes at its draft positions are
overwritten by the verify step, which recomputes all of them.

This is not a pass of the default pipeline (it makes a second graph from a copy of the
capture, it does not rewrite the served one): compiler/serving.py applies it when
speculation asks for it, and `kiln dump --speculative layerskip:K` shows the result.
"""
from __future__ import annotations

from kiln.ir import Graph, Node, TensorType, Value

from .canonicalize import dce


class LayerSkipError(ValueError):
    """The graph's decoder layers cannot be found, or the layers asked for do not exist."""


def residual_adds(g: Graph) -> list[Node]:
    """The adds of the residual stream, in order: from the token embedding's output, each
    the one `aten.add` of the stream's current value and a tensor of its type."""
    users = g.users()
    embeddings = [n for n in g.nodes if n.op == "aten.embedding"]
    if len(embeddings) != 1:
        raise LayerSkipError(f"spec.draft: expected one aten.embedding (the token embedding), "
                             f"found {len(embeddings)}; layerskip drafts decoder-only models "
                             f"whose layers add to one residual stream")
    h, adds = embeddings[0].results[0], []
    while True:
        step = [n for n in users.get(h, []) if n.op == "aten.add" and len(n.args) == 2
                and all(isinstance(a, Value) and isinstance(a.type, TensorType) for a in n.args)
                and n.args[0].type == n.args[1].type == n.results[0].type]
        if len(step) != 1:
            return adds
        adds.append(step[0])
        h = step[0].results[0]


def default_skipped_layers(num_layers: int) -> list[int]:
    """The default rule: skip the middle half of the layers, [L/4, 3L/4) rounded down, keeping
    the first and the last quarter (the layers nearest the embedding and the LM head change the
    hidden state most; the middle ones least, so dropping them changes the argmax least)."""
    lo = num_layers // 4 or (num_layers + 1) // 2   # (a model of under 4 layers: its second half)
    return list(range(lo, num_layers - num_layers // 4))


def layer_skip_draft(g: Graph, skipped: list[int]) -> int:
    """Make `g` (a captured flat-batch forward, changed in place) skip the decoder layers
    `skipped`; returns the number of layers left."""
    adds = residual_adds(g)
    if not adds or len(adds) % 2:
        raise LayerSkipError(f"spec.draft: the residual stream has {len(adds)} adds, not two "
                             f"per decoder layer (attention, MLP); layerskip cannot tell this "
                             f"model's layers apart")
    num_layers = len(adds) // 2
    bad = [i for i in skipped if not 0 <= i < num_layers]
    if bad or not skipped:
        raise LayerSkipError(f"layerskip: layers {bad or skipped} are not a non-empty set of "
                             f"the model's decoder layers 0-{num_layers - 1}")
    if len(set(skipped)) >= num_layers:
        raise LayerSkipError(f"layerskip: skipping all {num_layers} layers leaves no model; "
                             f"keep at least one (layers=A-B within 0-{num_layers - 1})")
    for i in sorted(set(skipped)):
        for add in adds[2 * i:2 * i + 2]:
            g.replace_all_uses(add.results[0], add.args[0])   # h passes through
    dce(g)
    return num_layers - len(set(skipped))
