"""Async scheduling (EngineConfig.async_scheduling): step N+1 is planned and launched before
step N's tokens are read. Against the toy runner, whose answer changes if any input token,
position or KV slot is wrong, and against the same requests run with the synchronous engine."""
import random

import pytest

from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.sequence import PENDING, SamplingParams
from toy import ToyRunner, reference, toy_tokenizer, word_tokens


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def make_engine(tok, async_scheduling=True, num_blocks=64, block_size=4, **cfg):
    runner = ToyRunner(len(tok), word_tokens(tok), num_blocks=num_blocks, block_size=block_size,
                       max_model_len=min(128, num_blocks * block_size))
    return LLMEngine(runner, tok, EngineConfig(async_scheduling=async_scheduling, **cfg))


def workload(tok, n=40, seed=0):
    rng = random.Random(seed)
    words = ["the cat sat", "on the mat", "hello world", "one two three", "the quick brown fox"]
    prompts = [tok.encode(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 6))))
               for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 20), temperature=0) for _ in prompts]
    return prompts, params


def summary(outs):
    return [(o.token_ids, o.text, o.finish_reason, o.usage.prompt_tokens, o.usage.completion_tokens)
            for o in outs]


def test_outputs_match_the_closed_form_and_free_every_block(tok):
    eng = make_engine(tok, num_blocks=40, max_num_seqs=12, max_num_batched_tokens=24)
    assert eng.async_scheduling
    prompts, params = workload(tok)
    outs = eng.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        assert o.token_ids == reference(p, sp.max_tokens, eng.runner.allowed)
        assert o.finish_reason == "length" and o.usage.completion_tokens == sp.max_tokens
    assert eng.blocks.num_used_blocks() == 0 and not eng.seqs and not eng.has_unfinished()
    assert eng.blocks.hit_tokens > 0   # blocks were hashed with the real tokens, not placeholders


def test_preemption_under_async_scheduling_loses_nothing(tok):
    eng = make_engine(tok, num_blocks=24, max_num_seqs=16, max_num_batched_tokens=32)
    prompts, params = workload(tok, n=30, seed=1)
    outs = eng.generate(prompts, params)
    assert eng.scheduler.num_preemptions > 0
    for p, sp, o in zip(prompts, params, outs):
        assert o.token_ids == reference(p, sp.max_tokens, eng.runner.allowed)
    assert eng.blocks.num_used_blocks() == 0


def test_stops_seeds_and_usage_equal_the_synchronous_engine(tok):
    prompts, params = workload(tok, n=24, seed=2)
    allowed = word_tokens(tok)
    mixed = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ref = reference(p, 20, allowed)
        if i % 4 == 0:    # a stop token partway
            sp = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[ref[i % 7]])
        elif i % 4 == 1:  # a stop string partway
            text = tok.decode(ref)
            sp = SamplingParams(max_tokens=20, temperature=0, stop=[text[4:7]])
        elif i % 4 == 2:  # sampled, seeded: the same draws whatever the batch
            sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=i)
        mixed.append(sp)
    sync = make_engine(tok, async_scheduling=False, max_num_batched_tokens=16)
    eng = make_engine(tok, max_num_batched_tokens=16)
    eng.eos_ids = sync.eos_ids = {allowed[3]}
    want, got = sync.generate(prompts, mixed), eng.generate(prompts, mixed)
    assert summary(got) == summary(want)
    assert {o.finish_reason for o in got} == {"stop", "length"}
    assert eng.blocks.num_used_blocks() == 0


def test_the_next_step_is_launched_before_a_token_is_delivered(tok):
    eng = make_engine(tok)
    prompt = tok.encode("hello world")
    eng.add_request(prompt, SamplingParams(max_tokens=4, temperature=0))
    assert eng.step() == [] and eng.runner.calls == 1          # step 1 launched, nothing read
    (first,) = eng.step()
    assert eng.runner.calls == 2 and first.token_ids == reference(prompt, 1, eng.runner.allowed)
    # the placeholder of step 1's token was filled from step 1's sampled tokens on the device
    written = eng.runner.cache[eng.runner.cache[:, 1] == len(prompt), 0].tolist()
    assert written == first.token_ids and PENDING not in written
    rest = []
    while eng.has_unfinished():
        rest += [t for o in eng.step() for t in o.token_ids]
    assert [*first.token_ids, *rest] == reference(prompt, 4, eng.runner.allowed)
    assert eng.runner.calls == 4   # a length-capped sequence is not planned past its last token


def test_a_stopped_sequence_runs_one_dropped_token_and_reports_none_of_it(tok):
    eng = make_engine(tok)
    prompt = tok.encode("the cat sat")
    ref = reference(prompt, 10, eng.runner.allowed)
    out = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[ref[2]]))[0]
    k = ref.index(ref[2])
    assert out.token_ids == ref[:k + 1] and out.usage.completion_tokens == k + 1
    assert eng.runner.calls == k + 2   # the step after the stop token ran, its token dropped
    assert eng.blocks.num_used_blocks() == 0


def test_abort_while_a_step_is_in_flight(tok):
    eng = make_engine(tok)
    keep = tok.encode("one two three")
    rid = eng.add_request(tok.encode("the quick brown fox"), SamplingParams(max_tokens=50, temperature=0))
    other = eng.add_request(keep, SamplingParams(max_tokens=12, temperature=0))
    got = {rid: [], other: []}
    for _ in range(4):
        for o in eng.step():
            got[o.request_id] += o.token_ids
    out = eng.abort(rid)   # its next token is on the device now
    assert out.finish_reason == "abort"
    assert out.usage.completion_tokens == len(got[rid]) == 3   # the pending token is not counted
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == other
            got[other] += o.token_ids
    assert got[other] == reference(keep, 12, eng.runner.allowed)
    assert eng.blocks.num_used_blocks() == 0


def test_async_scheduling_needs_a_runner_that_fills_pending_inputs(tok):
    class Plain(ToyRunner):
        accepts_pending_inputs = False
    runner = Plain(len(tok), word_tokens(tok))
    with pytest.raises(ValueError, match="accepts_pending_inputs.*async_scheduling=False"):
        LLMEngine(runner, tok, EngineConfig(async_scheduling=True))
    assert not LLMEngine(runner, tok, EngineConfig()).async_scheduling   # auto: CUDA runners only
    assert not make_engine(tok, async_scheduling=None).async_scheduling  # (the toy runs on the CPU)
