"""Attention masks that only say "causal" and/or "sliding window" become kiln.attention's
`causal` and `window` attributes (kiln.ir.masks reads them, rules/attention.kiln's
attention_index_mask applies them), whatever order and spelling the terms come in; masks
over positions an input supplies stay masks; and the compiled function computes what eager
does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.ir import parse
from kiln.ir.kiln_ref import attention as ref_attention, visible_keys
from kiln.ir.masks import mask_form

W = 3


def causal_tril(q, k, v):
    m = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def window_compare(q, k, v):
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < W))


def window_reversed_terms(q, k, v):
    i = torch.arange(q.shape[2]).view(-1, 1)
    j = torch.arange(k.shape[2]).view(1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j > i - W) & (i >= j))


def causal_float_triu(q, k, v):
    m = torch.full((q.shape[2], k.shape[2]), float("-inf")).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def window_tril_triu(q, k, v):
    m = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril().triu(-(W - 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def window_bottom_right(q, k, v):
    sq, skv = q.shape[2], k.shape[2]
    i = torch.arange(skv - sq, skv)[:, None]
    j = torch.arange(skv)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i >= j) & (j > i - W))


def window_min_value(q, k, v):
    """HF's eager form: where(mask, 0, finfo.min), added to the scores by hand."""
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    m = torch.where((j <= i) & (j > i - W), 0.0, torch.finfo(q.dtype).min)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + m
    return torch.softmax(s, dim=-1) @ v


CASES = [  # (function, query length, expected attributes)
    (causal_tril, 8, {"causal": True}),
    (window_compare, 8, {"causal": True, "window": W}),
    (window_reversed_terms, 8, {"causal": True, "window": W}),
    (causal_float_triu, 8, {"causal": True}),
    (window_tril_triu, 8, {"causal": True, "window": W}),
    (window_bottom_right, 3, {"causal": True, "window": W}),
    (window_min_value, 8, {"causal": True, "window": W}),
]


@pytest.mark.parametrize("fn, sq, attrs", CASES, ids=[c[0].__name__ for c in CASES])
def test_index_masks_become_attributes(fn, sq, attrs):
    q, k, v = torch.randn(1, 2, sq, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    graphs = []
    torch._dynamo.reset()
    out = torch.compile(fn, backend="kiln", options={"observer": graphs.append})(q, k, v)
    (attn,) = [n for n in graphs[0].graph.nodes if n.op == "kiln.attention"]
    assert attn.args[3] is None, "the mask should be gone"
    assert {a: x for a, x in attn.attrs.items() if a != "scale"} == attrs
    want = fn(q, k, v)
    assert ((out - want).norm() / want.norm()).item() < 1e-6


def test_hf_chain_over_cache_positions_stays_a_mask():
    """A StaticCache's mask compares the keys' indices with positions read from an input
    (cache_position): nothing says those are consecutive, so it is not read as causal."""
    g = parse("""func @forward(%cache_position: i64[4]) -> bool[1, 1, 4, 16] {
  %0 = aten.arange(0, 16, layout=layout.strided, device=device("cpu"), pin_memory=false) : i64[16]
  %1 = aten.reshape(%0, shape=[1, 1, 1, 16]) : i64[1, 1, 1, 16]
  %2 = aten.reshape(%cache_position, shape=[1, 1, 4, 1]) : i64[1, 1, 4, 1]
  %3 = aten.le(%1, %2) : bool[1, 1, 4, 16]
  return %3
}
""")
    assert mask_form(g.outputs[0], 4, 16) is None


def test_position_form_with_opaque_terms():
    """serve.kv_cache's case: positions read from one input, ANDed with a term the reading
    does not understand (here: the same document id)."""
    g = parse("""func @forward(%pos: i64[6], %doc: i64[6]) -> bool[1, 1, 6, 6] {
  %0 = aten.reshape(%pos, shape=[1, 1, 6, 1]) : i64[1, 1, 6, 1]
  %1 = aten.reshape(%pos, shape=[1, 1, 1, 6]) : i64[1, 1, 1, 6]
  %2 = aten.le(%1, %0) : bool[1, 1, 6, 6]
  %3 = aten.sub(%0, 7) : i64[1, 1, 6, 1]
  %4 = aten.gt(%1, %3) : bool[1, 1, 6, 6]
  %5 = aten.reshape(%doc, shape=[1, 1, 6, 1]) : i64[1, 1, 6, 1]
  %6 = aten.reshape(%doc, shape=[1, 1, 1, 6]) : i64[1, 1, 1, 6]
  %7 = aten.abs(%5) : i64[1, 1, 6, 1]
  %8 = aten.eq(%7, %6) : bool[1, 1, 6, 6]
  %9 = aten.bitwise_and(%2, %4) : bool[1, 1, 6, 6]
  %10 = aten.bitwise_and(%9, %8) : bool[1, 1, 6, 6]
  return %10
}
""")
    form = mask_form(g.outputs[0], 6, 6)
    assert form.causal and form.window == 7 and form.positions is g.inputs[0]
    assert [n.op for n in (v.producer for v in form.opaque)] == ["aten.eq"]


@pytest.mark.parametrize("mask, why", [
    ("""  %3 = aten.lt(%j, %i) : bool[6, 6]
  return %3""", "strictly below the diagonal is not causal"),
    ("""  %3 = aten.add(%i, 1) : i64[6, 1]
  %4 = aten.le(%j, %3) : bool[6, 6]
  return %4""", "one key past the diagonal"),
    ("""  %3 = aten.mul(%j, 2) : i64[1, 6]
  %4 = aten.le(%3, %i) : bool[6, 6]
  return %4""", "a slope other than one"),
])
def test_masks_that_are_not_causal_or_window_are_left_alone(mask, why):
    g = parse(f"""func @forward(%x: f32[6]) -> bool[6, 6] {{
  %0 = aten.arange(0, 6) : i64[6]
  %i = aten.reshape(%0, shape=[6, 1]) : i64[6, 1]
  %j = aten.reshape(%0, shape=[1, 6]) : i64[1, 6]
{mask}
}}
""")
    assert mask_form(g.outputs[0], 6, 6) is None, why


@pytest.mark.parametrize("sq, skv, causal, window", [
    (5, 5, True, 2), (3, 9, True, 4), (4, 4, False, 2), (6, 6, True, 10), (1, 7, True, 3)])
def test_reference_window_is_the_explicit_mask(sq, skv, causal, window):
    """kiln_ref.attention's window equals an explicit mask of p_i - j < window, and the
    cpu target's kernel agrees."""
    from kiln.backends.cpu_kernels import attention as cpu_attention
    q, k, v = torch.randn(2, 4, sq, 8), torch.randn(2, 2, skv, 8), torch.randn(2, 2, skv, 8)
    p = torch.arange(skv - sq, skv)[:, None]
    j = torch.arange(skv)[None, :]
    keep = (p - j < window) & ((j <= p) if causal else True)
    assert torch.equal(visible_keys(sq, skv, causal, window), keep)
    want = ref_attention(q, k, v, keep, 0.3, False)
    assert torch.allclose(ref_attention(q, k, v, None, 0.3, causal, window), want, atol=1e-6)
    assert torch.allclose(cpu_attention(q, k, v, None, 0.3, causal, window), want, atol=1e-5)
