"""serve.kv_cache: a captured flat-batch forward becomes the serving graph over a paged KV cache.

Input: the model captured from its own modeling code as a pure function of one flattened
batch, `model(input_ids=[1, T], position_ids=[1, T], use_cache=False)` with T symbolic,
after the fusion passes: every token-wise op already works on the T tokens of all
sequences at once and RoPE reads the positions; only attention mixes tokens, as
`kiln.attention` over the T tokens (causal, or with a mask built from position_ids alone,
which is how transformers spells causal attention over packed sequences; either may have
a sliding window).

Output: the graph the runtime's ModelRunner calls once per step (runtime/batch.py):

    func @forward(%input_ids: i64[T], %positions: i64[T], %slot_mapping: i64[T],
                  %block_tables: i32[N, B], %context_lens: i32[N], %query_start: i32[N + 1],
                  %kv_cache.0.k: f32[NB, BS, Hkv, D], %kv_cache.0.v: ..., (one K/V pair per
                  attention, in graph order), <weights...>) -> f32[N, vocab]

- each `kiln.attention` becomes `kiln.paged_attention` (ir/kiln_ref.py has the semantics):
  q/k/v are viewed as [T, H, D], the new K/V are written to the cache at `slot_mapping`, and
  each sequence attends its own blocks, over the model's sliding window if it has one
  (read from the mask by kiln.ir.masks, checked on probe sequences); the mask and
  everything that only fed it die;
- the LM head runs only on each sequence's last new token (rows query_start[1:] - 1), so a
  prefill of T tokens costs N x vocab logits, not T x vocab;
- dynamo's size inputs (SymInt T) become `sym.size(input_ids, 0)`: the runner passes
  tensors only.
BS (tokens per block) is the `block_size` option (default 16); NB (blocks) stays symbolic,
so the runner sizes the cache at load time. T, N and B are symbols.
"""
from __future__ import annotations

import sympy
import torch

from kiln.ir import Graph, Node, SymIntType, TensorType, Value, sym
from kiln.ir.graph import map_values
from kiln.ir.kiln_ref import visible_keys
from kiln.ir.masks import mask_form
from kiln.ir.ops import FakeEnv, get_op, infer_types
from kiln.ir.roles import BATCH_INPUTS, cache_input_name

from .canonicalize import dce
from .manager import PassContext, register_pass

DEFAULT_BLOCK_SIZE = 16
# Probe sequences for a mask's unread terms: at least this long, and longer than any
# constant in the mask's producers (a window), up to the most a probe may take.
PROBE_MIN_TOKENS = 16
PROBE_MAX_TOKENS = 4096
MAX_DIM = 2**31 - 1
# The views (op trait `view`) that only add or drop unit dims around the token dim, which
# the walk from the logits back to the LM head may pass and then drop: not permute,
# expand, slice or select, which would move or cut tokens.
_TOKEN_ORDER_VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.unsqueeze",
                      "aten.squeeze", "aten.alias"}
_HEADS = {"aten.mm": 0, "aten.matmul": 0, "aten.linear": 0, "aten.addmm": 1, "kiln.scaled_mm": 0,
          "kiln.weight_int8_mm": 0, "kiln.weight_int8_grouped_mm": 0}
# A quantised LM head's refinement (rules/quantize.kiln): refines the logits of one of _HEADS.
_REFINE = "kiln.refine_top_logits"

# The logits of a column-parallel LM head (shard.tensor_parallel), gathered along the vocab
# dim: as token-wise as the views, so the LM head's rows can be cut to the last tokens.
_GATHERS_VOCAB = lambda n: n.op == "kiln.all_gather" and n.attrs.get("dim") == -1  # noqa: E731


class NotAServingCapture(ValueError):
    pass


def _insert(g: Graph, before: Node, op: str, *args, **attrs) -> Value:
    env = g.meta.get("_serve_fake_env")   # one fake-tensor env for the whole pass (cheaper)
    node = g.add_node(op, list(args), attrs, infer_types(op, list(args), attrs, g, env),
                      before=before)
    return node.results[0]


def _find_input(g: Graph, suffix: str) -> Value:
    found = [v for v in g.inputs if v.name.split(".")[-1].endswith(suffix)
             and isinstance(v.type, TensorType) and v.type.rank == 2 and v.type.shape[0] == 1]
    if len(found) != 1:
        raise NotAServingCapture(
            f"serve.kv_cache: the graph has no single [1, T] input named *{suffix}; serving graphs "
            f"are captured from model(input_ids=[1, T], position_ids=[1, T], use_cache=False) "
            f"(kiln.compile_serving / `kiln compile`)")
    return found[0]


