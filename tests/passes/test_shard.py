"""Tensor parallelism on the CPU: shard.tensor_parallel, shard.experts, fuse.collective and
the collectives, with 2 ranks on gloo.

The 2-rank checks run in one pair of spawned processes (`tp_results`, once per module):
each rank builds the same tiny random-weight models (seeded), compiles them with
tensor_parallel_size=2 and runs a prefill and StaticCache decode steps on the same fresh
random tokens (drawn here, passed to both ranks); its logits must match the unsharded
eager model's within 1e-5 (fp32), and the compiled graphs must really be sharded: weight
slices of half the rows, collectives in the IR. The rest runs in this process.
"""
from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from kiln.ir import parse, print_graph, run
from kiln.ir import kiln_ref

WORLD = 2
TOL = 1e-5
PROMPT, STEPS = 5, 2
MODELS = ("llama_gqa", "qwen3_moe", "llama_mqa", "qwen2")
# The cuda target's lowering of the sharded graph (gemv prologues over a rank's weight
# slices, q/k/v merged, RoPE writing a rank's heads of the cache, the fused all_reduce +
# norm kernel), on the CPU through Triton's interpreter (`make test` sets TRITON_INTERPRET).
CUDA_LOWERING = os.environ.get("TRITON_INTERPRET") == "1"
CASES = MODELS + (("llama_gqa@cuda",) if CUDA_LOWERING else ())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


def _model(name: str):
    import models
    if name == "qwen2":   # q/k/v biases, the LM head tied to the embedding
        import families
        return families.build("qwen2")
    if name == "llama_mqa":   # one KV head for two ranks, each keeps it; attention by hand
        from transformers import LlamaConfig
        return models._build(LlamaConfig(**{**models.COMMON, "num_key_value_heads": 1}), "eager")
    return models.TINY_MODELS[name]()


def _count(graph, *ops) -> int:
    return sum(1 for n in graph.nodes if n.op in ops)


def _weight_slices(compiled) -> dict[str, tuple]:
    """Weight name -> the (dim, size kept, size) of its slices."""
    out = {}
    for g in (compiled.graph,):
        for n in g.nodes:
            if n.op == "aten.slice" and n.args[0].is_input and n.args[0].role == "weight":
                out.setdefault(n.args[0].name, set()).add(
                    (n.attrs.get("dim", 0), n.results[0].type.shape[n.attrs.get("dim", 0)],
                     n.args[0].type.shape[n.attrs.get("dim", 0)]))
    return out


@torch.no_grad()
def _check_model(case: str, ids: torch.Tensor, rank: int) -> dict:
    from fusion import run_steps
    torch._dynamo.reset()
    name, _, target = case.partition("@")
    model = _model(name)
    compiled = []
    opts = {"target": target or "cpu", "tensor_parallel_size": WORLD,
            "observer": compiled.append, "verify": True}
    outs = run_steps(torch.compile(model, backend="kiln", options=opts), model, ids, STEPS)
    torch._dynamo.reset()
    teacher = [o[:, -1:].argmax(-1) for o in outs[:-1]]
    ref = run_steps(model, model, ids, STEPS, teacher=teacher)
    errs = [_rel_err(a, b) for a, b in zip(outs, ref)]
    graphs = [c.graph for c in compiled]
    weight_slices = [sum(1 for n in g.nodes if n.op == "aten.slice" and n.args[0].is_input
                         and n.args[0].role == "weight") for g in graphs]
    prepared = [sum(1 for n in c.prepare.nodes if n.op == "aten.slice") if c.prepare else 0
                for c in compiled]
    return {
        "errs": errs,
        "graphs": len(graphs),
        "all_reduce": [_count(g, "kiln.all_reduce", "kiln.all_reduce_add_rms_norm") for g in graphs],
        "fused_collective": [_count(g, "kiln.all_reduce_add_rms_norm") for g in graphs],
        "all_gather": [_count(g, "kiln.all_gather") for g in graphs],
        "fused_moe_local": [sum(1 for n in g.nodes if n.op == "kiln.fused_moe"
                                and n.args[2].type.shape[0] * WORLD == 4) for g in graphs],
        "slices": {k: sorted(v) for c in compiled for k, v in _weight_slices(c).items()},
        "weight_slices": weight_slices,       # in the compiled graph
        "prepared_slices": prepared,          # of them, in the weight preparation
        "text": [print_graph(g) for g in graphs],
        "rope_store": [_count(g, "kiln.rope_pair_store") for g in graphs],
        "merged_linears": [sum(1 for n in g.nodes if n.op == "aten.cat" and all(
            a.producer is not None and a.producer.op == "aten.slice" for a in n.args[0]))
            for g in graphs],
        "fused_norm_kernel": all("all_reduce_add_rms_norm_triton" in c.source for c in compiled),
    }


