"""serve.hidden_states: per-token hidden states kept in paged pools beside the KV cache, for
a drafter that reads them (`--speculative mtp:K`, runtime/spec_mtp.py).

A multi-token-prediction module drafts from the main model's last hidden state at each
position (the residual stream before the final norm), and a chained draft from the module's
own. Both graphs stay plain serving graphs with one output, the logits, and both states
live where the KV cache does, at the token's slot:

- a serving capture may return, after the logits, one more per-token tensor [1, T, H]:
  `expose_final_hidden` makes the main model's capture return its final hidden state (the
  last add of the residual stream, passes/spec.py's `residual_adds`: no model-specific
  code); an MTP module (frontends/mtp.py) returns its own. serve.kv_cache leaves it alone;
  this pass writes every token's row to `kv_cache.hidden` ([NB, BS, 1, H], a new input the
  runner allocates like a K/V cache) at the token's slot (`kiln.store_slots`) and drops
  the output;
- a capture with an ordinary input `hidden_states` [1, T, H] (an MTP module's) reads it from
  `kv_cache.hidden_in` at each token's slot (`kiln.load_slots`) instead.

kiln.serving hands the MTP runner the main runner's `kv_cache.hidden` as its
`kv_cache.hidden_in`: the module at position i reads h_i from the slot where the main
model's step wrote it, with nothing copied. Before a chained step the drafter copies the
module's own output (its `kv_cache.hidden`) to the slot of the next position, which the
main model has not computed yet; the verify step then overwrites it there.

Paged pools rather than extra outputs and inputs: the runner, its decode buckets and their
CUDA graphs see a serving graph like any other (a cache input is a fixed tensor a replay
reads and writes in place), the states of a step's every token are kept (verify rows,
prefill chunks), and blocks shared by the prefix cache carry the hidden states of their
tokens to the sequences that share them.
"""
from __future__ import annotations

from kiln.ir import Graph, TensorType, Value
from kiln.ir.ops import infer_types
from kiln.ir.roles import HIDDEN_CACHE, HIDDEN_INPUT, HIDDEN_INPUT_CACHE, is_cache_input

from .manager import PassContext, register_pass
from .serve_kv_cache import NotAServingCapture
from .spec import LayerSkipError, residual_adds


def expose_final_hidden(g: Graph) -> Value:
    """Make a captured flat-batch forward (before any pass) also return its final hidden
    state: the residual stream's last value, which the final norm reads. Returns it."""
    try:
        adds = residual_adds(g)
    except LayerSkipError as e:
        raise NotAServingCapture(f"expose_final_hidden: {e}") from None
    if not adds or len(g.outputs) != 1:
        raise NotAServingCapture(f"expose_final_hidden: the capture has {len(g.outputs)} "
                                 f"outputs and a residual stream of {len(adds)} adds; the "
                                 f"hidden states a drafter reads come from a decoder-only "
                                 f"model whose layers add to one residual stream")
    hidden = adds[-1].results[0]
    g.outputs.append(hidden)
    return hidden


def _pool(g: Graph, like: Value, name: str, width) -> Value:
    """A new cache input holding `width` elements a slot, blocked like the KV caches."""
    kv = next((v for v in g.inputs if is_cache_input(v.name)), None)
    if kv is None:
        raise NotAServingCapture("serve.hidden_states: the graph has no KV cache inputs (run "
                                 "serve.kv_cache first)")
    num_blocks, block_size = kv.type.shape[:2]
    return Value(TensorType(like.type.dtype, (num_blocks, block_size, 1, width)), name)


@register_pass("serve.hidden_states", "serving only: a capture's per-token hidden-state output "
               "written to a paged pool (kv_cache.hidden), its hidden_states input read from one "
               "(kv_cache.hidden_in); for MTP drafting", serving_only=True)
def serve_hidden_states(g: Graph, ctx: PassContext) -> int:
    slots = next((v for v in g.inputs if v.name == "slot_mapping"), None)
    extra, inputs = g.outputs[1:], [v for v in g.inputs if v.name == HIDDEN_INPUT]
    if not extra and not inputs:
        return 0
    if slots is None:
        raise NotAServingCapture("serve.hidden_states: no slot_mapping input (run "
                                 "serve.kv_cache first)")
    if len(extra) > 1:
        raise NotAServingCapture(f"serve.hidden_states: the graph returns {len(extra)} tensors "
                                 f"besides the logits; a serving graph may keep one per-token "
                                 f"hidden state")
    T = slots.type.shape[0]
    pools = []
    for hidden in extra:
        s = hidden.type.shape
        if not isinstance(hidden.type, TensorType) or s[:-1] not in ((1, T), (T,)):
            raise NotAServingCapture(f"serve.hidden_states: the second output is {hidden.type}, "
                                     f"not a per-token hidden state [1, T, H] over the flat batch")
        pool = _pool(g, hidden, HIDDEN_CACHE, s[-1])
        rows = hidden if len(s) == 2 else _call(g, "aten.select", hidden, dim=0, index=0)
        _call(g, "kiln.store_slots", pool, slots, rows)
        pools.append(pool)
        g.outputs = g.outputs[:1]
    for x in inputs:
        s = x.type.shape
        if s[:-1] != (1, T):
            raise NotAServingCapture(f"serve.hidden_states: input %{HIDDEN_INPUT} is {x.type}, "
                                     f"not one hidden state per token [1, T, H]")
        pool = _pool(g, x, HIDDEN_INPUT_CACHE, s[-1])
        first = g.nodes[0]
        rows = _call(g, "kiln.load_slots", pool, slots, before=first)
        g.replace_all_uses(x, _call(g, "aten.unsqueeze", rows, dim=0, before=first))
        g.inputs.remove(x)
        pools.append(pool)
    at = max(i for i, v in enumerate(g.inputs) if is_cache_input(v.name)) + 1
    g.inputs[at:at] = pools   # beside the KV caches, before the weights
    return len(pools)


def _call(g: Graph, op: str, *args, before=None, **attrs) -> Value:
    node = g.add_node(op, list(args), attrs, infer_types(op, list(args), attrs, g), before=before)
    return node.results[0]
