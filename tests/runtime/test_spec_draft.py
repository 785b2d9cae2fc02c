"""Speculative decoding with a draft model (runtime.spec_draft, `--speculative draft:PATH:K`):
the spelling; on the toy runner, whose answer is a closed form of the context it reads back
through the KV cache, a draft identical to the target (every draft stands) and one that is
wrong at known places (every draft is the draft model's closed form, so its KV cache was
rolled back right after each rejection, and the draft cache holds exactly the tokens that
stood), a draft pool too small for every sequence, aborts, seeded sampling beside greedy;
tiny compiled models of two families, greedy token for token that of plain decoding
(Llama-GQA drafting for itself: every draft stands; a 3-layer Qwen3 with its first layer
as draft)."""
import random

import pytest
import torch

import models
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model_runner import PagedModelRunner
from kiln.runtime.sequence import SamplingParams, Sequence
from kiln.runtime.spec_decode import MAX_K, SpeculativeConfig, SpeculativeError
from kiln.runtime.spec_draft import DraftModelProposer
from kiln.serving import compile_serving, model_weights
from toy import ToyRunner, next_token, reference, toy_tokenizer, word_tokens


# -- the --speculative spelling ---------------------------------------------------------------
@pytest.mark.parametrize("text, path, k", [
    ("draft:smollm2:4", "smollm2", 4),
    ("draft:/models/SmolLM2-135M:2", "/models/SmolLM2-135M", 2),
    (r"draft:C:\models\small.gguf:3", r"C:\models\small.gguf", 3),   # K after the last ':'
])
def test_parse_draft(text, path, k):
    c = SpeculativeConfig.parse(text)
    assert (c.method, c.draft_model, c.k, str(c)) == ("draft", path, k, text)


@pytest.mark.parametrize("text, says", [
    ("draft", "number of draft tokens is missing"), ("draft:smollm2", "the draft model and then"),
    ("draft::4", "the draft model and then"), ("draft:smollm2:x", "K must be a whole number"),
    (f"draft:smollm2:{MAX_K + 1}", f"in [1, {MAX_K}]"),
])
def test_parse_draft_errors_name_the_problem_and_the_spelling(text, says):
    with pytest.raises(SpeculativeError) as e:
        SpeculativeConfig.parse(text)
    assert says in str(e.value) and "draft:PATH:K" in str(e.value)


# -- the toy runner as target and as draft -------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


class WrongSometimes(ToyRunner):
    """A draft model that predicts the toy model's token except where that token plus the
    context length is a multiple of 3: there the next allowed token. Its answer is still a
    function of the context it reads back through its own KV cache."""

    def execute(self, batch):
        logits = super().execute(batch)
        best = logits.argmax(-1)
        for i, (t, length) in enumerate(zip(best.tolist(), batch.context_lens.tolist())):
            if (t + length) % 3 == 0:
                logits[i, self.allowed[(self.allowed.index(t) + 1) % len(self.allowed)]] = 1.0
        return logits


def wrong_sometimes(context: list[int], allowed: list[int]) -> int:
    """WrongSometimes's closed form."""
    t = next_token(context, allowed)
    return allowed[(allowed.index(t) + 1) % len(allowed)] if (t + len(context)) % 3 == 0 else t


def draft_engine(tok, draft_cls=ToyRunner, k=4, draft_blocks=64, target_blocks=64, **cfg):
    allowed = word_tokens(tok)
    runner = ToyRunner(len(tok), allowed, num_blocks=target_blocks, block_size=4,
                       max_model_len=min(128, target_blocks * 4))
    draft = draft_cls(len(tok), allowed, num_blocks=draft_blocks, block_size=8, max_model_len=128)
    return LLMEngine(runner, tok, EngineConfig(
        speculative=SpeculativeConfig.parse(f"draft:toy:{k}"), **cfg), draft_runner=draft)


def prompts_of(allowed, rng, n=3):
    return [[rng.choice(allowed) for _ in range(rng.randrange(2, 14))] for _ in range(n)]


def generate_checked(eng, seed: int, n: int, max_tokens: int):
    """n toy prompts to the end, greedy: each output must be plain decoding's (`reference`)."""
    allowed = eng.runner.allowed
    prompts = prompts_of(allowed, random.Random(seed), n)
    outs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [reference(p, max_tokens, allowed) for p in prompts]
    return eng.spec.stats