def _check_collectives(rank: int) -> dict:
    """The lowering (backends/collectives.py) against the reference on gloo, and the fused
    all_reduce + add + norm: rule, reference and compiled wrapper."""
    from kiln.backends import collectives
    from kiln.config import CompileOptions
    from kiln.driver import compile_graph
    out = {}
    torch.manual_seed(100 + rank)   # different data per rank
    x = torch.randn(4, 6, 8)
    for dim in (0, 1, -1):
        out[f"all_gather{dim}"] = _rel_err(collectives.all_gather(x, dim, WORLD),
                                           kiln_ref.all_gather(x, dim, WORLD))
        out[f"reduce_scatter{dim}"] = _rel_err(collectives.reduce_scatter(x, dim, WORLD),
                                               kiln_ref.reduce_scatter(x, dim, WORLD))
    out["all_reduce"] = _rel_err(collectives.all_reduce(x, WORLD), kiln_ref.all_reduce(x, WORLD))
    gathered = kiln_ref.all_gather(x, 1, WORLD)
    out["gather_order"] = torch.equal(gathered[:, 6 * rank: 6 * rank + 6], x)
    graph = _ADD_NORM.format(n=WORLD)
    residual, w = torch.randn(3, 16), torch.randn(16)
    y = torch.randn(3, 16)
    ref = run(parse(graph), [y, residual, w])
    got = compile_graph(parse(graph), CompileOptions.make(
        {"target": "cpu", "tensor_parallel_size": WORLD, "cache": False}))
    fused = _count(got.graph, "kiln.all_reduce_add_rms_norm")
    res = got(y, residual, w)
    out["fused_add_norm"] = (fused, max(_rel_err(a, b) for a, b in zip(res, ref)))
    return out


# all_reduce of y, residual add, RMSNorm: what fuse.collective fuses.
_ADD_NORM = """func @f(%y: f32[3, 16], %res: f32[3, 16], weight %w: f32[16]) -> (f32[3, 16], f32[3, 16]) {{
  %r = kiln.all_reduce(%y, world_size={n}) : f32[3, 16]
  %s = aten.add(%res, %r) : f32[3, 16]
  %0 = aten.pow(%s, 2) : f32[3, 16]
  %1 = aten.mean(%0, dim=[-1], keepdim=true) : f32[3, 1]
  %2 = aten.add(%1, 1e-06) : f32[3, 1]
  %3 = aten.rsqrt(%2) : f32[3, 1]
  %4 = aten.mul(%s, %3) : f32[3, 16]
  %5 = aten.mul(%w, %4) : f32[3, 16]
  return %5, %s
}}"""


def _worker(rank: int, port: int, ids: dict, results):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        out["collectives"] = _check_collectives(rank)
        for case in CASES:
            out[case] = _check_model(case, ids[case], rank)
    except Exception:  # noqa: BLE001 - reported to the test in the parent
        out["error"] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results[rank] = out


