"""reinplace: KV-cache style functional updates become in-place when that is invisible."""
from __future__ import annotations

import torch

from kiln.ir import parse, run, verify
from kiln.passes import PassManager

UPDATE = """func @f(%cache: f32[2, 8, 4], %pos: i64[1], %new: f32[2, 1, 4]) -> f32[2, 8, 4] {
  %0 = aten.index_put(%cache, [none, %pos], %new) : f32[2, 8, 4]
  %1 = aten.mul(%0, 2.0) : f32[2, 8, 4]
  %2 = aten.copy_(%cache, %0) : f32[2, 8, 4]
  return %1
}
"""


def _run(text, passes):
    g = parse(text)
    PassManager(passes=passes).run(g)
    verify(g)
    return g


def test_update_then_copy_back_becomes_one_in_place_update():
    g = _run(UPDATE, ["reinplace"])
    assert [n.op for n in g.nodes] == ["aten.index_put_", "aten.mul"]
    a = _fixed(UPDATE, ["reinplace"])
    b = _fixed(UPDATE, [])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _fixed(text, passes):
    g = parse(text)
    if passes:
        PassManager(passes=passes).run(g)
    gen = torch.Generator().manual_seed(1)
    cache, new = torch.randn(2, 8, 4, generator=gen), torch.randn(2, 1, 4, generator=gen)
    out = run(g, [cache, torch.tensor([3]), new])
    return [cache, *out]  # the mutated input and the outputs


def test_not_in_place_when_the_old_value_is_read_later():
    text = UPDATE.replace("  %2 = aten.copy_(%cache, %0)", "  %3 = aten.sum(%cache) : f32[]\n  %2 = aten.copy_(%cache, %0)")
    g = _run(text, ["reinplace"])
    assert "aten.index_put" in [n.op for n in g.nodes]
    assert "aten.copy_" in [n.op for n in g.nodes]


def test_not_in_place_when_a_view_of_the_old_value_is_read_later():
    text = """func @f(%cache: f32[2, 8, 4], %pos: i64[1], %new: f32[2, 1, 4]) -> f32[2, 8, 4] {
  %0 = aten.slice(%cache, dim=1, start=0, end=4) : f32[2, 4, 4]
  %1 = aten.index_put(%cache, [none, %pos], %new) : f32[2, 8, 4]
  %2 = aten.mul(%0, 2.0) : f32[2, 4, 4]
  %3 = aten.copy_(%cache, %1) : f32[2, 8, 4]
  return %1
}
"""
    a = _fixed(text, ["reinplace"])
    b = _fixed(text, [])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    g = parse(text)
    PassManager(passes=["reinplace"]).run(g)
    assert "aten.copy_" in [n.op for n in g.nodes]