def test_a_draft_equal_to_the_target_has_every_draft_accepted(tok):
    eng = draft_engine(tok, k=4, max_num_batched_tokens=16)   # prefills in chunks beside drafts
    s = generate_checked(eng, seed=0, n=4, max_tokens=30)
    assert s.verify_steps > 20 and s.accepted_tokens == s.draft_tokens, s
    assert s.mean_accepted_length > 3.5
    proposer = eng.spec.proposer
    assert isinstance(proposer, DraftModelProposer) and not proposer.caches
    assert proposer.blocks.num_free_blocks() == proposer.blocks.num_blocks


def test_after_a_rejection_the_draft_cache_is_rolled_back_to_what_stood(tok):
    """Every draft is the draft model's closed form over the sequence's tokens and the
    drafts before it (a stale K/V entry left past a rejection would change it), and after
    each verify step the draft cache holds the sequence's tokens before the step and the
    drafts that stood, of the k - 1 it ran (the last draft is never run)."""
    eng = draft_engine(tok, WrongSometimes, k=4)
    allowed = eng.runner.allowed
    proposer = eng.spec.proposer
    propose = proposer.propose_batch
    proposed = {}   # per sequence that drafted this step: (its tokens then, drafts)

    def checked(seqs, ks):
        drafts = propose(seqs, ks)
        for seq, draft in zip(seqs, drafts):
            context = list(seq.token_ids)
            for d in draft:
                assert d == wrong_sometimes(context, allowed)
                context.append(d)
            proposed[seq] = (seq.num_tokens, len(draft))
        return drafts
    proposer.propose_batch = checked
    prompts = prompts_of(allowed, random.Random(1))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    rejections = 0
    while eng.has_unfinished():
        proposed.clear()
        for out in eng.step():
            got[out.request_id] += out.token_ids
        for seq, (n, drafted) in proposed.items():
            if seq.finished or not drafted:
                continue
            accepted = seq.num_tokens - n - 1
            assert proposer.cached_tokens(seq) == n + min(accepted, drafted - 1), (seq, n, drafted)
            rejections += accepted < drafted
    assert [got[i] for i in ids] == [reference(p, 40, allowed) for p in prompts]
    s = eng.spec.stats
    assert 0 < s.accepted_tokens < s.draft_tokens and rejections > 5, (s, rejections)
    assert proposer.blocks.num_free_blocks() == proposer.blocks.num_blocks


def test_the_rollback_keeps_the_drafts_that_became_tokens_whatever_came_after(tok):
    """The proposer alone: a sequence takes two of its three drafts run, then tokens of
    another source (plain decoding while drafting was off); the draft cache keeps the
    prompt and those two, and the next drafts read the new tokens, not the stale third."""
    allowed = word_tokens(tok)
    proposer = DraftModelProposer(ToyRunner(len(tok), allowed, num_blocks=16, block_size=4), len(tok))
    prompt = [allowed[5], allowed[9], allowed[2]]
    seq = Sequence(prompt, SamplingParams(max_tokens=40, temperature=0))
    (drafts,) = proposer.propose_batch([seq], [4])
    assert drafts == reference(prompt, 4, allowed)
    assert proposer.cached_tokens(seq) == len(prompt) - 1   # (its last token runs again)
    (drafts,) = proposer.propose_batch([seq], [4])           # nothing new: the same drafts
    assert drafts == reference(prompt, 4, allowed)
    other = [t for t in allowed if t != drafts[2]][:5]
    seq.token_ids += drafts[:2] + other
    assert proposer.cached_tokens(seq) == len(prompt) + 2
    (again,) = proposer.propose_batch([seq], [3])
    assert again == reference(seq.token_ids, 3, allowed)
    proposer.release(seq)
    assert proposer.blocks.num_free_blocks() == proposer.blocks.num_blocks


def test_a_draft_pool_too_small_for_every_sequence(tok):
    """Six sequences, a target pool that preempts and a draft pool of 6 blocks of 8 tokens:
    sequences evict each other's draft caches or draft nothing; the tokens are still plain
    decoding's and both pools end empty."""
    eng = draft_engine(tok, k=3, draft_blocks=6, target_blocks=14, max_num_batched_tokens=16,
                       max_num_seqs=6)
    s = generate_checked(eng, seed=2, n=6, max_tokens=24)
    assert s.verify_steps > 0 and s.accepted_tokens == s.draft_tokens
    assert eng.scheduler.num_preemptions > 0
    proposer = eng.spec.proposer
    assert proposer.blocks.num_free_blocks() == proposer.blocks.num_blocks
    assert eng.blocks.num_free_blocks() == eng.blocks.num_blocks


