"""The fused `kiln.*` operators, declared as data.

Each entry names its operands (tensors, or `none` for an absent optional one) and its
attributes (constants); the reference implementation in `kiln_ref` defines the semantics
and, run on fake tensors, the result types — unless an entry gives `infer` because the
reference is data-dependent.
"""
from __future__ import annotations

import torch

from . import kiln_ref
from .ops import OpDef, register
from .types import TensorType


def _like_first(args, attrs):
    return [args[0].type]


def _attention_type(args, attrs):
    """[B, Hq, Sq, Dv] in q's dtype. By rule: on the H100 (torch 2.11) fake execution of the
    reference typed a serving capture's query length as its example size."""
    q, v = args[0].type, args[2].type
    return [TensorType(q.dtype, tuple(q.shape[:-1]) + (v.shape[-1],))]


def _rope_store_type(args, attrs):
    """(rotated q, k_cache, v_cache): q's rope type, the caches' own types."""
    q, cos, sin = (a.type for a in (args[0], args[3], args[4]))
    dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    return [TensorType(dtype, q.shape), args[5].type, args[6].type]


def _all_gather_type(args, attrs):
    """x's type with dim `dim` world_size times longer."""
    x = args[0].type
    shape = list(x.shape)
    d = _collective_dim(x, attrs)
    shape[d] = shape[d] * attrs["world_size"]
    return [TensorType(x.dtype, tuple(shape))]


def _reduce_scatter_type(args, attrs):
    """x's type with dim `dim` world_size times shorter (it must divide)."""
    x = args[0].type
    shape = list(x.shape)
    d = _collective_dim(x, attrs)
    n = attrs["world_size"]
    if not isinstance(shape[d], int) or shape[d] % n:
        raise ValueError(f"kiln.reduce_scatter: dim {attrs['dim']} of {x} does not split into "
                         f"{n} equal parts")
    shape[d] //= n
    return [TensorType(x.dtype, tuple(shape))]


def _collective_dim(x, attrs) -> int:
    n, d = attrs["world_size"], attrs["dim"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"world_size must be a positive int, got {n!r}")
    if not isinstance(d, int) or not -x.rank <= d < x.rank:
        raise ValueError(f"dim {d!r} is not a dim of {x}")
    return d % x.rank


