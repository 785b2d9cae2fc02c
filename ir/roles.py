"""What each graph input is: the one contract between capture, passes, backends and the runtime.

- A **weight** is read-only module state (a parameter, a buffer, a constant the capture
  lifted) that the caller binds from a weight store. The frontends decide it from the
  tensor objects they capture, never from names, and the IR text marks it
  (`weight %model.norm.weight: f32[576]`), so a parsed graph knows its weights too.
- The **serving batch** is the flattened step the runtime's model runner passes on every
  call, by these names and in this order.
- A **KV cache** input is one layer's K or V block pool, named `kv_cache.<layer>.<k|v>`.
  Two more pools are blocked the same way (passes/serve_hidden.py): `kv_cache.hidden`, the
  final hidden state of each token the graph runs, written at the token's slot, and
  `kv_cache.hidden_in`, the hidden state each token reads as input (an MTP module's).
- A **scalar** is a Python int the caller passes, held in a 0-d int64 device tensor
  (capture.scalar_inputs): the compiled function writes the int into a buffer it owns,
  so replayed CUDA graphs read each call's value.
Everything else is an ordinary per-call input.
"""
from __future__ import annotations

WEIGHT = "weight"   # roles the text format spells; "" is an ordinary input
SCALAR = "scalar"

BATCH_INPUTS = ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens",
                "query_start")
_CACHE_PREFIX = "kv_cache."
HIDDEN_CACHE = "kv_cache.hidden"         # per-token final hidden states the graph writes
HIDDEN_INPUT_CACHE = "kv_cache.hidden_in"   # per-token hidden states the graph reads
HIDDEN_INPUT = "hidden_states"           # the capture's input that kv_cache.hidden_in replaces


def cache_input_name(layer: int, which: str) -> str:
    return f"{_CACHE_PREFIX}{layer}.{which}"


def is_cache_input(name: str) -> bool:
    return name.startswith(_CACHE_PREFIX)


def is_weight(value) -> bool:
    return value.role == WEIGHT