def test_sampled_requests_with_a_draft_model_reproduce_with_a_seed(tok):
    """A seeded sampled request beside a greedy one: the drafts go through rejection sampling
    (the greedy draft is a point-mass proposal), the same seed gives the same tokens, and the
    greedy request keeps plain decoding's."""
    def run():
        eng = draft_engine(tok, WrongSometimes, k=3)
        sampled = SamplingParams(max_tokens=24, temperature=0.7, top_k=2, seed=7, ignore_eos=True)
        greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        return eng.generate([[5, 6, 7], [8, 9]], [sampled, greedy]), eng
    (a, g), eng = run()
    (b, _), _ = run()
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert g.token_ids == reference([8, 9], 24, eng.runner.allowed)
    assert eng.spec.stats.accepted_tokens > 0


def test_an_aborted_sequence_frees_its_draft_blocks(tok):
    eng = draft_engine(tok, k=4)
    allowed = eng.runner.allowed
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    a = eng.add_request([allowed[1], allowed[2], allowed[3]] * 5, params)
    b = eng.add_request([allowed[4], allowed[5]], params)
    for _ in range(4):
        eng.step()
    proposer = eng.spec.proposer
    held = {seq.request_id: len(cache.block_table) for seq, cache in proposer.caches.items()}
    assert held[a] > 0 and held[b] > 0
    eng.abort(a)
    assert [s.request_id for s in proposer.caches] == [b]
    assert proposer.blocks.num_used_blocks() == held[b]


# -- compiled models --------------------------------------------------------------------------------
def paged_runner(model, compiled, padded=False):
    return PagedModelRunner(compiled.fn, compiled.graph, model_weights(model, compiled.graph),
                            num_blocks=96, max_model_len=128, vocab_size=model.config.vocab_size,
                            pad_batches=padded)


def plain_and_drafted(target_runner, draft_runner, prompts, spec, max_tokens=32):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    plain = LLMEngine(target_runner, toy_tokenizer(), EngineConfig(max_num_seqs=4)).generate(prompts, params)
    eng = LLMEngine(target_runner, toy_tokenizer(), EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=24, speculative=SpeculativeConfig.parse(spec)),
        draft_runner=draft_runner)
    drafted = eng.generate(prompts, params)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    proposer = eng.spec.proposer
    assert proposer.blocks.num_free_blocks() == proposer.blocks.num_blocks
    return eng.spec.stats


def test_a_compiled_model_drafting_for_itself_has_every_draft_accepted():
    """Llama-GQA, its draft runner a second one over the same compiled graph with a KV cache
    of its own, padding its batches to buckets as CUDA-graph replay does."""
    model = models.tiny_llama_gqa()
    compiled = compile_serving(model, block_size=4)
    rng = random.Random()
    loop = [rng.randrange(3, 300) for _ in range(5)]
    prompts = [loop * 3, [rng.randrange(3, 300) for _ in range(30)], [rng.randrange(3, 300)]]
    stats = plain_and_drafted(paged_runner(model, compiled), paged_runner(model, compiled, padded=True),
                              prompts, "draft:self:3")
    assert stats.verify_steps > 20 and stats.accepted_tokens == stats.draft_tokens, stats


def test_a_smaller_model_of_the_same_family_drafts_for_a_bigger_one():
    """Qwen3 (q/k-norm) with 3 layers, drafted for by its own first layer, embeddings and
    head: some drafts stand, some not; the tokens are plain decoding's."""
    from transformers import Qwen3Config
    config = {**models.COMMON, "num_key_value_heads": 2}
    target = models._build(Qwen3Config(**{**config, "num_hidden_layers": 3}), "sdpa")
    draft = models._build(Qwen3Config(**{**config, "num_hidden_layers": 1}), "sdpa")
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("model.layers.") or k.startswith("model.layers.0.")})
    rng = random.Random()
    loop = [rng.randrange(3, 300) for _ in range(4)]
    prompts = [loop * 4, [rng.randrange(3, 300) for _ in range(9)]]
    stats = plain_and_drafted(paged_runner(target, compile_serving(target, block_size=4)),
                              paged_runner(draft, compile_serving(draft, block_size=8)),
                              prompts, "draft:first-layer:4")
    assert stats.verify_steps > 0 and stats.draft_tokens > 0, stats
