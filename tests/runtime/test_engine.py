"""Engine (sync and async) against the toy runner's closed form; detokenizer and stop strings."""
import asyncio
import random

import pytest

from kiln.runtime.detokenizer import Detokenizer, text_decoder
from kiln.runtime.engine import (AsyncEngine, EngineConfig, EngineStepError, LLMEngine,
                                 QueueFullError, RequestError)
from kiln.runtime.sequence import SamplingParams
from toy import ToyRunner, reference, toy_tokenizer, word_tokens

GREEDY = SamplingParams(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def make_engine(tok, num_blocks=64, block_size=4, **cfg):
    runner = ToyRunner(len(tok), word_tokens(tok), num_blocks=num_blocks, block_size=block_size,
                       max_model_len=min(128, num_blocks * block_size))
    return LLMEngine(runner, tok, EngineConfig(**cfg))


# -- detokenizer ---------------------------------------------------------------------------------
def stream(tok, ids, prompt=(), stop=()):
    d = Detokenizer(tok, list(prompt), list(stop))
    deltas = []
    for t in ids:
        deltas.append(d.add(t))
        if d.stopped:
            break
    deltas.append(d.flush())
    return deltas, d


def test_incremental_decode_handles_multibyte_tokens(tok):
    text = "über 中国 ñandú 🙂, hello world"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)    # some tokens hold half a character
    deltas, _ = stream(tok, ids, prompt=tok.encode("the cat"))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_the_direct_decoder_is_used_only_where_it_decodes_the_same(tok):
    """The Rust decoder behind a fast tokenizer replaces transformers' decode wrapper, but
    not where the wrapper does more (clean-up of spaces, an overridden decode)."""
    ids = tok.encode("hello world, über 中国 🙂 ! the end .")
    backend = tok.backend_tokenizer
    fast = text_decoder(tok)
    assert fast.__name__ == "direct" and text_decoder(tok) is fast    # decided once
    assert fast(ids) == tok.decode(ids, skip_special_tokens=True)
    assert text_decoder(tok, skip_special_tokens=False)(ids + [0]) == tok.decode(ids + [0])

    class CleansUp:
        backend_tokenizer = backend
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens=False):
            return backend.decode(ids, skip_special_tokens=skip_special_tokens).replace(" .", ".")

    class Overrides(CleansUp):       # a decode of its own, which the probe tells apart
        clean_up_tokenization_spaces = False

        def decode(self, ids, skip_special_tokens=False):
            return backend.decode(ids, skip_special_tokens=skip_special_tokens).lower()
    for wrapper in (CleansUp(), Overrides()):
        assert text_decoder(wrapper).__name__ == "wrapped"
        assert text_decoder(wrapper)(ids) == wrapper.decode(ids, skip_special_tokens=True)


def test_incomplete_character_is_flushed_at_the_end(tok):
    ids = tok.encode("日")[:-1]
    deltas, _ = stream(tok, ids)
    assert deltas[:-1] == [""] * len(ids) and deltas[-1] == tok.decode(ids)


def test_stop_string_across_token_boundaries(tok):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text)
    deltas, d = stream(tok, ids, stop=["fox jum"])
    assert d.stopped and "".join(deltas) == "the quick brown "
    emitted = ""
    for delta in deltas:                  # never shows a piece of the stop string early
        emitted += delta
        assert "fox" not in emitted


def test_held_back_text_is_released_when_no_stop_follows(tok):
    ids = tok.encode("hello world, hello kiln")
    deltas, d = stream(tok, ids, stop=["hello kilt", "zzz"])
    assert not d.stopped and "".join(deltas) == "hello world, hello kiln"
    assert any("hello kiln" in d for d in deltas)   # "hello" was held until " kiln" ruled it out


def test_earliest_stop_string_wins(tok):
    deltas, _ = stream(tok, tok.encode("one two three four five"), stop=["four", "two"])
    assert "".join(deltas) == "one "


# -- sync engine ---------------------------------------------------------------------------------
def test_many_requests_match_closed_form_and_free_everything(tok):
    eng = make_engine(tok, num_blocks=40, max_num_seqs=12, max_num_batched_tokens=24)
    rng = random.Random(0)
    words = ["the cat sat", "on the mat", "hello world", "one two three", "the quick brown fox"]
    prompts = [tok.encode(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 5))))
               for _ in range(30)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 16), temperature=0) for _ in prompts]
    outs = eng.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        ref = reference(p, sp.max_tokens, eng.runner.allowed)
        assert o.token_ids == ref and o.text == tok.decode(ref)
        assert o.finish_reason == "length" and o.usage.completion_tokens == sp.max_tokens
    assert eng.blocks.num_used_blocks() == 0 and not eng.seqs
    assert eng.blocks.hit_tokens > 0