@pytest.fixture(scope="module")
def tp_results():
    ids = {case: torch.randint(3, 128, (2, PROMPT)) for case in CASES}   # every model's vocab
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), ids, results), nprocs=WORLD)
        out = [results[r] for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return out


@pytest.mark.parametrize("name", CASES)
def test_sharded_logits_match_unsharded(tp_results, name):
    for rank, res in enumerate(tp_results):
        r = res[name]
        print(name, rank, ["%.1e" % e for e in r["errs"]])
        assert len(r["errs"]) == STEPS + 1 and max(r["errs"]) <= TOL, (rank, r["errs"])


@pytest.mark.parametrize("name", CASES)
def test_graphs_are_sharded(tp_results, name):
    """Not replicated in disguise: per decoder layer an attention and an MLP/MoE reduction
    (fused with the next norm but for the last layer's), the logits gathered, every
    projection's weight cut in two, and the slices computed once per weight set (weight
    preparation), not in the forward graph."""
    for rank, res in enumerate(tp_results):
        r = res[name]
        assert r["graphs"] >= 2, "a prefill and a decode graph"
        assert all(c == 4 for c in r["all_reduce"]), r["all_reduce"]    # 2 layers x 2
        assert all(c == 4 for c in r["fused_collective"]), r["fused_collective"]
        assert all(c >= 1 for c in r["all_gather"]), r["all_gather"]    # logits (+ prefill caches)
        assert r["weight_slices"] == r["prepared_slices"] and min(r["weight_slices"]) > 10
        slices = r["slices"]

        def halved(weight, dim):   # rows (column-parallel) or columns (row-parallel) in two
            (d, kept, full), = slices[weight]
            assert d == dim and kept * WORLD == full, (weight, slices[weight])
        for layer in (0, 1):
            p = f"model.layers.{layer}."
            halved(p + "self_attn.q_proj.weight", 0)
            halved(p + "self_attn.o_proj.weight", 1)
            if name == "llama_mqa":   # the one KV head on both ranks, so k/v stay whole
                assert p + "self_attn.k_proj.weight" not in slices
            else:
                halved(p + "self_attn.k_proj.weight", 0)
                halved(p + "self_attn.v_proj.weight", 0)
            if name == "qwen2":
                halved(p + "self_attn.q_proj.bias", 0)
            if name == "qwen3_moe":
                halved(p + "mlp.experts.gate_up_proj", 0)
                halved(p + "mlp.experts.down_proj", 0)
                assert p + "mlp.gate.weight" not in slices          # the router: replicated
            else:
                halved(p + "mlp.gate_proj.weight", 0)
                halved(p + "mlp.down_proj.weight", 1)
        # the LM head (tied to the embedding in qwen2, which reads the whole table)
        halved("model.embed_tokens.weight" if name == "qwen2" else "lm_head.weight", 0)
        if name == "qwen3_moe":
            assert all(c == 2 for c in r["fused_moe_local"]), r["fused_moe_local"]
        if name.endswith("@cuda"):
            assert r["rope_store"][-1] == 2, r["rope_store"]   # decode: into the rank's heads
            assert all(c == 4 for c in r["merged_linears"]), r["merged_linears"]
            assert r["fused_norm_kernel"]


def test_collectives_on_gloo(tp_results):
    for rank, res in enumerate(tp_results):
        c = res["collectives"]
        assert c.pop("gather_order") is True
        fused, err = c.pop("fused_add_norm")
        assert fused == 1 and err <= TOL, (fused, err)
        assert all(e <= 1e-6 for e in c.values()), c


def test_ranks_compile_the_same_graph_but_bounds(tp_results):
    """Collectives meet in graph order: both ranks' graphs are the same op for op."""
    import re
    for name in CASES:
        a, b = (re.sub(r"start=\d+, end=\d+|, expert_start=\d+", "", t)
                for t in (tp_results[0][name]["text"][-1], tp_results[1][name]["text"][-1]))
        assert a == b


# ---------------------------------------------------------------- one process

COLLECTIVES_IR = """func @f(%x: f32[4, 6], %r: f32[4, 6], weight %w: f32[6]) -> (f32[4, 6], f32[4, 6], f32[8, 6], f32[4, 3], f32[4, 6], f32[4, 6]) {
  %0 = kiln.all_reduce(%x, world_size=2) : f32[4, 6]
  %1 = kiln.all_reduce(%x, world_size=2) : f32[4, 6]
  %2 = kiln.all_gather(%x, dim=0, world_size=2) : f32[8, 6]
  %3 = kiln.reduce_scatter(%x, dim=-1, world_size=2) : f32[4, 3]
  %4, %5 = kiln.all_reduce_add_rms_norm(%x, %r, %w, eps=1e-06, world_size=2) : (f32[4, 6], f32[4, 6])
  %6 = kiln.all_reduce(%x, world_size=2) : f32[4, 6]
  return %0, %1, %2, %3, %4, %5
}"""


def test_collective_ops_round_trip_and_are_never_merged_or_dropped():
    from kiln.passes import PassContext
    from kiln.passes.canonicalize import canonicalize
    g = parse(COLLECTIVES_IR)
    g.verify()
    text = print_graph(g)
    assert print_graph(parse(text)) == text
    canonicalize(g, PassContext())
    # two equal all_reduces stay two (each meets its own on the other ranks), and the
    # one nobody reads stays: every rank runs it
    assert _count(g, "kiln.all_reduce") == 3


def test_collectives_with_one_rank_are_the_identity():
    x, r, w = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6)
    g = parse(COLLECTIVES_IR.replace("world_size=2", "world_size=1")
              .replace("f32[8, 6]", "f32[4, 6]").replace("f32[4, 3]", "f32[4, 6]"))
    outs = run(g, [x, r, w])
    for o in outs[:4]:
        assert torch.equal(o, x)
    ref = kiln_ref.fused_add_rms_norm(x, r, w, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(outs[4:], ref))


