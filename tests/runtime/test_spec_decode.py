"""Speculative decoding (runtime.spec_decode): parsing, the n-gram drafter, greedy output
token for token that of plain decoding (the toy runner's closed form under drafts that are
all right, partly right and wrong, with preemption, prefix hits and prefill chunks in the
same steps; tiny compiled Llama-GQA and Qwen3 with the n-gram drafter), rejection sampling
that keeps the target distribution, KV blocks of rejected drafts freed, auto-off."""
import random

import numpy as np
import pytest
import torch

import models
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model_runner import PagedModelRunner
from kiln.runtime.sequence import SamplingParams, Sequence
from kiln.runtime.spec_decode import (AUTO_OFF_COOLDOWN, AUTO_OFF_WINDOW, MAX_K, MAX_VERIFY_ROWS,
                                      NO_DRAFT_COOLDOWN, NgramProposer,
                                      SpecDecoder, SpeculativeConfig, SpeculativeError, SpecState)
from kiln.serving import compile_serving, model_weights
from toy import ToyRunner, reference, toy_tokenizer, word_tokens


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def toy_engine(tok, spec="ngram:4", num_blocks=64, **cfg):
    runner = ToyRunner(len(tok), word_tokens(tok), num_blocks=num_blocks, block_size=4,
                       max_model_len=min(128, num_blocks * 4))
    return LLMEngine(runner, tok, EngineConfig(
        speculative=SpeculativeConfig.parse(spec) if spec else None, **cfg))


# -- the --speculative spelling ---------------------------------------------------------------
def test_parse():
    c = SpeculativeConfig.parse("ngram:4")
    assert (c.method, c.k, str(c)) == ("ngram", 4, "ngram:4")


@pytest.mark.parametrize("text, says", [
    ("nrgam:4", "unknown method 'nrgam'"), ("ngram", "number of draft tokens is missing"),
    ("ngram:four", "K must be a whole number"), ("ngram:0", f"in [1, {MAX_K}], got '0'"),
    (f"ngram:{MAX_K + 1}", f"in [1, {MAX_K}]"), ("ngram:4:layers=1-2", "takes no options"),
])
def test_parse_errors_name_the_problem_and_the_spelling(text, says):
    with pytest.raises(SpeculativeError) as e:
        SpeculativeConfig.parse(text)
    assert says in str(e.value) and "ngram:K" in str(e.value)


# -- the n-gram drafter ------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_match():
    p = NgramProposer(max_n=3, min_n=2)
    #          0  1  2  3  4  5  6  7  8  9 10 11 12
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    assert p.propose(tokens, 2) == [4, 5]         # the longest suffix first: "1 2 3" at 0
    assert NgramProposer(2, 2).propose(tokens, 2) == [7, 8]   # "2 3" last seen at 6
    assert NgramProposer(2, 2).propose(tokens, 10) == [7, 8, 1, 2, 3]   # up to the end
    assert p.propose([1, 2, 3, 4], 3) == []       # no suffix recurs
    assert p.propose([5], 3) == []


# -- greedy: exactly the tokens of plain decoding ------------------------------------------------
class Oracle(NgramProposer):
    """Drafts the true continuation (`reference`), corrupted at random positions: every
    acceptance length, 0 to k, occurs."""

    def __init__(self, allowed, wrong=0.3, seed=0):
        self.allowed, self.wrong, self.rng = allowed, wrong, random.Random(seed)

    def propose(self, tokens, k):
        true = reference(tokens, k, self.allowed)
        return [self.rng.choice(self.allowed) if self.rng.random() < self.wrong else t for t in true]


