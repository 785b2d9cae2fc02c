"""canonicalize and the pass manager on hand-written IR: each rewrite is checked for
what it removes and, through the reference interpreter, for what it must not change."""
from __future__ import annotations

import pytest
import torch

from kiln.ir import parse, print_graph, run, verify
from kiln.passes import PassManager

GRAPH = """func @forward(%x: f32[s0, 8], %w: f32[8]) -> (f32[s0, 8], f32[s0, 8])
    where s0 in [1, 64] {
  %0 = aten.reshape(%x, shape=[-1, 8]) : f32[s0, 8]
  %1 = aten.clone(%0) : f32[s0, 8]
  %2 = prims.convert_element_type(%1, dtype=f64) : f64[s0, 8]
  %3 = prims.convert_element_type(%2, dtype=f32) : f32[s0, 8]
  %4 = aten.mul(%3, %w) : f32[s0, 8]
  %5 = aten.mul(%3, %w) : f32[s0, 8]
  %6 = aten.add(%4, 0) : f32[s0, 8]
  %7 = aten.exp(%5) : f32[s0, 8]
  %8 = aten.slice(%7, dim=0, start=0, end=9223372036854775807) : f32[s0, 8]
  %9 = aten.neg(%x) : f32[s0, 8]
  return %6, %8
}
"""


def _inputs():
    return [torch.randn(5, 8), torch.randn(8)]


