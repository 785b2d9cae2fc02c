"""Weight preparation: what reads only weights (fuse.parallel_linear's concatenations,
quantize's weight quantisation) runs once per set of weight tensors, again after a weight
is written in place, and the logits stay eager's."""
from __future__ import annotations

import torch

import models
from fusion import counts, rel_err, run_steps
from kiln.ir import parse, print_graph, verify
from kiln.passes.weight_prep import split_weight_preparation


def _compile(model, **options):
    torch._dynamo.reset()
    graphs = []
    fn = torch.compile(model, backend="kiln", options={"observer": graphs.append, **options})
    return fn, graphs


def _prepared(compiled):
    return compiled.fn.__globals__["prepared_weights"]


def test_prepared_once_and_again_after_an_in_place_weight_update():
    model = models.tiny_llama_gqa()
    fn, graphs = _compile(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    outs = run_steps(fn, model, ids, 3)
    assert all("def prepare_weights" in g.source for g in graphs)
    assert [_prepared(g).runs for g in graphs] == [1, 1], "prepared more than once a graph"
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(-1.5)
        model.model.layers[0].mlp.up_proj.weight.add_(0.25)
    teacher = [o[:, -1:].argmax(-1) for o in outs[:-1]]
    again = run_steps(fn, model, ids, 3, teacher=teacher)
    torch._dynamo.reset()
    ref = run_steps(model, model, ids, 3, teacher=teacher)
    assert max(rel_err(a, b) for a, b in zip(again, ref)) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(again, outs)) > 1e-2, "the update changed nothing"
    assert [_prepared(g).runs for g in graphs] == [2, 2]


def test_weight_quantisation_moves_to_the_preparation():
    model = models.tiny_llama_gqa()
    fn, graphs = _compile(model, quant="int8")
    run_steps(fn, model, torch.randint(3, model.config.vocab_size, (1, 5)), 2)
    for g in graphs:
        split = split_weight_preparation(g.graph)
        prep = counts(split.prepare)
        # 7 linears a layer, 2 layers, as 4 GEMMs a layer (q/k/v and gate/up merged)
        assert prep["kiln.quant_int8"] == 8 and prep["aten.cat"] == 4, print_graph(split.prepare)
        fwd = counts(split.forward)
        assert fwd["kiln.scaled_mm"] == 8
        assert not any(n.op == "aten.cat" and all(v.is_input for v in n.args[0])
                       for n in split.forward.nodes)
        # every quantisation left in the forward graph is an activation's
        assert fwd["kiln.quant_int8"] + fwd["kiln.rms_norm_quant"] + fwd[
            "kiln.fused_add_rms_norm_quant"] + fwd["kiln.silu_mul_quant"] == 8
        verify(parse(print_graph(split.prepare)))
        verify(split.forward)


def test_views_of_weights_alone_prepare_nothing():
    g = parse("""func @f(%x: f32[4, 8], %layer.w: f32[6, 8]) -> f32[4, 6] {
  %0 = aten.permute(%layer.w, dims=[1, 0]) : f32[8, 6]
  %1 = aten.mm(%x, %0) : f32[4, 6]
  return %1
}
""")
    assert split_weight_preparation(g) is None
