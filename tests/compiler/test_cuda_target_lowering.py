"""The cuda target's lowering, checked on the CPU: the generated wrapper launches kiln's
Triton kernels, which Triton's interpreter runs on CPU tensors (make test sets
TRITON_INTERPRET=1). fp32, so the bound is the fp32 one."""
from __future__ import annotations

import os

import pytest
import torch

from capture import (check_merged, fresh_dynamo, greedy_inputs, load_model, rel_err,
                     run_steps)
from kiln.ir import parse, print_graph, verify

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 (set by make test)")


@pytest.mark.parametrize("name", ["llama_gqa", "mixtral"])
def test_cuda_lowering_matches_eager_through_the_triton_interpreter(name):
    model = load_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    ref = run_steps(model, model, ids.clone(), 3)
    compiled = []
    fresh_dynamo()
    fn = torch.compile(model, backend="kiln", options={"target": "cuda", "observer": compiled.append})
    out = run_steps(fn, model, ids.clone(), 3, teacher=greedy_inputs(ref))
    assert max(rel_err(o, r) for o, r in zip(out, ref)) < 1e-5
    launched = {line.split()[1] for c in compiled for line in c.source.splitlines()
                if line.startswith("from kiln.backends.triton")}
    # norms and SiLU·mul run as GEMM prologues (gemv); mixtral's post-attention norm also
    # feeds its router, so it stays a norm kernel
    expected = {"kiln.backends.triton.gemv", "kiln.backends.triton.rope",
                "kiln.backends.triton.attention"}
    expected |= {"kiln.backends.triton.moe", "kiln.backends.triton.norm"} if name == "mixtral" else set()
    assert expected <= launched, launched
    # fuse.parallel_linear: q/k/v (and gate/up where the MLP is dense) as one GEMM each
    for c in compiled:
        check_merged(c.graph, name, model.config.num_hidden_layers)
    # schedule: the decode graph's leftovers after the rules become exactly these generated
    # kernels: the cache position (an arange) plus the cache lengths, the rotary table
    # (positions x inv_freq repeated by weight preparation, then cos and sin), the mask's
    # key positions (an arange) against the query's, and the additive mask.
    decode = compiled[-1]
    groups = sorted(tuple(n.op.split(".")[-1] for n in f.nodes if n.op != "aten.unsqueeze")
                    for f in decode.graph.functions.values())
    assert groups == [("_to_copy", "mul", "cos", "sin"), ("arange", "add", "add"), ("arange", "le"),
                      ("scalar_tensor", "scalar_tensor", "where")], groups
    assert not {"aten.arange", "aten.bmm"} & {n.op for n in decode.graph.nodes}
    # what cats are left read weights alone: weight preparation runs them once
    assert all(a.role == "weight" for n in decode.graph.nodes if n.op == "aten.cat" for a in n.args[0])
    calls = [n for n in decode.graph.nodes if n.op == "kiln.call"]
    assert len(calls) == 4, [n.attrs["callee"] for n in calls]
    assert "@triton.jit" in decode.source
    # fuse.rope_pair + fuse.rope_store: q and k of a layer rotated and the layer's k and v
    # written into the StaticCache in one launch
    ops = [n.op for n in decode.graph.nodes]
    assert ops.count("kiln.rope_pair_store") == model.config.num_hidden_layers
    assert not {"kiln.rope", "kiln.rope_pair", "aten.index_put_", "aten.index_copy_"} & set(ops)
    # fuse.prologue: every norm and SiLU·mul of a decode step computed in the prologue of
    # the GEMM after it (q/k/v, gate/up, down, LM head); mixtral's norm also feeds the router
    if name == "llama_gqa":
        layers = model.config.num_hidden_layers
        assert (ops.count("kiln.rms_norm_mm"), ops.count("kiln.fused_add_rms_norm_mm"),
                ops.count("kiln.silu_mul_mm")) == (1, 2 * layers, layers)
        # attention's output projection has nothing to fuse: the same kernel, no prologue
        assert ops.count("kiln.mm") == layers and "aten.mm" not in ops
        assert not {"kiln.rms_norm", "kiln.fused_add_rms_norm", "kiln.silu_mul"} & set(ops)
        assert "from kiln.backends.triton.gemv import" in decode.source
    text = print_graph(decode.graph)
    assert print_graph(parse(text)) == text
    verify(parse(text))