def test_prefix_cache_hits_are_reported_in_usage(tok):
    eng = make_engine(tok)
    prompt = tok.encode("paged attention reads the cache block by block, the quick brown fox")
    first = eng.generate([prompt], GREEDY)[0]
    second = eng.generate([prompt + tok.encode(" jumps")], GREEDY)[0]
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == (len(prompt) // 4) * 4 > 0
    assert second.token_ids == reference(prompt + tok.encode(" jumps"), 10, eng.runner.allowed)


def test_stop_token_and_eos(tok):
    eng = make_engine(tok)
    prompt = tok.encode("hello world")
    ref = reference(prompt, 10, eng.runner.allowed)
    out = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[ref[3]]))[0]
    k = ref.index(ref[3])
    assert out.finish_reason == "stop" and out.token_ids == ref[:k + 1]
    assert out.text == tok.decode(ref[:k])              # the stop token itself is not text
    eng.eos_ids = {ref[2]}
    k = ref.index(ref[2])
    assert eng.generate([prompt], GREEDY)[0].token_ids == ref[:k + 1]
    out = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref


def test_stop_string_in_engine(tok):
    eng = make_engine(tok)
    prompt = tok.encode("the cat")
    full = tok.decode(reference(prompt, 10, eng.runner.allowed))
    stop = full[5:8]
    out = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index(stop)]


def test_abort_frees_blocks(tok):
    eng = make_engine(tok)
    rid = eng.add_request(tok.encode("the quick brown fox jumps"), SamplingParams(max_tokens=50, temperature=0))
    eng.add_request(tok.encode("hello"), GREEDY)
    eng.step(), eng.step()
    used = eng.blocks.num_used_blocks()
    out = eng.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert eng.blocks.num_used_blocks() < used and eng.abort(rid) is None
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_used_blocks() == 0


def test_request_validation_and_back_pressure(tok):
    eng = make_engine(tok, max_waiting=2)
    with pytest.raises(RequestError, match="maximum context length is 128"):
        eng.add_request([5] * 100, SamplingParams(max_tokens=29))
    with pytest.raises(RequestError, match="top_p"):
        eng.add_request([5], SamplingParams(top_p=0))
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([], SamplingParams())
    eng.add_request([5], GREEDY), eng.add_request([6], GREEDY)
    with pytest.raises(QueueFullError):
        eng.add_request([7], GREEDY)


def test_seeded_requests_reproduce_across_batches(tok):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    prompt = tok.encode("one two")
    alone = make_engine(tok).generate([prompt], p)[0].token_ids
    crowd = make_engine(tok).generate([tok.encode("hello"), prompt, tok.encode("the")],
                                      [SamplingParams(temperature=1.0), p, SamplingParams(seed=3)])
    assert crowd[1].token_ids == alone
    assert alone != reference(prompt, 12, make_engine(tok).runner.allowed)   # really sampled


# -- async engine --------------------------------------------------------------------------------
def test_async_engine_concurrent_streams(tok):
    eng = make_engine(tok, num_blocks=24, max_num_batched_tokens=16)
    aeng = AsyncEngine(eng)

    async def one(i):
        prompt = tok.encode("the cat sat " * (i % 3 + 1))
        stream = aeng.add_request(prompt, SamplingParams(max_tokens=8 + i % 5, temperature=0))
        text, ids = "", []
        async for out in stream:
            text += out.text
            ids += out.token_ids
        return prompt, ids, text, out

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    try:
        for prompt, ids, text, last in asyncio.run(main()):
            assert ids == reference(prompt, len(ids), eng.runner.allowed) and text == tok.decode(ids)
            assert last.finished and last.finish_reason == "length"
        assert eng.blocks.num_used_blocks() == 0
    finally:
        aeng.shutdown()


def test_async_abort_and_runner_failure(tok):
    eng = make_engine(tok)
    aeng = AsyncEngine(eng)

    async def main():
        stream = aeng.add_request(tok.encode("hello world"), SamplingParams(max_tokens=100, temperature=0))
        await stream.__anext__()
        stream.abort()
        for _ in range(100):
            if eng.blocks.num_used_blocks() == 0 and not eng.seqs:
                break
            await asyncio.sleep(0.01)
        assert eng.blocks.num_used_blocks() == 0
        real = eng.runner.execute
        eng.runner.execute = lambda batch: 1 / 0
        with pytest.raises(EngineStepError):
            await aeng.add_request(tok.encode("the"), GREEDY).collect()
        eng.runner.execute = real                        # the engine lives on
        out = await aeng.add_request(tok.encode("the"), GREEDY).collect()
        assert out.token_ids == reference(tok.encode("the"), 10, eng.runner.allowed)

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_shutdown_ends_open_streams(tok):
    eng = make_engine(tok)
    eng.runner.delay = 0.01
    aeng = AsyncEngine(eng)

    async def main():
        stream = aeng.add_request(tok.encode("hello"), SamplingParams(max_tokens=100, temperature=0))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
        with pytest.raises(EngineStepError, match="shut down"):
            await stream.collect()

    asyncio.run(main())
    assert eng.blocks.num_used_blocks() == 0
