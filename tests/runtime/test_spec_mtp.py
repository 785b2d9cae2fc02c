"""`--speculative mtp:K`: tiny random GLM-4.5 (Glm4Moe) and DeepSeek-V3 checkpoints that
ship an MTP module (tests/mtp_models.py). The loaded module against the DeepSeek-V3 formula
written out in plain torch (both families); its compiled serving graph against the module;
greedy output with mtp:1, mtp:2 and mtp:3 token for token that of plain decoding (prefill
chunks, a shared prefix, drafts that never stand and drafts that often do); every draft the
runtime made equal to the one the module makes in plain torch from the same tokens; a
model without MTP modules one clear error. (DeepSeek-V3's multi-head latent attention has
no kiln.attention form yet, so its serving graph, hence its drafting, does not compile:
only its module is checked.)"""
import contextlib
import random
from types import SimpleNamespace

import pytest
import torch

import mtp_models
from kiln.frontends import mtp
from kiln.runtime.batch import build_batch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.sequence import SamplingParams, Sequence
from kiln.runtime.spec_decode import SpeculativeConfig, SpeculativeError

BLOCK = 4


def no_steps(name):
    return contextlib.nullcontext()


def rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def final_hidden(model, ids: list[int]) -> torch.Tensor:
    """The main model's last hidden state before its final norm, [len(ids), H]."""
    seen = []
    hook = model.get_decoder().norm.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None])
    finally:
        hook.remove()
    return seen[0][0]


# -- loading and the formula ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_the_module_is_deepseek_v3s_formula(family, tmp_path):
    """h'_i = layer(eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])) at position i, logits =
    head(norm(h'_i)), with the checkpoint's tensors and the decoder layer it was saved from;
    the main model loaded beside it is the checkpoint's first N layers."""
    ck = mtp_models.write_checkpoint(family, tmp_path / family)
    model, _, (module,) = mtp.load(ck.path)
    source, own, eps = ck.source, ck.mtp, source_eps(ck.source)
    n = source.config.num_hidden_layers
    assert model.config.num_hidden_layers == n and len(model.get_decoder().layers) == n
    assert module.embed_tokens is model.get_input_embeddings()   # equal copies: shared
    assert module.head is model.get_output_embeddings()
    ids = [random.randrange(3, 400) for _ in range(11)]
    with torch.no_grad():
        h = final_hidden(source, ids)
        assert torch.allclose(final_hidden(model, ids), h, rtol=1e-5, atol=1e-5)
        e = source.get_input_embeddings()(torch.tensor(ids[1:]))
        x = torch.cat([rms(e, own["enorm.weight"], eps), rms(h[:-1], own["hnorm.weight"], eps)], -1)
        x = (x @ own["eh_proj.weight"].T)[None]
        pos = torch.arange(len(ids) - 1)[None]
        layer = source.get_decoder().layers[n]
        y = layer(x, attention_mask=None, position_ids=pos,
                  position_embeddings=source.get_decoder().rotary_emb(x, pos))[0]
        want = rms(y, own["shared_head.norm.weight"], eps) @ own["shared_head.head.weight"].T
        got, hidden = module(torch.tensor([ids[1:]]), pos, h[None, :-1])
    assert rel(got[0], want) < 1e-5 and rel(hidden[0], y) < 1e-5


def source_eps(model) -> float:
    return model.config.rms_norm_eps


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_a_model_without_mtp_modules_is_one_clear_error(tmp_path):
    import models
    llama = tmp_path / "llama"
    models.tiny_llama().save_pretrained(llama)
    mtp_models.write_checkpoint("glm4_moe", tmp_path / "bare", mtp=False)
    for path, says in ((llama, "a llama model"), (tmp_path / "bare", "saved without them")):
        with pytest.raises(mtp.MTPError, match=says) as e:
            mtp.load(path)
        assert "ngram:K" in str(e.value) and "num_nextn_predict_layers" in str(e.value)
    assert SpeculativeConfig.parse("mtp:2").k == 2
    with pytest.raises(SpeculativeError, match="takes no options"):
        SpeculativeConfig.parse("mtp:2:layers=1-2")