def _fresh_symbol(g: Graph, taken: set[str], lo: int, hi: int, hint: int) -> sympy.Symbol:
    k = 0
    while f"s{k}" in taken:
        k += 1
    name = f"s{k}"
    taken.add(name)
    g.sym_ranges[name] = (lo, hi)
    g.sym_hints[name] = hint
    return sym(name)


def _cone_inputs(v: Value) -> set[Value]:
    """Graph inputs that `v` depends on."""
    seen, out, todo = set(), set(), [v]
    while todo:
        x = todo.pop()
        if not isinstance(x, Value) or x in seen:
            continue
        seen.add(x)
        if x.is_input:
            out.add(x)
        else:
            todo.extend(x.producer.operands())
    return out


@register_pass("serve.kv_cache", "flat-batch capture -> paged attention over the runtime's KV "
               "cache blocks, batch metadata inputs, LM head on each sequence's last token",
               serving_only=True)
def serve_kv_cache(g: Graph, ctx: PassContext) -> int:
    block_size = int(ctx.options.get("block_size") or DEFAULT_BLOCK_SIZE)
    old_ids = _find_input(g, "input_ids")
    old_pos = _find_input(g, "position_ids")
    T = old_ids.type.shape[1]
    if not isinstance(T, sympy.Symbol) or old_pos.type.shape[1] != T:
        raise NotAServingCapture("serve.kv_cache: input_ids and position_ids must share one "
                                 "symbolic token count (capture with the length marked dynamic)")
    attns = [n for n in g.nodes if n.op == "kiln.attention"]
    if not attns:
        raise NotAServingCapture("serve.kv_cache: no kiln.attention in the graph (did "
                                 "fuse.attention run?)")
    taken = set(g.sym_ranges) | g.symbols()
    g.sym_ranges[T.name] = (1, g.sym_ranges.get(T.name, (1, MAX_DIM))[1])   # a decode step of one sequence is one token
    N = _fresh_symbol(g, taken, 1, MAX_DIM, 3)
    B = _fresh_symbol(g, taken, 1, MAX_DIM, 5)
    NB = _fresh_symbol(g, taken, 1, MAX_DIM, 7)
    g.meta["_serve_fake_env"] = FakeEnv(g.sym_ranges, g.sym_hints)
    try:
        return _rewrite(g, ctx, old_ids, old_pos, T, N, B, NB, attns, block_size)
    finally:
        del g.meta["_serve_fake_env"]


def _rewrite(g: Graph, ctx: PassContext, old_ids: Value, old_pos: Value, T, N, B, NB,
             attns: list[Node], block_size: int) -> int:
    # -- batch inputs ---------------------------------------------------------------------------
    i64, i32 = torch.int64, torch.int32
    new = dict(zip(BATCH_INPUTS, (   # input_ids, positions, slot_mapping, block_tables, ...
        TensorType(i64, (T,)), TensorType(old_pos.type.dtype, (T,)), TensorType(i64, (T,)),
        TensorType(i32, (N, B)), TensorType(i32, (N,)), TensorType(i32, (N + 1,)))))
    for v in g.inputs:
        if v.name in new and v not in (old_ids, old_pos):
            raise NotAServingCapture(f"serve.kv_cache: the graph already has an input %{v.name}")
    batch = {name: Value(t, name) for name, t in new.items()}
    first = g.nodes[0]
    ids2 = _insert(g, first, "aten.unsqueeze", batch["input_ids"], dim=0)
    pos2 = _insert(g, first, "aten.unsqueeze", batch["positions"], dim=0)
    num_tokens = g.add_node("sym.size", [batch["input_ids"]], {"dim": 0}, [SymIntType(T)],
                            before=first).results[0]
    mapping = {old_ids: ids2, old_pos: pos2}
    dropped = {old_ids, old_pos}
    for v in g.inputs:
        if isinstance(v.type, SymIntType) and v.type.expr == T:
            mapping[v] = num_tokens
            dropped.add(v)
    g.replace_uses(mapping)

    # -- attention -> paged attention ------------------------------------------------------------
    caches: list[Value] = []
    for layer, n in enumerate(attns):
        if not ctx.allow():
            raise NotAServingCapture("serve.kv_cache: KILN_PASS_LIMIT stopped the pass part-way; "
                                     "a serving graph needs every attention paged")
        q, k, v, mask = n.args
        for name, x in (("q", q), ("k", k), ("v", v)):
            s = x.type.shape
            if x.type.rank != 4 or s[0] != 1 or s[2] != T:
                raise NotAServingCapture(f"serve.kv_cache: attention {layer}: {name} is {x.type}, "
                                         f"expected [1, heads, T, head_dim] over the flat batch")
        window = _causal_window(g, n, layer, batch)
        hkv, d = k.type.shape[1], k.type.shape[3]
        cache_t = TensorType(k.type.dtype, (NB, block_size, hkv, d))
        kc = Value(cache_t, cache_input_name(layer, "k"))
        vc = Value(cache_t, cache_input_name(layer, "v"))
        caches += [kc, vc]

        def flat(x):   # [1, H, T, D] -> [T, H, D], a view
            return _insert(g, n, "aten.permute", _insert(g, n, "aten.select", x, dim=0, index=0),
                           dims=[1, 0, 2])
        args = [flat(q), flat(k), flat(v), kc, vc, batch["slot_mapping"], batch["block_tables"],
                batch["context_lens"], batch["query_start"]]
        attrs = {"scale": n.attrs["scale"], **({"window": window} if window is not None else {})}
        out = g.add_node("kiln.paged_attention", args, attrs,
                         [TensorType(q.type.dtype, (T, q.type.shape[1], d))], before=n).results[0]
        back = _insert(g, n, "aten.unsqueeze", _insert(g, n, "aten.permute", out, dims=[1, 0, 2]),
                       dim=0)
        assert back.type == n.results[0].type, (back.type, n.results[0].type)
        g.replace_all_uses(n.results[0], back)
    g.remove_nodes(attns)

    # -- logits of each sequence's last new token only ------------------------------------------
    _gather_last_tokens(g, batch["query_start"], T)

    weights = [v for v in g.inputs if v not in dropped]
    g.inputs = list(batch.values()) + caches + weights
    dce(g)
    return len(attns)


