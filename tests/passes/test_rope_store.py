"""fuse.rope_store: a layer's rope_pair and its KV-cache writes of rotated k and of v become
one kiln.rope_pair_store on Triton targets, only where moving the writes changes nothing
another node sees; the fused graph computes what the unfused one does (reference
interpreter, caches updated in place)."""
from __future__ import annotations

import pytest
import torch

from kiln.backends.targets import get_target
from kiln.ir import parse, print_graph, run, verify
from kiln.passes import PassManager

# One decode layer as HF's StaticCache writes it: rotated k and v into rows %rows.
LAYER = """func @f(%q: f32[1, 4, 1, 16], %k: f32[1, 2, 1, 16], %v: f32[1, 2, 1, 16], %cos: f32[1, 1, 16], %sin: f32[1, 1, 16], %keys: f32[1, 2, 8, 16], %values: f32[1, 2, 8, 16], %rows: i64[1]) -> (f32[1, 4, 1, 16], f32[1, 2, 8, 16]) {
  %0, %1 = kiln.rope_pair(%q, %k, %cos, %sin) : (f32[1, 4, 1, 16], f32[1, 2, 1, 16])
  %2 = aten.index_put_(%keys, [none, none, %rows], %1) : f32[1, 2, 8, 16]
  %3 = aten.index_put_(%values, [none, none, %rows], %v) : f32[1, 2, 8, 16]
  %4 = BETWEEN
  %5 = aten.add(%0, %0) : f32[1, 4, 1, 16]
  return %5, %4
}
"""


def _fuse(text, target="cuda"):
    g = parse(text)
    pm = PassManager(passes=["fuse.rope_store"], verify_each=True,
                     options={"target": get_target(target)})
    pm.run(g)
    return g, pm.stats[0].rewrites


def _inputs(g):
    torch.manual_seed(0)
    args = [torch.randn([int(d) for d in v.type.shape]) for v in g.inputs[:-1]]
    return args + [torch.tensor([5])]


@pytest.mark.parametrize("between", [
    "aten.mul(%3, 2.0) : f32[1, 2, 8, 16]",                          # reads the v write's result
    "aten.index_copy_(%values, 2, %rows, %v) : f32[1, 2, 8, 16]",    # a later write of v
])
def test_writes_fold_into_the_rope_launch_and_compute_the_same(between):
    text = LAYER.replace("BETWEEN", between)
    g, n = _fuse(text)
    ops = [node.op for node in g.nodes]
    assert n == 1 and ops.count("kiln.rope_pair_store") == 1, print_graph(g)
    assert "kiln.rope_pair" not in ops and ops.count("aten.index_put_") == 0
    verify(parse(print_graph(g)))
    assert print_graph(parse(print_graph(g))) == print_graph(g)
    ref_args, args = _inputs(parse(text)), _inputs(g)
    ref = run(parse(text), ref_args)
    out = run(g, args)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for cache in (5, 6):   # the caches written in place alike
        torch.testing.assert_close(args[cache], ref_args[cache], rtol=1e-6, atol=1e-6)


def test_index_copy_writes_fold_too():
    text = (LAYER.replace("aten.index_put_(%keys, [none, none, %rows], %1)",
                          "aten.index_copy_(%keys, 2, %rows, %1)")
            .replace("aten.index_put_(%values, [none, none, %rows], %v)",
                     "aten.index_copy_(%values, 2, %rows, %v)")
            .replace("BETWEEN", "aten.mul(%3, 2.0) : f32[1, 2, 8, 16]"))
    g, n = _fuse(text)
    assert n == 1 and [node.op for node in g.nodes].count("kiln.rope_pair_store") == 1


def test_a_read_of_the_old_cache_between_keeps_the_writes_apart():
    # v written before the rope: a read of %values between the v write and the k write
    # sees the new rows; folding the v write later would change what it reads.
    text = """func @f(%q: f32[1, 4, 1, 16], %k: f32[1, 2, 1, 16], %v: f32[1, 2, 1, 16], %cos: f32[1, 1, 16], %sin: f32[1, 1, 16], %keys: f32[1, 2, 8, 16], %values: f32[1, 2, 8, 16], %rows: i64[1]) -> (f32[1, 2, 8, 16], f32[1, 2, 8, 16], f32[1, 4, 1, 16]) {
  %0 = aten.index_put_(%values, [none, none, %rows], %v) : f32[1, 2, 8, 16]
  %1 = aten.mul(%values, 2.0) : f32[1, 2, 8, 16]
  %2, %3 = kiln.rope_pair(%q, %k, %cos, %sin) : (f32[1, 4, 1, 16], f32[1, 2, 1, 16])
  %4 = aten.index_put_(%keys, [none, none, %rows], %3) : f32[1, 2, 8, 16]
  return %1, %4, %2
}
"""
    g, n = _fuse(text)
    assert n == 0 and "kiln.rope_pair_store" not in print_graph(g)


def test_the_cpu_target_keeps_its_index_writes():
    g, n = _fuse(LAYER.replace("BETWEEN", "aten.mul(%3, 2.0) : f32[1, 2, 8, 16]"), target="cpu")
    assert n == 0 and "kiln.rope_pair(" in print_graph(g)