def test_removes_noops_casts_duplicates_and_dead_nodes_keeping_values():
    g = parse(GRAPH)
    ins = _inputs()
    before = run(g, ins)
    pm = PassManager(passes=["canonicalize"], verify_each=True)
    pm.run(g)
    verify(g)
    ops = [n.op for n in g.nodes]
    assert ops == ["aten.mul", "aten.exp"], print_graph(g)
    assert pm.stats[0].rewrites > 0
    for a, b in zip(before, run(g, ins)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lossy_cast_round_trip_is_kept():
    g = parse("""func @f(%x: f32[4]) -> f32[4] {
  %0 = prims.convert_element_type(%x, dtype=f16) : f16[4]
  %1 = prims.convert_element_type(%0, dtype=f32) : f32[4]
  return %1
}
""")
    PassManager(passes=["canonicalize"]).run(g)
    assert [n.op for n in g.nodes] == ["prims.convert_element_type"] * 2


def test_clone_of_a_mutated_input_is_kept():
    g = parse("""func @f(%x: f32[4], %y: f32[4]) -> f32[4] {
  %0 = aten.clone(%x) : f32[4]
  %1 = aten.copy_(%x, %y) : f32[4]
  return %0
}
""")
    PassManager(passes=["canonicalize"]).run(g)
    assert [n.op for n in g.nodes] == ["aten.clone", "aten.copy_"]
    x, y = torch.randn(4), torch.randn(4)
    x0 = x.clone()
    out = run(g, [x, y])[0]
    torch.testing.assert_close(out, x0)
    torch.testing.assert_close(x, y)


def test_views_become_reshapes():
    g = parse("""func @f(%x: f32[2, 6]) -> f32[3, 4] {
  %0 = aten.permute(%x, dims=[1, 0]) : f32[6, 2]
  %1 = aten.view(%0, size=[3, 4]) : f32[3, 4]
  return %1
}
""")
    x = torch.randn(2, 6)
    PassManager(passes=["canonicalize"]).run(g)
    assert [n.op for n in g.nodes] == ["aten.permute", "aten.reshape"]
    torch.testing.assert_close(run(g, [x])[0], x.t().reshape(3, 4))


def test_pass_limit_stops_after_n_rewrites():
    sizes = {}
    for limit in (0, 1, 2, None):
        g = parse(GRAPH)
        PassManager(passes=["canonicalize"], rewrite_limit=limit).run(g)
        sizes[limit] = len(g.nodes)
        ins = _inputs()
        for a, b in zip(run(parse(GRAPH), ins), run(g, ins)):
            torch.testing.assert_close(a, b)
    # Only dead code goes without a rewrite budget; each allowed rewrite removes one node.
    assert sizes[0] == len(parse(GRAPH).nodes) - 1
    assert sizes[1] == sizes[0] - 1 and sizes[2] == sizes[0] - 2
    assert sizes[None] == 2


def test_unknown_pass_names_are_reported():
    with pytest.raises(ValueError, match="unknown pass 'fuse.nothing'.*kiln passes"):
        PassManager(disabled={"fuse.nothing"})


def test_dump_dir_gets_one_file_per_pass(tmp_path):
    g = parse(GRAPH)
    PassManager(passes=["canonicalize"], dump_dir=tmp_path).run(g)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_input.kir", "001_canonicalize.kir"]
    assert parse((tmp_path / "001_canonicalize.kir").read_text()) is not None


def test_a_slice_as_long_as_its_dim_is_the_whole_dim():
    # `hidden[:, -1:]` of a one-token decode step (logits_to_keep=1) selects everything
    g = parse("""func @f(%x: f32[1, 1, 8], %y: f32[1, 3, 8]) -> (f32[1, 1, 8], f32[1, 1, 8]) {
  %0 = aten.slice(%x, dim=1, start=-1, end=9223372036854775807) : f32[1, 1, 8]
  %1 = aten.slice(%y, dim=1, start=-1, end=9223372036854775807) : f32[1, 1, 8]
  return %0, %1
}
""")
    PassManager(passes=["canonicalize"]).run(g)
    assert [n.op for n in g.nodes] == ["aten.slice"] and g.nodes[0].args[0].name == "y"
    assert g.outputs[0] is g.inputs[0]


ROTARY = """func @forward(%pos: i64[1, 1, 5], weight %inv_freq: f32[32]) -> (f32[1, 5, 64], f32[1, 5, 64]) {
  %0 = aten.unsqueeze(%inv_freq, dim=0) : f32[1, 32]
  %1 = aten.unsqueeze(%0, dim=2) : f32[1, 32, 1]
  %2 = prims.convert_element_type(%pos, dtype=f32) : f32[1, 1, 5]
  %3 = aten.bmm(%1, %2) : f32[1, 32, 5]
  %4 = aten.permute(%3, dims=[0, 2, 1]) : f32[1, 5, 32]
  %5 = aten.cat([%4, %4], dim=-1) : f32[1, 5, 64]
  %6 = aten.cos(%5) : f32[1, 5, 64]
  %7 = aten.sin(%5) : f32[1, 5, 64]
  return %6, %7
}
"""
ROTARY_AS_MUL = ROTARY.replace(
    "%4 = aten.permute(%3, dims=[0, 2, 1]) : f32[1, 5, 32]\n",
    "%4 = aten.permute(%3, dims=[0, 2, 1]) : f32[1, 5, 32]\n"
    "  %9 = aten.reshape(%2, shape=[1, 5, 1]) : f32[1, 5, 1]\n"
    "  %10 = aten.mul(%9, %inv_freq) : f32[1, 5, 32]\n").replace(
    "aten.cat([%4, %4]", "aten.cat([%10, %10]")


def test_rotary_table_forms():
    """The bmm of length-1 contraction becomes a multiply (exactly), and a repeated product
    with a weight repeats the weight instead, leaving no per-call cat."""
    pos = torch.randint(0, 4096, (1, 1, 5))
    inv = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    g = parse(ROTARY)
    before = run(g, [pos, inv])
    PassManager(passes=["canonicalize", "canonicalize.forms"], verify_each=True).run(g)
    ops = [n.op for n in g.nodes]
    assert "aten.bmm" not in ops and "aten.mul" in ops, print_graph(g)
    for a, b in zip(before, run(g, [pos, inv])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    g = parse(ROTARY_AS_MUL)
    before = run(g, [pos, inv])
    PassManager(passes=["canonicalize", "canonicalize.forms"], verify_each=True).run(g)
    cats = [n for n in g.nodes if n.op == "aten.cat"]
    assert len(cats) == 1 and all(a.name == "inv_freq" for a in cats[0].args[0]), print_graph(g)
    for a, b in zip(before, run(g, [pos, inv])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
