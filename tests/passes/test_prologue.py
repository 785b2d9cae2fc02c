"""fuse.prologue: on Triton targets a norm or SiLU·mul feeding a GEMM of at most 64 tokens,
or of a token count known only at run time (the launcher then decides per call), becomes
that GEMM's prologue (kiln.rms_norm_mm, kiln.fused_add_rms_norm_mm, kiln.silu_mul_mm);
GEMMs of more static tokens, and the CPU target, keep the ops apart.
The fused graph computes what the unfused one does (reference interpreter)."""
from __future__ import annotations

import pytest
import torch

from kiln.backends.targets import get_target
from kiln.ir import parse, print_graph, run, verify
from kiln.passes import PassManager

# A decoder layer's tail after the fuse.* rules: norm -> qkv GEMM, add+norm -> gate/up GEMM,
# silu_mul -> down GEMM. M tokens.
LAYER = """func @f(%x: f32[1, M, 32], %h: f32[1, M, 32], %wn: f32[32], %wq: f32[48, 32], %wp: f32[32], %wgu: f32[128, 32], %wd: f32[32, 64]) -> (f32[M, 48], f32[M, 32], f32[1, M, 32]) WHERE {
  %0 = kiln.rms_norm(%x, %wn, eps=1e-06) : f32[1, M, 32]
  %1 = aten.reshape(%0, shape=[-1, 32]) : f32[M, 32]
  %2 = aten.permute(%wq, dims=[1, 0]) : f32[32, 48]
  %3 = aten.mm(%1, %2) : f32[M, 48]
  %4, %5 = kiln.fused_add_rms_norm(%x, %h, %wp, eps=1e-06) : (f32[1, M, 32], f32[1, M, 32])
  %6 = aten.reshape(%4, shape=[-1, 32]) : f32[M, 32]
  %7 = aten.permute(%wgu, dims=[1, 0]) : f32[32, 128]
  %8 = aten.mm(%6, %7) : f32[M, 128]
  %9 = aten.slice(%8, dim=1, start=0, end=64) : f32[M, 64]
  %10 = aten.slice(%8, dim=1, start=64, end=128) : f32[M, 64]
  %11 = kiln.silu_mul(%9, %10) : f32[M, 64]
  %12 = aten.permute(%wd, dims=[1, 0]) : f32[64, 32]
  %13 = aten.mm(%11, %12) : f32[M, 32]
  return %3, %13, %5
}
"""
FUSED = ["kiln.rms_norm_mm", "kiln.fused_add_rms_norm_mm", "kiln.silu_mul_mm"]


def _layer(m):
    where = "where s0 in [1, 4096]" if m == "s0" else ""
    return LAYER.replace("M", str(m)).replace("WHERE", where)


def _fuse(text, target="cuda"):
    g = parse(text)
    pm = PassManager(passes=["fuse.prologue", "canonicalize"], verify_each=True,
                     options={"target": get_target(target)})
    pm.run(g)
    return g, pm.stats[0].rewrites


@pytest.mark.parametrize("m", [1, 64, "s0"])
def test_decode_sized_gemms_take_their_norm_or_activation_as_prologue(m):
    text = _layer(m)
    g, n = _fuse(text)
    ops = [node.op for node in g.nodes]
    assert n == 3 and [op for op in ops if op.startswith("kiln.")] == FUSED, print_graph(g)
    assert "aten.mm" not in ops
    assert print_graph(parse(print_graph(g))) == print_graph(g)
    verify(parse(print_graph(g)))
    torch.manual_seed(0)
    args = [torch.randn([3 if not isinstance(d, int) else d for d in v.type.shape])
            for v in g.inputs]
    for got, want in zip(run(g, args), run(parse(text), args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, "s0"])
def test_a_decode_sized_gemm_with_nothing_to_fuse_runs_on_the_same_kernel(m):
    text = _layer(m).replace("kiln.rms_norm(%x, %wn, eps=1e-06)", "aten.neg(%x)")
    g, n = _fuse(text)
    ops = [node.op for node in g.nodes]
    assert n == 3 and ops.count("kiln.mm") == 1 and "aten.mm" not in ops, print_graph(g)
    assert [op for op in ops if op.endswith("_mm")] == FUSED[1:]
    torch.manual_seed(0)
    args = [torch.randn([3 if not isinstance(d, int) else d for d in v.type.shape])
            for v in g.inputs]
    for got, want in zip(run(g, args), run(parse(text), args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, target", [(65, "cuda"), (1, "cpu")])
def test_large_or_dynamic_gemms_and_the_cpu_keep_their_ops(m, target):
    g, n = _fuse(_layer(m), target)
    assert n == 0 and not set(FUSED) & {node.op for node in g.nodes}
