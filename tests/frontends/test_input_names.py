"""Graph inputs are identified by the tensor objects, never by dynamo's placeholder names:
weights are named after `named_parameters()` and carry the `weight` role whatever dynamo
calls its placeholders (transformers 5.24 changed them from `l_self_...` to `l_args_0_...`)."""
from __future__ import annotations

import torch

from kiln.backend import kiln_backend
from kiln.frontends.dynamo import argument_name, state_path
from kiln.ir.roles import is_weight
from models import tiny_llama


def check_named_as_state(names: set[str], model) -> None:
    """Every parameter is a weight input named as named_parameters() names it; the other
    weight inputs are buffers the forward reads (not original_inv_freq, which it does not)."""
    assert {n for n, _ in model.named_parameters()} <= names
    assert names <= {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert "model.rotary_emb.inv_freq" in names


def weight_names(graph) -> set[str]:
    """The weight inputs, less the constants the capture lifted (DynamicCache's empty
    tensors): those are weights too, named after the attribute the graph read."""
    lifted = set(graph.meta["constants"])
    assert all(name.startswith("const.") for name in lifted)
    return {v.name for v in graph.inputs if is_weight(v)} - lifted


def renamed(backend):
    """A backend that renames every placeholder, then hands the graph to `backend`."""
    def rename(gm, example_inputs, **kw):
        for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            n.name = f"input_{i}"
        gm.recompile()
        return backend(gm, example_inputs, **kw)
    return rename


def test_weights_named_by_identity_whatever_the_placeholders_are_called():
    model = tiny_llama()
    graphs = []

    def backend(gm, example_inputs, **kw):
        return kiln_backend(gm, example_inputs, options={"observer": graphs.append}, module=model)

    ids = torch.randint(0, 320, (1, 5))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=renamed(backend))(ids).logits
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (cg,) = graphs
    check_named_as_state(weight_names(cg.graph), model)
    assert not any(is_weight(v) for v in cg.graph.inputs if v.name.startswith("input_"))


def test_plain_torch_compile_names_weights_from_where_dynamo_read_them():
    model = tiny_llama()
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="kiln", options={"observer": graphs.append})(
            torch.randint(0, 320, (1, 5)))
    check_named_as_state(weight_names(graphs[0].graph), model)


def test_source_paths():
    assert state_path("L['args'][0]._modules['model']._modules['layers']._modules['0']"
                      "._parameters['weight']") == "model.layers.0.weight"
    assert state_path("L['self']._modules['lm_head']._parameters['weight']") == "lm_head.weight"
    assert state_path("L['self']._modules['rotary']._buffers['inv_freq']") == "rotary.inv_freq"
    assert state_path("L['input_ids']") is None
    assert state_path(None) is None
    assert argument_name("L['input_ids']") == "input_ids"
    assert argument_name("L['kwargs']['position_ids']") == "position_ids"
    assert argument_name("L['args'][1]") == "args_1"
    assert argument_name("L['x'].size()[1]") is None