# -- compiled and drafting (GLM-4.5) --------------------------------------------------------
@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """The GLM checkpoint's two serving graphs and runners (prefill chunks of 16 tokens), its
    eager model and module, and the draft graph (for another module of the same shapes)."""
    from kiln.mtp import compile_mtp, compile_target, draft_runner_for
    from kiln.serving import ServingConfig, make_runner, model_weights
    ck = mtp_models.write_checkpoint("glm4_moe", tmp_path_factory.mktemp("glm") / "glm")
    model, tok, (module,) = mtp.load(ck.path)
    main = compile_target(model, block_size=BLOCK, cache=False)
    draft = compile_mtp(module, block_size=BLOCK, cache=False)
    cfg = ServingConfig(max_model_len=128, num_blocks=160, max_num_seqs=16,
                        max_num_batched_tokens=16)
    runner = make_runner(main.fn, main.graph, model_weights(model, main.graph),
                         model.config.vocab_size, 128, cfg)
    return SimpleNamespace(runner=runner, draft=draft_runner_for(draft, module, runner, cfg),
                           tok=tok, model=model, module=module, draft_graph=draft, cfg=cfg,
                           target_graph=main.graph,
                           target_weights=model_weights(model, main.graph))


def test_the_compiled_module_reads_and_writes_hidden_states_at_the_slots(glm):
    """A prefill chunk and a decode row through the draft runner, the main model's hidden
    states put in its kv_cache.hidden_in at their slots: the logits and the module's own
    hidden states (its kv_cache.hidden) are the eager module's."""
    from kiln.ir import parse, print_graph
    from kiln.ir.roles import HIDDEN_CACHE, HIDDEN_INPUT_CACHE
    draft, module = glm.draft, glm.module
    draft.reset_cache()
    size = module.config.hidden_size
    ids = [random.randrange(3, 400) for _ in range(10)]
    h = torch.randn(9, size)
    table = [5, 2, 7]   # blocks in no order
    slots = torch.tensor([table[q // BLOCK] * BLOCK + q % BLOCK for q in range(9)])
    draft.caches[HIDDEN_INPUT_CACHE].view(-1, size)[slots] = h
    with torch.no_grad():
        want, want_hidden = module(torch.tensor([ids[1:]]), torch.arange(9)[None], h[None])
    # positions 0..6 as one chunk, then 7 and 8 as decode rows
    got = draft.execute(build_batch([(ids[1:], 0, 7, table)], BLOCK))
    assert rel(got[0], want[0, 6]) < 1e-5
    for q in (7, 8):
        got = draft.execute(build_batch([(ids[1:], q, 1, table)], BLOCK))
        assert rel(got[0], want[0, q]) < 1e-5
    assert rel(draft.caches[HIDDEN_CACHE].view(-1, size)[slots], want_hidden[0]) < 1e-5
    for g in (glm.draft_graph.graph, glm.target_graph):   # (the compile cache keeps IR text)
        assert print_graph(parse(print_graph(g))) == print_graph(g)


def reference_drafts(model, module, tokens: list[int], k: int) -> list[int]:
    """The k drafts the MTP module makes in plain torch for a sequence whose last token is
    tokens[-1]: rows 0..n-2 from the main model's hidden states, then each draft fed back
    with the module's own hidden state."""
    h = final_hidden(model, tokens[:-1])
    inputs, hidden, drafts = list(tokens[1:]), h, []
    with torch.no_grad():
        for _ in range(k):
            logits, out = module(torch.tensor([inputs]), torch.arange(len(inputs))[None], hidden[None])
            top = torch.topk(logits[0, -1], 2)
            if top.values[0] - top.values[1] < 1e-4:   # a near tie: either is right; stop here
                break
            drafts.append(int(top.indices[0]))
            inputs.append(drafts[-1])
            hidden = torch.cat([hidden, out[0, -1:]])
    return drafts


class Recording:
    """Wraps a proposer: every call's sequences' tokens, room and drafts."""

    def __init__(self, proposer):
        self.proposer, self.calls = proposer, []

    def propose_batch(self, seqs, ks):
        drafts = self.proposer.propose_batch(seqs, ks)
        self.calls += [(list(s.token_ids), k, d) for s, k, d in zip(seqs, ks, drafts)]
        return drafts

    def release(self, seq):
        self.proposer.release(seq)


@pytest.mark.parametrize("k", [1, 2])
def test_greedy_output_is_plain_decodings_and_every_draft_the_modules(glm, k):
    runner, draft, tok, model, module = glm.runner, glm.draft, glm.tok, glm.model, glm.module
    rng = random.Random()
    shared = [rng.randrange(3, 400) for _ in range(8)]   # two full blocks
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (6, 37, 2)]
    prompts.append(shared + [rng.randrange(3, 400) for _ in range(3)])
    prompts.append(shared + [rng.randrange(3, 400) for _ in range(5)])
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=16)
    plain = LLMEngine(runner, tok, config).generate(prompts, params)
    config.speculative = SpeculativeConfig.parse(f"mtp:{k}")
    eng = LLMEngine(runner, tok, config, draft_runner=draft)
    eng.spec.proposer = recording = Recording(eng.spec.proposer)
    out = eng.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert eng.spec.stats.verify_steps > 0
    assert eng.blocks.num_free_blocks() == eng.blocks.num_blocks
    assert not eng.spec.proposer.proposer.states   # every finished sequence released
    # Two sequences running at once that share a block write the module's KV at its last
    # position from different next tokens (runtime/spec_mtp.py): their drafts may differ.
    calls = [c for c in recording.calls if c[0][:len(shared)] != shared]
    assert len(calls) >= 10, len(calls)
    for tokens, room, drafts in calls:
        want = reference_drafts(model, module, tokens, room)
        assert drafts[:len(want)] == want, (len(tokens), room)


def test_drafts_that_often_stand(glm, tmp_path):
    """A module that echoes the main model's prediction (mtp_models, echo=True; the main
    model is the same): drafts stand whenever the model repeats a token; with mtp:3 every
    token is plain decoding's."""
    from kiln.mtp import draft_runner_for
    ck = mtp_models.write_checkpoint("glm4_moe", tmp_path / "echo", echo=True)
    _, _, (echo,) = mtp.load(ck.path)
    draft = draft_runner_for(glm.draft_graph, echo, glm.runner, glm.cfg)
    spec = SpeculativeConfig.parse("mtp:3")
    rng = random.Random(0)   # the acceptance counts below depend on the draw: one, fixed
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 9, 14)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = LLMEngine(glm.runner, glm.tok, EngineConfig(max_num_seqs=8)).generate(prompts, params)
    eng = LLMEngine(glm.runner, glm.tok, EngineConfig(max_num_seqs=8, speculative=spec),
                    draft_runner=draft)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in plain]
    stats = eng.spec.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats


