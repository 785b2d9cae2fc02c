"""target="cuda" in bf16 on a real GPU: every test model, CUDA graphs on. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from capture import fresh_dynamo, greedy_inputs, load_model, rel_err, run_steps
from kiln.backends.cudagraphs import CudaGraphCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["llama", "llama_gqa", "qwen3", "mixtral", "qwen3_moe"]

# SmolLM2-135M's architecture (the real weights do not fit the device transfer): random
# weights with a wide init so greedy choices are not decided by rounding ties.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, initializer_range=0.1)


def _on_gpu(model):
    return model.to("cuda", torch.bfloat16)


def _smollm2_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval().to("cuda", torch.bfloat16)


def _kiln(model, compiled):
    fresh_dynamo()
    return torch.compile(model, backend="kiln", options={"target": "cuda", "observer": compiled.append})


@pytest.mark.parametrize("name", TINY)
def test_bf16_logits_match_eager(name):
    import copy
    model = _on_gpu(copy.deepcopy(load_model(name)))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")
    ref = run_steps(model, model, ids.clone(), 8)
    compiled = []
    out = run_steps(_kiln(model, compiled), model, ids.clone(), 8, teacher=greedy_inputs(ref))
    errs = [rel_err(o.float(), r.float()) for o, r in zip(out, ref)]
    assert max(errs) < 1e-2, errs
    kernels = " ".join(c.source for c in compiled)
    assert "kiln.backends.triton" in kernels
    assert any(isinstance(c.fn, CudaGraphCache) and c.fn.replays > 0 for c in compiled)


def test_smollm2_shape_greedy_tokens_identical_over_32_steps():
    model = _smollm2_shaped()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), device="cuda")
    ref = run_steps(model, model, ids.clone(), 32)
    compiled = []
    out = run_steps(_kiln(model, compiled), model, ids.clone(), 32)
    ref_tokens = [int(o[0, -1].argmax()) for o in ref]
    out_tokens = [int(o[0, -1].argmax()) for o in out]
    assert out_tokens == ref_tokens
    assert max(rel_err(o.float(), r.float()) for o, r in zip(out, ref)) < 1e-2
    decode = compiled[-1].fn
    assert isinstance(decode, CudaGraphCache) and decode.replays >= 30