def _causal_window(g: Graph, n: Node, layer: int, batch: dict[str, Value]) -> int | None:
    """The sliding window of a causal attention over the flat batch (None: no window).
    Paged attention attends each sequence causally, and that is what the model does when its
    mask (if any) says causal (and maybe a window) in positions (kiln.ir.masks), ANDed
    with terms of the positions alone that keep each packed sequence to itself. Those terms
    are not read, so the mask is also run on probe sequences and must agree."""
    q, k, _, mask = n.args
    causal, window = n.attrs["causal"], n.attrs.get("window")
    if mask is None:
        if not causal:
            raise NotAServingCapture(f"serve.kv_cache: attention {layer} is not causal; paged "
                                     f"attention serves causal decoders only")
        return window
    if not _cone_inputs(mask) <= {batch["positions"], batch["input_ids"]}:
        raise NotAServingCapture(
            f"serve.kv_cache: attention {layer}'s mask depends on more than the positions (a "
            f"padding mask?); only causal attention over each sequence can be paged")
    form = mask_form(mask, q.type.shape[2], k.type.shape[2])
    what = (f"serve.kv_cache: attention {layer}'s mask is not causal attention over each "
            f"sequence's positions")
    if form is None or form.positions not in (None, batch["positions"]) or not (form.causal or causal):
        raise NotAServingCapture(f"{what} (a bidirectional prefix?); only causal attention, "
                                 f"with or without a sliding window, can be paged")
    windows = [w for w in (window, form.window) if w is not None]
    window = min(windows) if windows else None
    _probe_mask(g, mask, layer, window, batch, what)
    return window


def _probe_mask(g: Graph, mask: Value, layer: int, window: int | None, batch: dict[str, Value],
                what: str) -> None:
    """Run the mask's producers on one sequence's positions, from 0 and from a cached prefix
    on, long enough to show any window its constants could make, and compare with causal
    attention over that window."""
    cone = _cone_nodes(g, mask)
    literals = [a for nd in cone for a in nd.args + list(nd.attrs.values())
                if isinstance(a, int) and not isinstance(a, bool) and 0 < a < PROBE_MAX_TOKENS]
    length = max([PROBE_MIN_TOKENS, *(x + 2 for x in literals)])
    for start in (0, 5):
        pos = torch.arange(start, start + length, dtype=batch["positions"].type.dtype)
        env = {batch["positions"]: pos, batch["input_ids"]: torch.zeros(length, dtype=torch.int64)}
        for nd in cone:
            out = get_op(nd.op).impl(*_on_cpu(map_values(nd.args, env.__getitem__)),
                                     **{a: _on_cpu(map_values(x, env.__getitem__))
                                        for a, x in nd.attrs.items()})
            env.update(zip(nd.results, out if len(nd.results) > 1 else [out]))
        m = env[mask]
        seen = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        seen = seen.expand(*seen.shape[:-2], length, length).reshape(-1, length, length)
        want = visible_keys(length, length, True, window)
        if not all(torch.equal(s, want) for s in seen):
            raise NotAServingCapture(f"{what}: on one sequence of {length} tokens from position "
                                     f"{start} it is not causal"
                                     + (f" with a window of {window}" if window else ""))


