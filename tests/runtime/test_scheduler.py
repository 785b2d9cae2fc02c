"""Scheduler: token budget, chunked prefill, decode priority, preemption by recompute.

Correctness runs go through the toy runner, whose output depends on reading the right
KV-cache slots, and compare against its closed form computed with no cache."""
import random

import pytest

from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.scheduler import Scheduler, SchedulerConfig
from kiln.runtime.sequence import SamplingParams, Sequence
from toy import ToyRunner, reference

ALLOWED = list(range(10, 60))
GREEDY = SamplingParams(max_tokens=12, temperature=0)


class Tok:      # the engine only decodes text here; a trivial tokenizer is enough
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


def make_scheduler(num_blocks=32, block_size=4, budget=8, max_seqs=8):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_seqs, budget), bm), bm


def fake_step(sched):
    step = sched.schedule()
    ready = sched.advance(step)
    for s, r in zip(step.seqs, ready):
        if r:
            s.append(7)
    return step


def test_flat_batch_layout():
    sched, bm = make_scheduler(budget=100)
    a, b = Sequence(list(range(6)), GREEDY), Sequence([20, 21], GREEDY)
    sched.add(a), sched.add(b)
    step = sched.schedule()
    batch = step.batch
    assert batch.input_ids.tolist() == list(range(6)) + [20, 21]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert batch.query_start.tolist() == [0, 6, 8]
    assert batch.context_lens.tolist() == [6, 2]
    ta, tb = a.block_table.tolist(), b.block_table.tolist()
    assert batch.block_tables.tolist() == [ta, tb + [0]]
    assert batch.slot_mapping.tolist() == [ta[p // 4] * 4 + p % 4 for p in range(6)] + [tb[0] * 4, tb[0] * 4 + 1]
    assert batch.max_query_len == 6 and batch.max_context_len == 6 and not batch.is_decode
    sched.advance(step)
    a.append(9), b.append(9)
    batch = sched.schedule().batch
    assert batch.is_decode and batch.input_ids.tolist() == [9, 9]
    assert batch.positions.tolist() == [6, 2] and batch.context_lens.tolist() == [7, 3]


def test_chunked_prefill_under_budget_and_decodes_first():
    sched, bm = make_scheduler(budget=8)
    long = Sequence(list(range(20)), GREEDY)
    sched.add(long)
    assert fake_step(sched).num_new == [8]
    assert fake_step(sched).num_new == [8]
    late = Sequence(list(range(30, 45)), GREEDY)
    sched.add(late)
    step = fake_step(sched)                  # long finishes its prefill, late gets the rest
    assert step.num_new == [4, 4] and step.seqs == [long, late]
    step = fake_step(sched)                  # long decodes first, then late's prefill chunk
    assert step.seqs == [long, late] and step.num_new == [1, 7]
    assert sum(step.num_new) <= 8


def test_max_num_seqs():
    sched, _ = make_scheduler(budget=100, max_seqs=2)
    for i in range(4):
        sched.add(Sequence([i, i + 1], GREEDY))
    step = sched.schedule()
    assert len(step.seqs) == 2 and len(sched.waiting) == 2


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched, bm = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = Sequence(list(range(7)), GREEDY), Sequence(list(range(10, 17)), GREEDY)
    sched.add(a), sched.add(b)
    fake_step(sched)                          # both hold 2 blocks, 8 tokens each now
    step = fake_step(sched)                   # both decode into their second block
    assert step.seqs == [a, b]
    step = fake_step(sched)                   # a needs a third block: b is preempted
    assert step.seqs == [a] and sched.num_preemptions == 1
    assert list(sched.waiting) == [b] and not b.block_table and b.num_computed == 0
    assert b.num_tokens == 9                  # its generated tokens are kept for recompute


def engine(budget, num_blocks, max_seqs=16, block_size=4):
    runner = ToyRunner(vocab_size=64, allowed=ALLOWED, num_blocks=num_blocks, block_size=block_size,
                       max_model_len=num_blocks * block_size)
    return LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget))


def prompts(n, seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(64) for _ in range(9)]
    return [(shared if i % 2 else []) + [rng.randrange(64) for _ in range(rng.randrange(1, 14))]
            for i in range(n)]


@pytest.mark.parametrize("budget", [1, 3, 7, 64])
def test_chunked_prefill_matches_closed_form(budget):
    eng = engine(budget, num_blocks=64)
    ps = prompts(6)
    outs = eng.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.token_ids == reference(p, 12, ALLOWED)
    assert eng.blocks.num_used_blocks() == 0


def test_preemption_restores_correctness():
    eng = engine(budget=32, num_blocks=12, max_seqs=8)   # 48 slots for 8 sequences of ~30 tokens
    ps = prompts(8, seed=1)
    params = SamplingParams(max_tokens=16, temperature=0)
    outs = eng.generate(ps, params)
    assert eng.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == reference(p, 16, ALLOWED)
        assert o.finish_reason == "length"
    assert eng.blocks.num_used_blocks() == 0
