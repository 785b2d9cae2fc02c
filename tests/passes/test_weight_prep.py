"""Weight preparation: what reads only weights (fuse.parallel_linear's concatenations,
quantize's weight quantisation) runs once per set of weight tensors, again after a weight
is written in place, and the logits stay eager's."""
from __future__ import annotations

import pytest
import torch

import models
from capture import captured
from fusion import counts, rel_err, run_steps
from kiln.ir import parse, print_graph, run, verify
from kiln.backends import prepared as prepared_module
from kiln.backends.targets import get_target
from kiln.passes import PassManager
from kiln.passes.weight_prep import split_weight_preparation


def _compile(model, **options):
    torch._dynamo.reset()
    graphs = []
    fn = torch.compile(model, backend="kiln", options={"observer": graphs.append, **options})
    return fn, graphs


def _prepared(compiled):
    return compiled.fn.__globals__["prepared_weights"]


def test_prepared_once_and_again_after_an_in_place_weight_update():
    """int8 on the CPU: the weight quantisation is what gets prepared."""
    model = models.tiny_llama_gqa()
    fn, graphs = _compile(model, quant="int8")
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    outs = run_steps(fn, model, ids, 3)
    assert all("def prepare_weights" in g.source for g in graphs)
    prefill, decode = (_prepared(g) for g in graphs)
    # the prefill and decode graphs prepare the same way: the decode graph adopts the values
    assert (prefill.runs, decode.runs, decode.adopted) == (1, 0, 1)
    assert all(a is b for a, b in zip(prefill._values, decode._values))
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(-1.5)
        model.model.layers[0].mlp.up_proj.weight.add_(0.25)
    teacher = [o[:, -1:].argmax(-1) for o in outs[:-1]]
    again = run_steps(fn, model, ids, 3, teacher=teacher)
    assert (prefill.runs, decode.runs, decode.adopted) == (2, 0, 2)
    prepared_module._LAST.clear()                   # (so the fresh compile prepares anew)
    fresh, _ = _compile(model, quant="int8")        # the updated model, compiled anew
    want = run_steps(fresh, model, ids, 3, teacher=teacher)
    torch._dynamo.reset()
    assert max(rel_err(a, b) for a, b in zip(again, want)) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(again, outs)) > 1e-2, "the update changed nothing"


@pytest.mark.parametrize("target, gemms", [("cpu", 7), ("cuda", 4)])
def test_weight_quantisation_moves_to_the_preparation(target, gemms):
    """7 linears a layer, 2 layers; on cuda as 4 GEMMs a layer (q/k/v and gate/up merged,
    their concatenation prepared too). Only the lowering is looked at: no kernel runs."""
    _, compiled = captured("llama_gqa")
    graph = parse(dict(compiled[-1].snapshots)["input"])   # the decode graph, as captured
    pm = PassManager(options={"target": get_target(target), "quant": "int8"})
    pm.run(graph)
    split = split_weight_preparation(graph)
    prep = counts(split.prepare)
    assert prep["kiln.quant_int8"] == 2 * gemms, print_graph(split.prepare)
    # the merged q/k/v and gate/up weights on cuda, and the rotary inv_freq repeated
    # (canonicalize.forms) on both
    assert prep["aten.cat"] == (0 if target == "cpu" else 4) + 1
    # quantised or repeated (copied) weights are version-checked; the LM head's is only
    # viewed; on the cpu the 5 norm weights are copied onto its alignment (prepare.align)
    aligned = 5 if target == "cpu" else 0
    assert prep["aten.clone"] == aligned
    assert len(split.copied) == 15 + aligned and len(split.prepare.inputs) == 16 + aligned
    fwd = counts(split.forward)
    assert fwd["kiln.scaled_mm"] == 2 * gemms
    assert not any(n.op == "aten.cat" and all(v.is_input for v in n.args[0])
                   for n in split.forward.nodes)
    # every quantisation left in the forward graph is an activation's: one a linear input
    acts = (fwd["kiln.quant_int8"] + fwd["kiln.rms_norm_quant"]
            + fwd["kiln.fused_add_rms_norm_quant"] + fwd["kiln.silu_mul_quant"])
    assert acts == 2 * 4   # (q/k/v share one input, gate/up another)
    verify(parse(print_graph(split.prepare)))
    verify(split.forward)


def test_int4_packing_moves_to_the_preparation():
    """quant="int4_weight_only" on cpu: the merged q/k/v and gate/up weights (the cpu merges
    under weight-only quant), every kiln.quant_int4 (grouping, the grid search and the
    packing into torch's CPU layout) and the LM head's int8 quantisation read weights
    alone, so they run once per weight set; the forward graph keeps the GEMMs and the
    head's refinement, which reads the head's unquantised weight at run time."""
    _, compiled = captured("llama_gqa")
    graph = parse(dict(compiled[-1].snapshots)["input"])
    PassManager(options={"target": get_target("cpu"), "quant": "int4_weight_only"}).run(graph)
    split = split_weight_preparation(graph)
    prep, fwd = counts(split.prepare), counts(split.forward)
    assert prep["kiln.quant_int4"] == 2 * 4 and prep["kiln.quant_int8"] == 1
    assert prep["aten.cat"] == 2 * 2 + 1     # q/k/v, gate/up; the rotary inv_freq repeated
    assert fwd["kiln.quant_int4"] == fwd["kiln.quant_int8"] == 0
    assert fwd["kiln.weight_int4_mm"] == 2 * 4 and fwd["kiln.refine_top_logits"] == 1
    (refine,) = [n for n in split.forward.nodes if n.op == "kiln.refine_top_logits"]
    assert refine.args[2].is_input and refine.args[2].name == "lm_head.weight"
    verify(parse(print_graph(split.prepare)))
    verify(split.forward)


def test_views_of_weights_move_and_runtime_values_stay():
    # The `weight` role decides, not the name: %w has no dot, %layer.x is no weight.
    g = parse("""func @f(%layer.x: f32[4, 8], weight %w: f32[6, 8], %cache_len: i64[]) -> (f32[4, 6], i64[]) {
  %0 = aten.permute(%w, dims=[1, 0]) : f32[8, 6]
  %1 = aten.mm(%layer.x, %0) : f32[4, 6]
  %2 = aten.add(%cache_len, 1) : i64[]
  return %1, %2
}
""")
    split = split_weight_preparation(g)
    assert [n.op for n in split.prepare.nodes] == ["aten.permute"]
    assert [v.name for v in split.forward.inputs] == ["layer.x", "w", "cache_len", "w.permute"]
    assert [n.op for n in split.forward.nodes] == ["aten.mm", "aten.add"]
    assert split.positions == [1]
    assert split.copied == []      # a view sees writes to the weight: no version check
    x, w, n = torch.randn(4, 8), torch.randn(6, 8), torch.tensor(3)
    (wt,) = run(split.prepare, [w])
    want = run(g, [x, w, n])
    got = run(split.forward, [x, w, n, wt])
    torch.testing.assert_close(got[0], want[0])
    assert got[1] == want[1]
    nothing = parse("""func @f(%x: f32[4, 8]) -> f32[4, 8] {
  %0 = aten.neg(%x) : f32[4, 8]
  return %0
}
""")
    assert split_weight_preparation(nothing) is None
