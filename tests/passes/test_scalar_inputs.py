"""capture.scalar_inputs on the decode graphs of transformers' sliding-window StaticCache
(Mistral, Gemma2), whose fill level arrives as a Python int that changes every step: the
int becomes a 0-d tensor input (role `scalar`) when it only feeds values, the graph
computes the same logits from it, and ints that reach a shape stay ints."""
from __future__ import annotations

import pytest
import torch

from families import VOCAB, build
from capture import run_steps
from kiln.backends.targets import get_target
from kiln.ir import SymIntType, parse, print_graph, run
from kiln.ir.roles import SCALAR
from kiln.passes import PassManager

CUDA_GRAPHS = {"target": get_target("cuda"), "cudagraphs": True}


def decode_graph_text(name: str) -> str:
    """The decode graph as captured (before any pass), from a CPU StaticCache loop."""
    model = build(name)
    graphs = []
    torch._dynamo.reset()
    fn = torch.compile(model, backend="kiln", options={"observer": graphs.append, "record": True})
    run_steps(fn, model, torch.randint(0, VOCAB, (1, 6)), 3)
    decode = [c for c in graphs if any(isinstance(v.type, SymIntType) for v in c.graph.inputs)]
    assert decode, "no decode graph took a Python int: transformers' cache changed"
    return decode[-1].snapshots[0][1]


def example_inputs(g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in g.inputs:
        t = v.type
        if isinstance(t, SymIntType):
            out.append(7)   # past the window of 4: the full-cache branch's values
        elif v.name == "input_ids":
            out.append(torch.randint(0, VOCAB, tuple(t.shape), generator=gen))
        elif not t.dtype.is_floating_point:   # indices (a lifted constant's -1, a length)
            out.append(torch.zeros(tuple(t.shape), dtype=t.dtype))
        else:
            out.append(torch.randn(tuple(t.shape), generator=gen, dtype=t.dtype) * 0.1)
    return out


@pytest.mark.parametrize("name", ["mistral_sw", "gemma2"])
def test_changing_ints_become_device_scalars(name):
    text = decode_graph_text(name)
    plain = parse(text)
    PassManager(options={"target": get_target("cpu")}).run(plain)
    promoted = parse(text)
    pm = PassManager(options=CUDA_GRAPHS)
    pm.run(promoted)
    assert "capture.scalar_inputs: replaced 0" not in pm.summary()
    scalars = [v for v in promoted.inputs if v.role == SCALAR]
    assert scalars and not any(isinstance(v.type, SymIntType) for v in promoted.inputs)
    assert all(v.type.shape == () and v.type.dtype == torch.int64 for v in scalars)
    assert print_graph(parse(print_graph(promoted))) == print_graph(promoted)   # `scalar %x`
    inputs = example_inputs(plain)
    # cloned: both graphs write the KV cache in place
    as_tensors = [torch.tensor(a) if isinstance(a, int) else a.clone() for a in inputs]
    want = [o for o in run(plain, inputs) if isinstance(o, torch.Tensor)]
    got = [o for o in run(promoted, as_tensors) if isinstance(o, torch.Tensor)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ints_that_shape_a_tensor_stay_ints():
    g = parse("""func @forward(%x: f32[8], %n: sym(s0)) -> f32[s0]
    where s0 in [1, 8] {
  %0 = aten.slice(%x, dim=0, start=0, end=%n) : f32[s0]
  %1 = aten.add(%0, %n) : f32[s0]
  return %1
}
""")
    pm = PassManager(options=CUDA_GRAPHS, passes=["capture.scalar_inputs"])
    pm.run(g)
    assert isinstance(g.inputs[1].type, SymIntType)


def test_not_without_graph_capture():
    """Only for targets that replay graphs, with CUDA graphs on. The int the graph returns
    (a cache's next length) is computed by the driver on the host."""
    from kiln.driver import ScalarInputs
    g = parse("""func @forward(%x: i64[4], %n: sym(s0)) -> (i64[4], sym(s0 + 1))
    where s0 in [1, 100] {
  %0 = sym.sub(%n, 3) : sym(s0 - 3)
  %1 = aten.add(%x, %0) : i64[4]
  %2 = sym.add(%n, 1) : sym(s0 + 1)
  return %1, %2
}
""")
    for options in ({"target": get_target("cpu"), "cudagraphs": True},
                    {"target": get_target("cuda"), "cudagraphs": False}):
        h = parse(print_graph(g))
        PassManager(options=options, passes=["capture.scalar_inputs"]).run(h)
        assert isinstance(h.inputs[1].type, SymIntType)
    PassManager(options=CUDA_GRAPHS, passes=["capture.scalar_inputs"]).run(g)
    assert g.inputs[1].role == SCALAR and len(g.outputs) == 1
    fn = ScalarInputs(lambda *args: run(g, args), g)
    for n in (10, 11):
        out, length = fn(torch.arange(4), n)
        assert out.tolist() == [n - 3, n - 2, n - 1, n] and length == n + 1