def test_preempted_sequences_start_over_and_sampling_runs(glm):
    """A pool too small for every sequence: some are preempted, their KV (the module's too)
    recomputed; the module starts over on them and every draft is still plain torch's. A
    sampled request drafts and verifies too."""
    from kiln.mtp import draft_runner_for
    from kiln.serving import ServingConfig, make_runner
    small = ServingConfig(max_model_len=96, num_blocks=26, max_num_seqs=8)
    runner = make_runner(glm.runner.fn, glm.target_graph, glm.target_weights,
                         glm.model.config.vocab_size, 96, small)
    draft = draft_runner_for(glm.draft_graph, glm.module, runner, small)
    rng = random.Random()
    prompts = [[rng.randrange(3, 400) for _ in range(10)] for _ in range(3)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    # (no prefix cache: a preempted sequence would get its own blocks back from it)
    config = EngineConfig(max_num_seqs=8, speculative=SpeculativeConfig.parse("mtp:2"),
                          enable_prefix_caching=False)
    plain = LLMEngine(runner, glm.tok, EngineConfig(max_num_seqs=8)).generate(prompts, params)
    eng = LLMEngine(runner, glm.tok, config, draft_runner=draft)
    eng.spec.proposer = recording = Recording(eng.spec.proposer)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in plain]
    assert eng.scheduler.num_preemptions > 0
    for tokens, room, drafts in recording.calls:
        want = reference_drafts(glm.model, glm.module, tokens, room)
        assert drafts[:len(want)] == want, (len(tokens), room)
    # (Above, preempted sequences mostly get their blocks back, module KV and all: a
    # preemption that moved a sequence to other blocks must start the module over.)
    seq = Sequence(prompts[0] + [5, 6, 7], params)
    proposer = recording.proposer
    proposer._state(seq).done = 11
    assert proposer._state(seq).done == 11
    seq.num_preemptions += 1
    assert proposer._state(seq).done == 0
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
    out = eng.generate([prompts[0]], sampled)[0]
    assert len(out.token_ids) == 12 and eng.spec.stats.verify_steps > 0


def test_kiln_generate_drafts_with_the_module_and_an_artifact_is_refused(tmp_path, capsys):
    from kiln.cli import main
    from kiln.serving import ServingConfig, build_served
    ck = mtp_models.write_checkpoint("glm4_moe", tmp_path / "glm")
    assert main(["generate", str(ck.path), "--prompt", "one two three one two", "--no-chat",
                 "--max-tokens", "12", "--ignore-eos", "--speculative", "mtp:2"]) == 0
    assert "mtp:2: mean accepted length" in capsys.readouterr().err
    fake = tmp_path / "artifact"
    fake.mkdir()
    (fake / "manifest.json").write_text("{}")   # refused before anything is read
    with pytest.raises(ValueError, match="MTP module.*serve the model itself"):
        build_served(str(fake), ServingConfig(speculative=SpeculativeConfig.parse("mtp:1")))