def test_fuse_collective_rule_matches_either_operand_order():
    from kiln.passes import PassContext, PassManager
    from kiln.passes.rule_pass import run_rules
    from kiln.passes.rules import load_rules
    for swap in (False, True):
        text = _ADD_NORM.format(n=2)
        if swap:
            text = text.replace("aten.add(%res, %r)", "aten.add(%r, %res)")
        g = parse(text)
        PassManager(passes=["fuse.norm"]).run(g)
        assert run_rules(g, PassContext(), load_rules("collective")) == 1
        assert _count(g, "kiln.all_reduce_add_rms_norm") == 1
        assert _count(g, "kiln.all_reduce", "kiln.fused_add_rms_norm") == 0
        g.verify()
        g1 = parse(text.replace("world_size=2", "world_size=1"))
        PassManager(passes=["fuse.norm", "fuse.collective"]).run(g1)
        y, res, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
        ref = run(parse(text.replace("world_size=2", "world_size=1")), [y, res, w])
        assert all(_rel_err(a, b) <= TOL for a, b in zip(run(g1, [y, res, w]), ref))
    # switched off by name (KILN_DISABLE_PASSES=fuse.collective), to measure what it buys
    from kiln.backends.targets import get_target
    g = parse(_ADD_NORM.format(n=2))
    PassManager(disabled={"fuse.collective"}, options={"target": get_target("cpu")}).run(g)
    assert _count(g, "kiln.all_reduce") == 1 and _count(g, "kiln.all_reduce_add_rms_norm") == 0


def test_tensor_parallel_without_a_process_group_says_how_to_start_one():
    import torch.distributed as dist
    from kiln.config import CompileOptions
    from kiln.driver import compile_graph
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group.*torchrun"):
        compile_graph(parse(_ADD_NORM.format(n=2)),
                      CompileOptions.make({"tensor_parallel_size": 2, "cache": False}))
    with pytest.raises(ValueError, match="tensor_parallel_rank"):
        CompileOptions.make({"tensor_parallel_size": 2, "tensor_parallel_rank": 2})


