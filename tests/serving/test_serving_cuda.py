"""The serving graph on a GPU (target cuda): CUDA graph replay of padded buckets (decode
batches, and batches with prefill chunks) gives the eager runner's logits and HF eager's
greedy tokens. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import models
from kiln.runtime.batch import build_batch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model_runner import PagedModelRunner
from kiln.runtime.sequence import SamplingParams
from kiln.serving import compile_serving, model_weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BLOCK = 16


@pytest.fixture(scope="module")
def compiled():
    model = models.tiny_llama_gqa().cuda()
    return model, compile_serving(model, target="cuda", block_size=BLOCK)


def runners(model, cg):
    kw = dict(num_blocks=64, max_model_len=256, vocab_size=model.config.vocab_size, device="cuda")
    eager = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), **kw)
    graphs = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), cudagraphs=True, **kw)
    return eager, graphs


def test_decode_buckets_replay_match_eager(compiled):
    model, cg = compiled
    eager, graphs = runners(model, cg)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 17, 33, 2, 9)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(prompts))]
    for r in (eager, graphs):
        r.execute(build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK))
    for step in range(6):
        live = list(range(len(prompts) - step % 3))          # 5, 4, 3 sequences: buckets 8 and 4
        for i in live:
            prompts[i].append(int(torch.randint(0, vocab, ())))
        batch = build_batch([(prompts[i], len(prompts[i]) - 1, 1, tables[i]) for i in live], BLOCK)
        a, b = eager.execute(batch), graphs.execute(batch)
        assert b.shape == a.shape
        err = ((b.double() - a.double()).norm() / a.double().norm()).item()
        assert err < 1e-5, err
    # The decode buckets, besides the mixed bucket the prompts' prefill step replays in.
    assert graphs.replays > 0 and {(4, 4), (8, 8)} <= set(graphs._graphs)


def test_decode_buckets_captured_at_start_up_touch_only_the_scratch_block(compiled):
    model, cg = compiled
    eager, graphs = runners(model, cg)
    assert graphs.capture_decode_buckets() == len(graphs.seq_buckets)
    for name, cache in graphs.caches.items():
        assert cache[:graphs.num_blocks].abs().sum() == 0, f"start-up capture wrote {name}"
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (9, 4, 21)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(prompts))]
    for r in (eager, graphs):
        r.execute(build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK))
    captured = len(graphs._graphs)
    for _ in range(3):
        for p in prompts:
            p.append(int(torch.randint(0, vocab, ())))
        batch = build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], BLOCK)
        a, b = eager.execute(batch), graphs.execute(batch)
        assert ((b.double() - a.double()).norm() / a.double().norm()).item() < 1e-5
    assert len(graphs._graphs) == captured, "a decode step captured a graph"


def test_buckets_captured_in_the_background_touch_only_the_scratch_block(compiled):
    """`kiln serve --background-graphs`: the engine captures between requests what start-up
    left; a step run in between captures its own bucket first, and later steps replay."""
    model, cg = compiled
    eager, graphs = runners(model, cg)
    graphs.capture_later([(n, n) for n in graphs.seq_buckets] + graphs.mixed_buckets())
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (9, 4, 21)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(prompts))]
    for r in (eager, graphs):
        r.execute(build_batch([(p, 0, len(p), t) for p, t in zip(prompts, tables)], BLOCK))
    graphs.capture_in_background()   # one bucket, as the engine does while idle
    prefilled = {k: v.clone() for k, v in graphs.caches.items()}
    while graphs.capture_in_background():
        pass
    for name, cache in graphs.caches.items():
        assert torch.equal(cache[:graphs.num_blocks], prefilled[name][:graphs.num_blocks]), \
            f"a background capture wrote {name}"
    captured = len(graphs._graphs)
    assert {(n, n) for n in graphs.seq_buckets} <= set(graphs._graphs)
    for _ in range(3):
        for p in prompts:
            p.append(int(torch.randint(0, vocab, ())))
        batch = build_batch([(p, len(p) - 1, 1, t) for p, t in zip(prompts, tables)], BLOCK)
        a, b = eager.execute(batch), graphs.execute(batch)
        assert ((b.double() - a.double()).norm() / a.double().norm()).item() < 1e-5
    assert len(graphs._graphs) == captured and graphs.replays >= 3


def test_mixed_buckets_replay_match_eager(compiled):
    """Steps that mix prefill chunks and decodes replay (T tokens, N sequences) graphs;
    steps 2, 4 and 5 share the bucket of 32 tokens in 4 sequences."""
    model, cg = compiled
    eager, graphs = runners(model, cg)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 17, 33, 2, 9, 40)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(prompts))]
    done = [0] * len(prompts)
    steps = [[(0, 5), (1, 17), (2, 20)], [(0, 1), (2, 13), (3, 2)], [(1, 1), (3, 1), (4, 9)],
             [(0, 1), (1, 1), (2, 1), (5, 24)], [(0, 1), (1, 1), (2, 1), (5, 16)]]
    for step in steps:
        for i, new in step:
            if done[i] == len(prompts[i]):
                prompts[i].append(int(torch.randint(0, vocab, ())))
        batch = build_batch([(prompts[i], done[i], new, tables[i]) for i, new in step], BLOCK)
        a, b = eager.execute(batch), graphs.execute(batch)
        err = ((b.double() - a.double()).norm() / a.double().norm()).item()
        assert b.shape == a.shape and err < 1e-5, err
        for i, new in step:
            done[i] += new
    assert graphs.replays == len(steps) and sorted(graphs._graphs) == [(16, 4), (32, 4), (64, 4)]


class IdsTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_engine_greedy_with_graphs_equals_eager(compiled, async_scheduling):
    model, cg = compiled
    _, graphs = runners(model, cg)
    engine = LLMEngine(graphs, IdsTokenizer(), EngineConfig(max_num_batched_tokens=64,
                                                           async_scheduling=async_scheduling))
    assert engine.async_scheduling == async_scheduling
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (7, 12, 3)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        want, _ = models.eager_greedy(model, torch.tensor([p], device="cuda"), 8)
        assert o.token_ids == want[0].tolist()
    assert graphs.replays > 0
    # The step profile timed every step's device work with CUDA events.
    value = engine.metrics.registry.get_sample_value
    steps = value("kiln_step_seconds_count")
    assert steps == graphs.steps and value("kiln_step_device_seconds_count") == steps
    assert 0 < value("kiln_step_device_seconds_sum")
    if not async_scheduling:   # (async: a step's device work spans two engine calls)
        assert value("kiln_step_device_seconds_sum") < value("kiln_step_seconds_sum")


def test_greedy_under_load_equals_one_at_a_time(compiled):
    """40 requests at once through the default engine (async scheduling, CUDA graph buckets,
    chunked prefill beside decodes, preemption by a small KV cache) give each prompt's tokens
    as it gets served alone."""
    model, cg = compiled
    runner = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), num_blocks=24,
                              max_model_len=256, vocab_size=model.config.vocab_size, device="cuda",
                              cudagraphs=True, max_num_batched_tokens=64)
    engine = LLMEngine(runner, IdsTokenizer(), EngineConfig(max_num_seqs=16, max_num_batched_tokens=64,
                                                            max_waiting=64))
    assert engine.async_scheduling
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 40, (40,), generator=gen)]
    params = [SamplingParams(max_tokens=int(n), temperature=0.0, ignore_eos=True)
              for n in torch.randint(1, 24, (40,), generator=gen)]
    loaded = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in loaded] == [o.token_ids for o in alone]
    assert engine.blocks.num_used_blocks() == 0