def test_greedy_is_token_identical_with_preemption_prefix_hits_and_chunks(tok):
    """Many sequences (some sharing a prefix) in a pool too small for all of them, a token
    budget that cuts prefills into chunks and drafts short: the toy runner's tokens, every
    one, and after each step no sequence holds a block past its tokens."""
    eng = toy_engine(tok, "ngram:4", num_blocks=12, max_num_batched_tokens=16, max_num_seqs=6)
    allowed = eng.runner.allowed
    eng.spec.proposer = Oracle(allowed)
    rng = random.Random(1)
    shared = [rng.choice(allowed) for _ in range(9)]
    prompts = [(shared if i % 2 else []) + [rng.choice(allowed) for _ in range(rng.randrange(2, 14))]
               for i in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id] += out.token_ids
        for seq in eng.scheduler.running:
            assert len(seq.block_table) <= -(-(seq.num_tokens) // 4), seq
    assert [got[i] for i in ids] == [reference(p, 24, allowed) for p in prompts]
    s = eng.spec.stats
    assert s.verify_steps > 20 and 0 < s.accepted_tokens < s.draft_tokens
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.num_free_blocks() == eng.blocks.num_blocks


def test_drafts_stop_at_max_tokens_and_eos(tok):
    eng = toy_engine(tok, "ngram:8")
    allowed = eng.runner.allowed
    eng.spec.proposer = Oracle(allowed, wrong=0.0)
    prompt = [allowed[3], allowed[5], allowed[7]]
    want = reference(prompt, 20, allowed)
    out = eng.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want[:5] and out.finish_reason == "length"
    # a stop token inside the accepted drafts ends the output there
    stop = want[6]
    first = want.index(stop)
    out = eng.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == want[:first + 1] and out.finish_reason == "stop"
    assert eng.blocks.num_free_blocks() == eng.blocks.num_blocks


@pytest.mark.parametrize("family, padded", [("llama_gqa", False), ("qwen3", True)])
def test_ngram_greedy_matches_plain_decoding_on_compiled_models(family, padded):
    """padded: batches padded to the runner's buckets, as CUDA-graph replay runs them."""
    model = models.TINY_MODELS[family]()
    compiled = compile_serving(model, block_size=4)
    runner = PagedModelRunner(compiled.fn, compiled.graph, model_weights(model, compiled.graph),
                              num_blocks=96, max_model_len=128, vocab_size=model.config.vocab_size,
                              pad_batches=padded)
    rng = random.Random(0)   # unseeded, some draws gave a random model no drafts to accept
    loop = [rng.randrange(3, 300) for _ in range(5)]
    prompts = [loop * 4, [rng.randrange(3, 300) for _ in range(11)], loop * 2 + [7, 8]]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = LLMEngine(runner, toy_tokenizer(), EngineConfig(max_num_seqs=4)).generate(prompts, params)
    eng = LLMEngine(runner, toy_tokenizer(), EngineConfig(
        max_num_seqs=4, speculative=SpeculativeConfig.parse("ngram:4")))
    spec = eng.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.spec.stats.accepted_tokens > 0   # the repeated prompts do get drafts accepted


# -- sampling: rejection sampling keeps the target distribution ------------------------------------
def test_rejection_sampling_keeps_the_target_distribution():
    """k = 2 drafts, one likely and one unlikely under the target, at temperature 0.8 with
    top-k 4: over 20000 verify steps the first token follows p0 and, where it was the first
    draft, the second follows p1 (each within 5 standard errors; tokens outside the top-k
    never appear)."""
    torch.manual_seed(0)
    V, n = 8, 20000
    base = torch.tensor([[2.0, 1.5, 0.5, 0.0, -0.5, -1.0, 1.0, -2.0],
                         [0.0, 1.0, 2.0, -1.0, 0.5, 0.3, -0.2, 1.2],
                         [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.8, top_k=4)
    draft = [0, 5]            # p0(0) is large; 5 is outside row 1's top 4: always rejected
    dec = SpecDecoder(SpeculativeConfig.parse("ngram:2"))
    seqs = [Sequence([1], params) for _ in range(n)]
    for s in seqs:
        s.spec = SpecState()
    out = dec.accept(base.repeat(n, 1), seqs, [draft] * n)

    def target(row):
        x = base[row] / 0.8
        keep = x >= x.topk(4).values[-1]
        return torch.softmax(x.masked_fill(~keep, float("-inf")), -1).double()

    def check(samples, p):
        m = len(samples)
        freq = torch.bincount(torch.tensor(samples), minlength=V).double() / m
        se = (p * (1 - p) / m).sqrt()
        assert (freq[p == 0] == 0).all(), (freq, p)
        assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)

    check([t[0] for t in out], target(0))
    second = [t[1] for t in out if t[0] == draft[0]]
    assert len(second) > 5000
    check(second, target(1))
    assert all(len(t) <= 2 for t in out)   # draft 5 never stands: no bonus token from row 2


def test_sampled_requests_with_drafts_stay_in_their_top_k_and_reproduce_with_a_seed(tok):
    def run():
        eng = toy_engine(tok, "ngram:4")
        eng.spec.proposer = Oracle(eng.runner.allowed, wrong=0.2)
        p = SamplingParams(max_tokens=24, temperature=0.7, top_k=2, seed=7, ignore_eos=True)
        return eng.generate([[5, 6, 7], [8, 9]], [p, SamplingParams(max_tokens=24, temperature=0)]), eng
    (a, g), eng = run()
    (b, _), _ = run()
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert g.token_ids == reference([8, 9], 24, eng.runner.allowed)   # greedy beside it
    assert eng.spec.stats.accepted_tokens > 0


# -- auto-off --------------------------------------------------------------------------------
class Wrong(NgramProposer):
    def __init__(self, allowed):
        self.allowed = allowed

    def propose(self, tokens, k):
        true = reference(tokens, 1, self.allowed)[0]
        return [next(t for t in self.allowed if t != true)] * k


def test_low_acceptance_turns_drafting_off_for_a_while(tok):
    eng = toy_engine(tok, "ngram:3")
    eng.spec.proposer = Wrong(eng.runner.allowed)
    n = 2 * AUTO_OFF_WINDOW + AUTO_OFF_COOLDOWN + 4
    out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == reference([5, 6, 7], n, eng.runner.allowed)
    s = eng.spec.stats
    # drafting for a window, off for the cooldown, drafting for a window again
    assert s.auto_off == 2 and s.verify_steps == 2 * AUTO_OFF_WINDOW and s.accepted_tokens == 0
    text = eng.metrics.render().decode()
    assert f"kiln_spec_draft_tokens_total {float(3 * s.verify_steps)}" in text
    assert "kiln_spec_accepted_tokens_total 0.0" in text
    assert "kiln_spec_mean_accepted_length 1.0" in text and "kiln_spec_auto_off 2.0" in text


def test_a_large_batch_drafts_nothing(tok):
    """Past MAX_VERIFY_ROWS verify rows a step drafts for nobody (a large batch reads the
    weights once for many tokens already); the output stays plain decoding's."""
    k = 4
    n = MAX_VERIFY_ROWS // (1 + k) + 1
    eng = toy_engine(tok, f"ngram:{k}", num_blocks=256, max_num_seqs=n)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6] for _ in range(n)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = eng.generate(prompts, params)
    assert all(o.token_ids == reference(p, 12, eng.runner.allowed) for o, p in zip(outs, prompts))
    s = eng.spec.stats
    assert s.large_batch_steps > 0 and s.verify_steps == 0, s


def test_steps_that_draft_nothing_run_asynchronously(tok, monkeypatch):
    """With async scheduling, a step in which nothing may draft (sequences auto-off after
    drafts that found nothing, or more rows than MAX_VERIFY_ROWS) is launched ahead like a
    plain one; the step in flight is finished before a drafting step. Output: the closed form,
    whatever the mix."""
    eng = toy_engine(tok, "ngram:4", num_blocks=256, async_scheduling=True, max_num_seqs=16)
    assert eng.async_scheduling and eng.spec.pause_without_drafts

    class SomeRight(Oracle):   # right drafts for the prompts that start 5 6 7, none for the rest
        def propose(self, tokens, k):
            return super().propose(tokens, k) if tokens[:3] == [5, 6, 7] else []
    eng.spec.proposer = SomeRight(eng.runner.allowed, wrong=0.2)
    launches = []
    launch = eng._launch
    monkeypatch.setattr(eng, "_launch", lambda *a: launches.append(1) or launch(*a))
    rng = random.Random(3)
    # 5 sequences x (1 + 4) rows: within MAX_VERIFY_ROWS, so they draft until auto-off
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6]] * 3 + [[rng.randrange(3, len(tok)) for _ in range(9)]
                                                 for _ in range(2)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    outs = eng.generate(prompts, params)
    assert all(o.token_ids == reference(p, 60, eng.runner.allowed) for o, p in zip(outs, prompts))
    s = eng.spec.stats
    assert s.verify_steps > 0 and s.accepted_tokens > 0, s
    assert launches, "no step ran asynchronously"
    assert eng.blocks.num_used_blocks() == 0 and not eng.has_unfinished()


def test_drafts_that_find_nothing_turn_a_sequence_off(tok):
    """No n-gram recurs in a sequence of distinct tokens: after AUTO_OFF_WINDOW steps with no
    draft the sequence decodes plainly for NO_DRAFT_COOLDOWN tokens (and can run ahead)."""
    eng = toy_engine(tok, "ngram:4", num_blocks=128)
    eng.spec.pause_without_drafts = True   # (as an engine with async scheduling sets it)
    seq = Sequence(list(range(3, 12)), SamplingParams(max_tokens=200, temperature=0))
    seq.num_computed = seq.num_tokens - 1   # decoding: its last token pending
    eng.spec.proposer = type("Nothing", (NgramProposer,), {"propose": lambda self, tokens, k: []})()
    for _ in range(AUTO_OFF_WINDOW):
        assert eng.spec.may_draft([seq])
        eng.spec.propose([seq])
    assert not eng.spec.may_draft([seq]) and eng.spec.stats.auto_off == 1
    assert seq.spec.off_until == seq.num_tokens + NO_DRAFT_COOLDOWN


def test_a_drafter_that_cannot_skip_steps_keeps_the_engine_synchronous(tok, monkeypatch):
    monkeypatch.delattr(NgramProposer, "async_between_drafts")
    with pytest.raises(ValueError, match="--no-async-scheduling"):
        toy_engine(tok, "ngram:4", async_scheduling=True)
    assert not toy_engine(tok, "ngram:4").async_scheduling   # (auto: sync, the toy is a CPU runner)


# -- layerskip: the model minus some decoder layers drafts --------------------------------------
def test_layerskip_greedy_matches_plain_decoding():
    """A 4-layer Llama drafting with layers skipped (the default rule: 1-2), its KV caches
    those of the kept layers: every token that of plain decoding."""
    import contextlib

    from transformers import LlamaConfig

    from kiln.serving import ServingConfig, layer_skip_runner
    model = models._build(LlamaConfig(**{**models.COMMON, "num_hidden_layers": 4}), "sdpa")
    compiled = compile_serving(model, block_size=4)
    runner = PagedModelRunner(compiled.fn, compiled.graph, model_weights(model, compiled.graph),
                              num_blocks=64, max_model_len=128, vocab_size=model.config.vocab_size)
    config = SpeculativeConfig.parse("layerskip:3")
    draft = layer_skip_runner(model, runner, ServingConfig(speculative=config), "cpu", 4,
                              lambda name: contextlib.nullcontext(), "cpu", {})
    assert len(draft.caches) == 2 * 2 and all(
        any(c is t for t in runner.caches.values()) for c in draft.caches.values())
    rng = random.Random()
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (6, 13, 3)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLMEngine(runner, toy_tokenizer(), EngineConfig(max_num_seqs=4)).generate(prompts, params)
    eng = LLMEngine(runner, toy_tokenizer(), EngineConfig(max_num_seqs=4, speculative=config),
                    draft_runner=draft)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in plain]
    assert eng.spec.stats.verify_steps > 0
    assert eng.blocks.num_free_blocks() == eng.blocks.num_blocks


