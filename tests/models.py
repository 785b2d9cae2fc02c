"""Tiny random-weight causal LMs built from transformers configs, and the eager greedy
decode loop the rest of the test suite uses as its oracle.

The models run the same modeling code as real checkpoints (rotary embeddings, GQA,
Qwen3's q/k RMSNorm, MoE routing through transformers' experts interface), at a size
that compiles and runs in well under a second on CPU. Weights come from each model's
own initializer under a fixed seed, so every call returns identical weights, while
inputs in the tests stay fresh random each run.

MoE experts: transformers 5 decorates the experts modules with
`@use_experts_implementation`; with `experts_implementation=None` the model picks
"grouped_mm" (it falls back to "eager" only for classes that lack the decorator).
"grouped_mm" calls `torch.nn.functional.grouped_mm` in eager mode on CPU (torch > 2.10),
and the custom op `transformers::grouped_mm_fallback` whenever dynamo traces it with a
dtype other than bf16 -- that custom op is what kiln's capture sees for fp32 MoE.
Pass experts_implementation="eager" for the per-expert Python loop instead.
"""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig,
                          Qwen3Config, Qwen3MoeConfig, StaticCache)

from kiln.frontends.hf import cache_call_kwargs

SEED = 0

# Shared by every tiny model: small enough to be fast, large enough that a head_dim of 16
# and several heads exercise the real reshapes. 320 is deliberately not a power of two.
COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=256,
    # A larger init than the 0.02 default widens the gaps between top logits and between
    # router scores, so greedy tokens and expert choices are not decided by rounding
    # noise when a compiled model is compared with eager (bf16 on GPU in particular).
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(config, attn_implementation: str, **impl) -> torch.nn.Module:
    # The seed is set here rather than per test: weights are reproducible, inputs are not.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32, **impl)
    return model.eval()


def tiny_llama(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Llama with multi-head attention (as many KV heads as query heads)."""
    return _build(LlamaConfig(**COMMON), attn_implementation)


def tiny_llama_gqa(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Llama with grouped-query attention: 4 query heads share 2 KV heads."""
    return _build(LlamaConfig(**{**COMMON, "num_key_value_heads": 2}), attn_implementation)


def tiny_qwen3(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Qwen3: GQA plus RMSNorm on q and k per head before rotary."""
    return _build(Qwen3Config(**{**COMMON, "num_key_value_heads": 2}), attn_implementation)


def tiny_mistral_sw(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Mistral with sliding-window attention: each token sees the 5 most recent tokens up
    to itself, so a prompt of a dozen tokens already reads past the window."""
    return _build(MistralConfig(**{**COMMON, "num_key_value_heads": 2}, sliding_window=5),
                  attn_implementation)


def tiny_mixtral(attn_implementation: str = "sdpa",
                 experts_implementation: str | None = None) -> torch.nn.Module:
    """Mixtral: every layer is a sparse MoE of 4 experts, top-2, softmax-then-top-k."""
    config = MixtralConfig(**{**COMMON, "num_key_value_heads": 2},
                           num_local_experts=4, num_experts_per_tok=2)
    return _build(config, attn_implementation, experts_implementation=experts_implementation)


def tiny_qwen3_moe(attn_implementation: str = "sdpa",
                   experts_implementation: str | None = None) -> torch.nn.Module:
    """Qwen3-MoE: q/k-norm attention and an MoE in every layer (4 experts, top-2, with
    the top-k weights renormalized to sum to one)."""
    config = Qwen3MoeConfig(**{**COMMON, "num_key_value_heads": 2},
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return _build(config, attn_implementation, experts_implementation=experts_implementation)


TINY_MODELS = {
    "llama": tiny_llama,
    "llama_gqa": tiny_llama_gqa,
    "qwen3": tiny_qwen3,
    "mistral_sw": tiny_mistral_sw,
    "mixtral": tiny_mixtral,
    "qwen3_moe": tiny_qwen3_moe,
}


@torch.no_grad()
def eager_greedy(model, input_ids: torch.Tensor, max_new_tokens: int,
                 max_cache_len: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with a transformers StaticCache: one prefill of `input_ids`
    (batch, prompt_len), then one token per forward, in a plain loop.

    Returns `(tokens, logits)`: `tokens` is (batch, max_new_tokens) and `logits[i]` is
    the (batch, vocab) float logits that chose `tokens[:, i]`. There is no stopping at
    EOS, so every row has exactly max_new_tokens tokens.
    """
    batch, prompt_len = input_ids.shape
    max_cache_len = max_cache_len or prompt_len + max_new_tokens
    if prompt_len + max_new_tokens - 1 > max_cache_len:
        raise ValueError(f"max_cache_len={max_cache_len} cannot hold a {prompt_len}-token "
                         f"prompt and {max_new_tokens} new tokens")
    device = input_ids.device
    # A fresh cache per call: in transformers 5.23 a StaticCache layer counts the tokens
    # written so far and appends at that count, so it cannot be rewound or reused.
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=device)
        out = model(input_ids=ids, position_ids=positions.expand(batch, -1),
                    **cache_call_kwargs(model, cache, positions))
        return out.logits[:, -1].float()

    tokens, all_logits = [], []
    logits = step(input_ids, 0)
    for i in range(max_new_tokens):
        token = logits.argmax(-1)
        tokens.append(token)
        all_logits.append(logits)
        if i + 1 < max_new_tokens:
            logits = step(token[:, None], prompt_len + i)
    return torch.stack(tokens, dim=1), all_logits


def tiny_llama_dir(path):
    """A tiny Llama saved as an HF directory with a tokenizer (trained in memory,
    tests/runtime/toy.py): what the CLI (`kiln compile`, `generate`, `dump`) loads."""
    import sys
    from pathlib import Path
    runtime_tests = str(Path(__file__).resolve().parent / "runtime")
    if runtime_tests not in sys.path:
        sys.path.insert(0, runtime_tests)
    from toy import toy_tokenizer
    tok = toy_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        config = LlamaConfig(**{**COMMON, "vocab_size": len(tok)})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
