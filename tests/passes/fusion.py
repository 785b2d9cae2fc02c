"""Helpers for the fusion tests: compile a causal LM with kiln, run a prefill and a few
StaticCache decode steps, and run eager on exactly the same tokens."""
from __future__ import annotations

import collections

import torch
from transformers import StaticCache

from kiln.frontends.hf import cache_call_kwargs

# Ops the fusion passes must leave nothing of, per fused family.
LEFTOVERS = {
    "attention": ("aten._softmax", "aten.bmm",
                  "aten._scaled_dot_product_flash_attention_for_cpu",
                  "aten.scaled_dot_product_attention"),
    "norm": ("aten.rsqrt", "aten.pow", "aten.mean"),
    "rope": ("aten.neg", "aten.cos_unused"),
    "activation": ("aten.sigmoid", "aten.silu"),
    "moe": ("aten.topk", "aten.sort", "aten.histc",
            "torch.transformers.grouped_mm_fallback.default"),
}


def counts(graph) -> collections.Counter:
    return collections.Counter(n.op for n in graph.nodes)


def repeat_kv_expands(graph) -> int:
    """5-D expands: transformers' repeat_kv, which fuse.attention must not materialise."""
    return sum(1 for n in graph.nodes if n.op == "aten.expand" and n.results[0].type.rank == 5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN in output"
    return err


@torch.no_grad()
def run_steps(fn, model, input_ids: torch.Tensor, decode_steps: int, teacher=None):
    """Prefill, then `decode_steps` steps; returns the logits of every call. Feeds
    `teacher` tokens when given, else the argmax (so eager can replay compiled runs)."""
    b, s = input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=s + decode_steps + 1)

    def call(ids, start):
        positions = torch.arange(start, start + ids.shape[1])
        return fn(input_ids=ids, position_ids=positions.expand(b, -1),
                  **cache_call_kwargs(model, cache, positions)).logits

    torch._dynamo.maybe_mark_dynamic(input_ids, 0)
    outs = [call(input_ids, 0)]
    for t in range(decode_steps):
        nxt = teacher[t] if teacher is not None else outs[-1][:, -1:].argmax(-1)
        outs.append(call(nxt, s + t))
    return outs


def compile_and_compare(model, batch=2, prompt_len=7, decode_steps=3, options=None,
                        input_ids=None, round_trip=False):
    """(graphs, compiled logits, eager logits) for a prefill + decode run. With
    `round_trip`, also checks that the IR text after every pass parses back to itself and
    verifies."""
    torch._dynamo.reset()
    graphs = []
    opts = {"observer": graphs.append, "verify": True, **(options or {})}
    if round_trip:
        opts["record"] = True
    fn = torch.compile(model, backend="kiln", options=opts)
    ids = input_ids if input_ids is not None else torch.randint(
        3, model.config.vocab_size, (batch, prompt_len))
    outs = run_steps(fn, model, ids, decode_steps)
    torch._dynamo.reset()
    if round_trip:
        check_round_trips(graphs)
    teacher = [o[:, -1:].argmax(-1) for o in outs[:-1]]
    ref = run_steps(model, model, ids, decode_steps, teacher=teacher)
    return [g.graph for g in graphs], outs, ref


def check_round_trips(compiled) -> None:
    """Every recorded snapshot of every CompiledGraph prints back exactly and verifies."""
    from kiln.ir import parse, print_graph, verify
    assert compiled and all(cg.snapshots for cg in compiled)
    for i, cg in enumerate(compiled):
        for pass_name, text in cg.snapshots:
            g = parse(text)
            assert print_graph(g) == text, f"graph {i}: the IR after {pass_name} does not round-trip"
            verify(g)