def test_nothing_shardable_stays_replicated_with_a_note():
    """A linear whose outputs feed a softmax over them (an MoE router) cannot split."""
    from kiln.passes import PassManager
    g = parse("""func @f(%x: f32[3, 8], weight %w: f32[4, 8]) -> f32[3, 4] {
  %0 = aten.permute(%w, dims=[1, 0]) : f32[8, 4]
  %1 = aten.mm(%x, %0) : f32[3, 4]
  %2 = aten._softmax(%1, dim=-1, half_to_float=false) : f32[3, 4]
  return %2
}""")
    before = print_graph(g)
    pm = PassManager(passes=["shard.tensor_parallel"], verify_each=True,
                     options={"tensor_parallel_size": 2, "tensor_parallel_rank": 0})
    pm.run(g)
    assert print_graph(g) == before
    assert pm.stats[0].rewrites == 0 and "nothing sharded" in pm.stats[0].notes[0]


def test_fused_moe_expert_range_sums_to_all_experts():
    torch.manual_seed(0)
    x, logits = torch.randn(7, 16), torch.randn(7, 4)
    wgu, wd = torch.randn(4, 24, 16) / 4, torch.randn(4, 16, 12) / 4
    full = kiln_ref.fused_moe(x, logits, wgu, wd, 2, True)
    halves = [kiln_ref.fused_moe(x, logits, wgu[lo:lo + 2], wd[lo:lo + 2], 2, True, expert_start=lo)
              for lo in (0, 2)]
    assert _rel_err(halves[0] + halves[1], full) <= TOL


def test_triton_fused_moe_expert_range():
    """backends/triton/moe.py with a local expert range, under TRITON_INTERPRET=1 on the
    CPU (or compiled, with a GPU): the slots of other experts contribute nothing."""
    pytest.importorskip("triton")
    from kernel_checks import DEVICE
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    from kiln.backends.triton import moe
    torch.manual_seed(0)
    x, logits = torch.randn(5, 32, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    wgu, wd = torch.randn(4, 32, 32, device=DEVICE) / 6, torch.randn(4, 32, 16, device=DEVICE) / 4
    for lo in (0, 2):
        got = moe.fused_moe(x, logits, wgu[lo:lo + 2], wd[lo:lo + 2], 2, True, expert_start=lo,
                            config=moe.MoeConfig(16, 32, 32, 4, 1))
        ref = kiln_ref.fused_moe(x, logits, wgu[lo:lo + 2], wd[lo:lo + 2], 2, True, expert_start=lo)
        assert _rel_err(got.cpu(), ref.cpu()) <= TOL


def test_serving_graph_of_one_rank():
    """The flat-batch serving capture through the whole serving pipeline for rank 1 of 2
    (an explicit rank compiles without a process group): every pass verifies; q/k/v and
    gate/up of the rank's slices still merge into one GEMM each (cuda target); the paged
    KV cache holds the rank's one KV head of two; serve.kv_cache still finds the LM head
    behind the all_gather of its logits."""
    import models
    from kiln.backends.targets import get_target
    from kiln.passes import PassManager
    from kiln.serving import capture_serving
    model = models.tiny_llama_gqa()
    g = capture_serving(model)
    pm = PassManager(verify_each=True, serving=True, options={
        "target": get_target("cuda"), "block_size": 16, "tensor_parallel_size": WORLD,
        "tensor_parallel_rank": 1})
    pm.run(g)
    caches = [v for v in g.inputs if v.name.startswith("kv_cache.")]
    assert len(caches) == 4 and all(v.type.shape[2] == 1 for v in caches)   # [NB, BS, Hkv, D]
    assert _count(g, "kiln.paged_attention") == 2
    cats = [n for n in g.nodes if n.op == "aten.cat" and all(
        a.producer is not None and a.producer.op == "aten.slice" for a in n.args[0])]
    assert len(cats) == 4, "q/k/v and gate/up of each layer: one GEMM over the rank's slices"
    (out,) = g.outputs
    assert out.producer.op == "kiln.all_gather" and out.type.shape[-1] == model.config.vocab_size
    assert _count(g, "kiln.all_reduce_add_rms_norm") == 4