def _on_cpu(a):
    """The probe runs on the host whatever device the graph was captured for."""
    if isinstance(a, torch.device):
        return torch.device("cpu")
    if isinstance(a, list):
        return [_on_cpu(x) for x in a]
    return a


def _cone_nodes(g: Graph, v: Value) -> list[Node]:
    """The nodes `v` depends on, in graph order."""
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        if not isinstance(x, Value) or x.is_input or x.producer in seen:
            continue
        seen.add(x.producer)
        todo.extend(x.producer.operands())
    return [nd for nd in g.nodes if nd in seen]


def _gather_last_tokens(g: Graph, query_start: Value, T) -> None:
    """The logits (the first output) of each sequence's last new token only. Outputs after
    the logits (a per-token hidden state, serve.hidden_states) keep every token."""
    if not g.outputs:
        raise NotAServingCapture("serve.kv_cache: the graph has no output (expected the logits)")
    chain: list[tuple[Node, Value]] = []   # (node, its tensor operand): LM head -> output
    v = g.outputs[0]
    uses = g.use_counts()
    while not v.is_input and v.producer.op not in _HEADS and v.producer.op != _REFINE:
        n = v.producer
        op = get_op(n.op)
        tensors = [a for a in n.operands() if isinstance(a.type, TensorType)]
        if not (n.op in _TOKEN_ORDER_VIEWS or op.has("elementwise") or _GATHERS_VOCAB(n)) \
                or len(tensors) != 1 or len(n.results) != 1:
            raise NotAServingCapture(f"serve.kv_cache: cannot find the LM head: the logits come "
                                     f"from {n.op}")
        chain.append((n, tensors[0]))
        v = tensors[0]
    if v.is_input:
        raise NotAServingCapture("serve.kv_cache: the logits are a graph input")
    head = v.producer
    if uses.get(v, 0) != 1 or any(uses.get(c.results[0], 0) != 1 for c, _ in chain[1:]):
        raise NotAServingCapture("serve.kv_cache: the LM head's output has other users")
    refine = None
    if head.op == _REFINE:   # a quantised head whose top logits are recomputed: both run on
        refine, v = head, head.args[0]    # the last tokens
        if v.is_input or v.producer.op not in _HEADS or uses.get(v, 0) != 1:
            raise NotAServingCapture(f"serve.kv_cache: cannot find the LM head: {_REFINE} "
                                     f"refines logits that are not a linear's alone")
        head = v.producer
    a_index = _HEADS[head.op]
    a = head.args[a_index]
    if a.type.rank != 2 or a.type.shape[0] != T:
        raise NotAServingCapture(f"serve.kv_cache: LM head input is {a.type}, expected [T, hidden]")
    last = _insert(g, head, "aten.sub", _insert(g, head, "aten.slice", query_start, dim=0, start=1), 1)
    rows = {a_index: _insert(g, head, "aten.index_select", a, dim=0, index=last)}
    if head.op == "kiln.scaled_mm":   # the per-token activation scale follows its rows
        rows[1] = _insert(g, head, "aten.index_select", head.args[1], dim=0, index=last)
    for i, r in rows.items():
        head.args[i] = r
    env = g.meta.get("_serve_fake_env")
    head.results[0].type = infer_types(head.op, head.args, head.attrs, g, env)[0]
    out = head.results[0]
    if refine is not None:
        x = refine.args[1]
        refine.args[1] = rows[a_index] if x is a else _insert(g, head, "aten.index_select", x,
                                                              dim=0, index=last)
        refine.results[0].type = infer_types(refine.op, refine.args, refine.attrs, g, env)[0]
        out = refine.results[0]
    # Views put the token dim back ([T, V] -> [1, T, V]); drop them, re-type the rest.
    dead = []
    for n, x in reversed(chain):
        if n.op in _TOKEN_ORDER_VIEWS:
            g.replace_all_uses(n.results[0], out)
            dead.append(n)
            continue
        n.replace_uses({x: out})
        n.results[0].type = infer_types(n.op, n.args, n.attrs, g, g.meta.get("_serve_fake_env"))[0]
        out = n.results[0]
    g.remove_nodes(dead)
    g.outputs = [out] + g.outputs[1:]
