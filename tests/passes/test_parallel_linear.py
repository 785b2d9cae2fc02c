"""fuse.parallel_linear: linears that share their input become one GEMM over concatenated
weights (q/k/v and gate/up of every decoder layer), routers and mismatched weights stay
apart, and the results are unchanged (reference interpreter, and eager on tiny models)."""
from __future__ import annotations

import os

import pytest
import torch

import models
from capture import check_merged
from fusion import compile_and_compare, counts, rel_err
from kiln.ir import parse, print_graph, run, verify
from kiln.passes import PassManager

# q/k/v-like linears on one input, one of them with another K (not mergeable), and a router
# (its linear feeds softmax: fuse.moe matches it, so it stays alone).
QKV = """func @f(%x: f32[s0, 32], %wq: f32[32, 32], %wk: f32[8, 32], %wv: f32[8, 32], %wr: f32[4, 32], %wo: f32[16, 8]) -> (f32[s0, 32], f32[s0, 8], f32[s0, 8], f32[s0, 4], f32[s0, 16])
    where s0 in [1, 64] {
  %0 = aten.permute(%wq, dims=[1, 0]) : f32[32, 32]
  %1 = aten.mm(%x, %0) : f32[s0, 32]
  %2 = aten.permute(%wk, dims=[1, 0]) : f32[32, 8]
  %3 = aten.mm(%x, %2) : f32[s0, 8]
  %4 = aten.permute(%wv, dims=[1, 0]) : f32[32, 8]
  %5 = aten.mm(%x, %4) : f32[s0, 8]
  %6 = aten.permute(%wr, dims=[1, 0]) : f32[32, 4]
  %7 = aten.mm(%x, %6) : f32[s0, 4]
  %8 = aten._softmax(%7, dim=-1, half_to_float=false) : f32[s0, 4]
  %9 = aten.permute(%wo, dims=[1, 0]) : f32[8, 16]
  %10 = aten.mm(%5, %9) : f32[s0, 16]
  return %1, %3, %5, %8, %10
}
"""

BIASED = """func @f(%x: f32[s0, 16], %wg: f32[24, 16], %bg: f32[24], %wu: f32[24, 16], %bu: f32[24], %wd: f32[24, 16]) -> (f32[s0, 24], f32[s0, 24], f32[s0, 24])
    where s0 in [1, 64] {
  %0 = aten.permute(%wg, dims=[1, 0]) : f32[16, 24]
  %1 = aten.addmm(%bg, %x, %0) : f32[s0, 24]
  %2 = aten.permute(%wu, dims=[1, 0]) : f32[16, 24]
  %3 = aten.addmm(%bu, %x, %2) : f32[s0, 24]
  %4 = aten.permute(%wd, dims=[1, 0]) : f32[16, 24]
  %5 = aten.mm(%x, %4) : f32[s0, 24]
  return %1, %3, %5
}
"""


def _fuse(text, passes=("fuse.parallel_linear", "canonicalize")):
    g = parse(text)
    before = parse(text)
    pm = PassManager(passes=list(passes), verify_each=True)
    pm.run(g)
    return before, g, pm.stats[0].rewrites


def _inputs(g, rows=5):
    torch.manual_seed(0)
    shape = lambda v: [rows if not isinstance(d, int) else d for d in v.type.shape]  # noqa: E731
    return [torch.randn(shape(v)) for v in g.inputs]


def test_shared_input_linears_become_one_gemm_and_the_router_stays():
    before, g, n = _fuse(QKV)
    c = counts(g)
    assert n == 1 and c["aten.cat"] == 1 and c["aten.mm"] == 3, print_graph(g)   # qkv, router, wo
    cat = next(node for node in g.nodes if node.op == "aten.cat")
    assert [v.name for v in cat.args[0]] == ["wq", "wk", "wv"]
    router = next(node for node in g.nodes if node.op == "aten._softmax").args[0].producer
    assert router.op == "aten.mm" and router.args[1].producer.args[0].name == "wr"
    x = _inputs(before)
    for a, b in zip(run(g, x), run(before, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    verify(parse(print_graph(g)))


def test_biases_concatenate_and_bias_free_linears_stay_apart():
    before, g, n = _fuse(BIASED)
    c = counts(g)
    assert n == 1 and c["aten.addmm"] == 1 and c["aten.mm"] == 1 and c["aten.cat"] == 2
    x = _inputs(before)
    for a, b in zip(run(g, x), run(before, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_weight_read_twice_is_not_concatenated_with_itself():
    text = QKV.replace("%4 = aten.permute(%wv,", "%4 = aten.permute(%wk,")
    _, g, n = _fuse(text, passes=["fuse.parallel_linear"])   # (no CSE to merge the twins)
    assert n == 0 and counts(g)["aten.mm"] == 5


# llama_gqa and mixtral (whose MoE layers merge q/k/v only: the experts read a stacked
# weight) merge for cuda in tests/compiler/test_cuda_target_lowering.py, which compiles
# them for cuda anyway; that the cpu target keeps its linears apart (its GEMMs do not
# take column slices) is checked on every tiny model in tests/passes/test_fuse_models.py.
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the cuda target on CPU tensors needs TRITON_INTERPRET=1 (make test)")
def test_qwen3_merges_qkv_and_gate_up_for_cuda():
    """q/k/v and gate/up merged (3 GEMMs fewer per layer). Logits equal eager through the
    Triton kernels (interpreted), which read the merged GEMM's column slices."""
    model = models.TINY_MODELS["qwen3"]()
    graphs, outs, ref = compile_and_compare(model, options={"target": "cuda"})
    assert max(rel_err(a, b) for a, b in zip(outs, ref)) < 1e-5
    for g in graphs:
        check_merged(g, "qwen3", model.config.num_hidden_layers)
