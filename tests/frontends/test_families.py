"""Every common way of calling an HF model compiles with kiln, on every architecture family
in tests/families.py (HF `generate` on one family of each kind), with no fallback (the
suite runs under KILN_FALLBACK=error): logits
within 1e-5 of eager (fp32, CPU), greedy tokens identical, and the fusions each family is
expected to get (tests/families.py says what does not fuse and why)."""
from __future__ import annotations

import collections

import pytest
import torch

import kiln
from families import FAMILIES, VOCAB, build
from capture import run_steps

NAMES = sorted(FAMILIES)


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm())


def compiled(fn, graphs: list):
    torch._dynamo.reset()   # HF forwards share one code object and dynamo's recompile limit
    return torch.compile(fn, backend="kiln", options={"observer": graphs.append})


def fused_ops(graph) -> dict:
    return dict(collections.Counter(n.op for n in graph.nodes
                                    if n.op.startswith("kiln.") and n.op != "kiln.call"))


@pytest.fixture(autouse=True)
def no_fallbacks():
    kiln.stats(reset=True)
    yield
    assert kiln.stats()["fallbacks"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_default_cache_and_no_cache(name):
    """`torch.compile(model, backend="kiln")(input_ids)`: the default DynamicCache, whose
    growth is ordinary ops, then the same model with use_cache=False."""
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 7))
    graphs = []
    fn = compiled(model, graphs)
    with torch.no_grad():
        assert rel_err(fn(ids).logits, model(ids).logits) < 1e-5
        assert rel_err(fn(ids, use_cache=False).logits, model(ids, use_cache=False).logits) < 1e-5
    assert graphs, "nothing was compiled by kiln"
    assert fused_ops(graphs[0].graph) == FAMILIES[name].fused


# `generate` adds to a forward call the keyword arguments of HF's generation loop (a 2-D
# attention mask, its cache set-up), which do not depend on the family; with the default
# DynamicCache it also recompiles the decode step with dynamic shapes (three dynamo traces,
# the most expensive call here). So `generate` runs, with a StaticCache and with the
# default DynamicCache, on one family of each kind of cache and attention: plain, sliding
# window, hybrid sliding/global, MoE, MLA, learned positions, partial rotary. Every family
# runs kiln's own StaticCache loop (test_static_cache_loop), whose caches and graphs are
# what differs between families.
GENERATE_FAMILIES = ("llama", "mistral_sw", "gemma2", "qwen3_moe", "deepseek_v3", "gpt2", "phi")
GENERATE_CASES = [(name, cache) for name in GENERATE_FAMILIES for cache in ("static", "dynamic")]


@pytest.mark.parametrize("name, cache", GENERATE_CASES)
def test_generate_with_compiled_forward(name, cache):
    """`model.forward = torch.compile(model.forward, backend="kiln")` then `generate`."""
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 6))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = model.generate(ids, **kw)
    graphs = []
    model.forward = compiled(model.forward, graphs)
    got = model.generate(ids, **kw)
    assert graphs, "nothing was compiled by kiln"
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_static_cache_loop(name):
    """The StaticCache loop kiln's own generate and benchmarks run: prefill, then decode."""
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 6))
    want = run_steps(model, model, ids, 3)
    graphs = []
    got = run_steps(compiled(model, graphs), model, ids, 3,
                    teacher=[w[:, -1:].argmax(-1) for w in want[:-1]])
    assert graphs, "nothing was compiled by kiln"
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