def test_layerskip_spelling_and_a_model_it_cannot_skip():
    assert SpeculativeConfig.parse("layerskip:3:layers=8-15").skipped_layers(30) == list(range(8, 16))
    assert SpeculativeConfig.parse("layerskip:3").skipped_layers(30) == list(range(7, 23))
    with pytest.raises(SpeculativeError, match="layers=A-B"):
        SpeculativeConfig.parse("layerskip:3:layers=15-8")
    from kiln.passes.spec import LayerSkipError, layer_skip_draft
    from kiln.serving import capture_serving
    g = capture_serving(models.tiny_llama())
    with pytest.raises(LayerSkipError, match="decoder layers 0-1"):
        layer_skip_draft(g, [2])


@pytest.mark.parametrize("invariant_verify", [True, False])
def test_verify_steps_run_batch_invariant_kernels(invariant_verify):
    """EngineConfig.invariant_verify (kiln serve --batch-invariant verify, the default): the
    runner calls the compiled step under batch_invariant() exactly for the steps that verify
    drafts (on a GPU the kernels then round each row as a one-row step)."""
    from kiln.backends.batch_invariance import enabled
    model = models.TINY_MODELS["llama_gqa"]()
    compiled = compile_serving(model, block_size=4)
    runner = PagedModelRunner(compiled.fn, compiled.graph, model_weights(model, compiled.graph),
                              num_blocks=64, max_model_len=128, vocab_size=model.config.vocab_size)
    calls, fn = [], runner.fn
    runner.fn = lambda *a: calls.append(enabled()) or fn(*a)
    eng = LLMEngine(runner, toy_tokenizer(), EngineConfig(
        max_num_seqs=4, speculative=SpeculativeConfig.parse("ngram:3"),
        invariant_verify=invariant_verify))

    class Always(NgramProposer):   # a draft every step: every decode step verifies
        def propose(self, tokens, k):
            return tokens[-k:]
    eng.spec.proposer = Always()
    eng.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    # the prefill and the last step (no room left to draft) plain, every other one verified
    assert calls == [False] + [invariant_verify] * (len(calls) - 2) + [False], calls
    assert eng.spec.stats.verify_steps == len(calls) - 2 > 0 and not enabled()