def _quant_int4_type(args, attrs):
    """(w_q uint8 [N, K/2], w_sz [K/G, N, 2]): typed without running (the reference's grid
    search reads the values)."""
    w = args[0].type
    g = attrs.get("group_size", 32)
    n, k = w.shape
    why = kiln_ref.int4_fits(n, k, g)
    if why is not None:
        raise ValueError(f"kiln.quant_int4: weight {w}: {why}")
    return [TensorType(torch.uint8, (n, k // 2)),
            TensorType(attrs.get("scale_dtype", torch.float32), (k // g, n, 2))]


def _quant_int8_grouped_type(args, attrs):
    """(w_q int8 [N/64, K, 64], w_sz float32 [K/G, 2, N]): typed without running (the
    reference's grid check reads the values)."""
    w = args[0].type
    g = attrs.get("group_size", 32)
    n, k = w.shape
    why = kiln_ref.int8_grouped_fits(n, k, g)
    if why is not None:
        raise ValueError(f"kiln.quant_int8_grouped: weight {w}: {why}")
    return [TensorType(torch.int8, (n // kiln_ref.INT8_BLOCK_N, k, kiln_ref.INT8_BLOCK_N)),
            TensorType(torch.float32, (k // g, 2, n))]


def _load_slots_type(args, attrs):
    """[T, elements a slot] in the pool's dtype (typed without running: the pool's block
    count is a symbol)."""
    pool, slots = args[0].type, args[1].type
    row = 1
    for d in pool.shape[2:]:
        row = row * d
    return [TensorType(pool.dtype, (slots.shape[0], row))]


def _all_reduce_type(args, attrs):
    n = attrs["world_size"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"world_size must be a positive int, got {n!r}")
    return [args[0].type]


def _all_reduce_add_rms_norm_type(args, attrs):
    """fused_add_rms_norm's types (the sum has x's type whatever the rank count)."""
    from .ops import infer_types
    _all_reduce_type(args, attrs)
    return infer_types("kiln.fused_add_rms_norm", list(args), {"eps": attrs["eps"]})


# name: (operands, attributes, reference, traits, infer)
KILN_OPS = {
    "rms_norm": (("x", "weight"), ("eps",), kiln_ref.rms_norm, (), None),
    "fused_add_rms_norm": (("x", "residual", "weight"), ("eps",), kiln_ref.fused_add_rms_norm, (), None),
    "rope": (("x", "cos", "sin"), (), kiln_ref.rope, (), None),
    "rope_pair": (("q", "k", "cos", "sin"), (), kiln_ref.rope_pair, (), None),
    # fuse.rope_store: writes rotated k and v into k_cache/v_cache (operands 5 and 6).
    "rope_pair_store": (("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "index"), (),
                        kiln_ref.rope_pair_store, ("mutates",), _rope_store_type),
    "silu_mul": (("gate", "up"), (), kiln_ref.silu_mul, ("elementwise",), None),
    # fuse.prologue: the norm or activation computed in the prologue of the GEMM it feeds
    "rms_norm_mm": (("x", "weight", "b"), ("eps",), kiln_ref.rms_norm_mm, (), None),
    "fused_add_rms_norm_mm": (("x", "residual", "weight", "b"), ("eps",),
                              kiln_ref.fused_add_rms_norm_mm, (), None),
    "silu_mul_mm": (("gate", "up", "b"), (), kiln_ref.silu_mul_mm, (), None),
    "mm": (("x", "b"), (), kiln_ref.mm, (), None),
    "attention": (("q", "k", "v", "mask"), ("scale", "causal", "window"), kiln_ref.attention, (),
                  _attention_type),
    "fused_moe": (("x", "router_logits", "w_gate_up", "w_down"),
                  ("top_k", "renormalize", "expert_start"), kiln_ref.fused_moe, (), _like_first),
    "quant_fp8": (("x", "scale"), ("fp8_dtype",), kiln_ref.quant_fp8, (), None),
    "quant_int8": (("x",), (), kiln_ref.quant_int8, (), None),
    "rms_norm_quant": (("x", "weight"), ("eps", "qdtype"), kiln_ref.rms_norm_quant, (), None),
    "fused_add_rms_norm_quant": (("x", "residual", "weight"), ("eps", "qdtype"),
                                 kiln_ref.fused_add_rms_norm_quant, (), None),
    "silu_mul_quant": (("gate", "up"), ("qdtype",), kiln_ref.silu_mul_quant, (), None),
    "scaled_mm": (("a", "a_scale", "b", "b_scale", "bias"), ("out_dtype",), kiln_ref.scaled_mm,
                  (), None),
    "weight_int8_mm": (("x", "w_q", "w_scale", "bias"), (), kiln_ref.weight_int8_mm, (), None),
    "quant_int4": (("w",), ("group_size", "scale_dtype"), kiln_ref.quant_int4, (), _quant_int4_type),
    "weight_int4_mm": (("x", "w_q", "w_sz", "bias"), ("group_size",), kiln_ref.weight_int4_mm,
                       (), None),
    "quant_int8_grouped": (("w",), ("group_size",), kiln_ref.quant_int8_grouped, (),
                           _quant_int8_grouped_type),
    "weight_int8_grouped_mm": (("x", "w_q", "w_sz", "bias"), (), kiln_ref.weight_int8_grouped_mm,
                               (), None),
    "refine_top_logits": (("logits", "x", "w", "bias"), ("k",), kiln_ref.refine_top_logits, (),
                          _like_first),
    # Serving (serve.kv_cache): writes k/v into k_cache/v_cache (operands 3 and 4).
    "paged_attention": (("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "block_tables",
                         "context_lens", "query_start"), ("scale", "window"), kiln_ref.paged_attention,
                        ("mutates",), _like_first),   # typed without running: reads metadata on the host
    # Serving (serve.hidden_states): a per-token state in a paged pool beside the KV cache.
    "store_slots": (("pool", "slot_mapping", "x"), (), kiln_ref.store_slots, ("mutates",),
                    _like_first),
    "load_slots": (("pool", "slot_mapping"), (), kiln_ref.load_slots, (), _load_slots_type),
    # Collectives over the ranks of the default torch.distributed group (shard.tensor_parallel
    # inserts them; world_size=1 is the identity). Never CSE'd, dropped or hoisted.
    "all_reduce": (("x",), ("world_size",), kiln_ref.all_reduce, ("collective",), _all_reduce_type),
    "all_gather": (("x",), ("dim", "world_size"), kiln_ref.all_gather, ("collective",),
                   _all_gather_type),
    "reduce_scatter": (("x",), ("dim", "world_size"), kiln_ref.reduce_scatter, ("collective",),
                       _reduce_scatter_type),
    # fuse.collective: all_reduce, residual add, rms_norm -> (normed, new residual).
    "all_reduce_add_rms_norm": (("x", "residual", "weight"), ("eps", "world_size"),
                                kiln_ref.all_reduce_add_rms_norm, ("collective",),
                                _all_reduce_add_rms_norm_type),
}
# Operands a `mutates` kiln op writes in place (default: its first operand).
MUTATED_OPERANDS = {"paged_attention": (3, 4), "rope_pair_store": (5, 6)}
# Attributes that may be left out, and the value they then have (the reference's default).
# Like ATen's schema defaults, an attribute equal to its default is absent from the node, so
# the IR text names a sliding window only where there is one.
ATTR_DEFAULTS = {"attention": {"window": None}, "paged_attention": {"window": None},
                 "fused_moe": {"expert_start": 0},
                 "quant_int4": {"group_size": 32, "scale_dtype": torch.float32},
                 "weight_int4_mm": {"group_size": 32}, "quant_int8_grouped": {"group_size": 32},
                 "refine_top_logits": {"k": 16}}

for _name, (_operands, _attrs, _ref, _traits, _infer) in KILN_OPS.items():
    register(OpDef(f"kiln.{_name}", _ref, frozenset(_traits), infer=_infer,
                   doc=(_ref.__doc__ or "").strip().split("\n")[0],
                   operands=_operands, attr_names=_attrs,
                   attr_defaults=ATTR_DEFAULTS.get(_name, {}),
                   extra={"mutated_operands": MUTATED_OPERANDS.get(_name, (0,))}
                   if "mutates" in _traits else {}))


def _unbound_call(*args, callee: str):
    raise RuntimeError(f"kiln.call(callee={callee!r}) runs a function of its graph: run the "
                       f"graph with kiln.ir.run or a compiled wrapper, not the op alone")


# A call of one of the graph's own functions (`Graph.functions`): the kernels `schedule`
# outlines. Typed by the callee's results; run by running the callee.
register(OpDef("kiln.call", _unbound_call, frozenset({"calls"}),
               doc="calls a function of the same graph (a kernel outlined by schedule)"))
