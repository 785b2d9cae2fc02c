"""Architecture families for the call-style tests: tiny random-weight configs (no
downloads) that between them cover what real checkpoints do differently, and the kiln.*
ops kiln fuses in each family's prefill graph (two decoder layers).

What each family brings, and why some fusions do not happen (yet):
- llama: the baseline (untied embeddings, GQA, SwiGLU).
- mistral_sw: sliding-window attention (a window of 4 over a 7-token prompt). Where the
  mask compares indices (no cache, or a DynamicCache's first step) it becomes
  kiln.attention's causal and window attributes; over a StaticCache's cache_position it
  stays an explicit mask (tests/passes/test_attention_masks.py).
- qwen2: q/k/v biases, tied embeddings.
- qwen3: QK-norm (two extra RMSNorms a layer).
- gemma: tied embeddings, GeGLU (gelu-tanh gate: no kiln.silu_mul), (1 + w) RMSNorm.
- gemma2: logit soft-capping on attention scores and on the LM head, sliding window on
  alternate layers. Its attention is the eager softmax(tanh(qk/c)*c) form, which no
  attention rule matches, so only norms and RoPE fuse.
- phi: parallel attention + MLP, LayerNorm with biases, dense biases, partial rotary, GELU
  MLP: kiln has no LayerNorm or GELU fusion, so RoPE and attention fuse.
- gpt_neox: parallel residual, LayerNorm with biases, attention and MLP biases: as phi.
- stablelm: LayerNorm with biases, SwiGLU: RoPE, attention and the activation fuse.
- olmo2: QK-norm over the whole projection, post-norms; only the last residual add meets
  an RMSNorm (kiln.fused_add_rms_norm once).
- cohere: parallel residual, LayerNorm without bias, interleaved rotary (no kiln.rope
  rule for the interleaved form).
- gpt2: absolute positions (no RoPE), Conv1D projections, LayerNorm with biases, GELU:
  attention fuses.
- MoE, router styles: mixtral (softmax -> top-k -> renormalise), qwen3_moe (the same with
  norm_topk_prob and QK-norm), olmoe (softmax -> top-k without renormalising), qwen2_moe
  (top-k plus a shared expert behind a sigmoid gate: the shared expert's SwiGLU fuses as
  kiln.silu_mul), granitemoe (top-k of the logits, then softmax over the k: no fused_moe
  form matches it; its experts' SwiGLU fuses), deepseek_v3 (multi-head latent attention
  with routed and shared experts; sigmoid scores, group-limited top-k with a bias
  correction: no fused_moe form; MLA's split nope/rope heads and concatenated keys match
  no attention or RoPE rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers

SEED = 0
VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2)


@dataclass(frozen=True)
class Family:
    config: str                       # the transformers config class
    overrides: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)   # kiln.* op -> count in the prefill graph
    attn_implementation: str = "sdpa"


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", {}, {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4,
                                        "kiln.rope": 4, "kiln.attention": 2, "kiln.silu_mul": 2}),
    "mistral_sw": Family("MistralConfig", {"sliding_window": 4},
                         {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                          "kiln.attention": 2, "kiln.silu_mul": 2}),
    "qwen2": Family("Qwen2Config", {"tie_word_embeddings": True},
                    {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                     "kiln.attention": 2, "kiln.silu_mul": 2}),
    "qwen3": Family("Qwen3Config", {"head_dim": 16},
                    {"kiln.rms_norm": 5, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                     "kiln.attention": 2, "kiln.silu_mul": 2}),
    "gemma": Family("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": True},
                    {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                     "kiln.attention": 2}),
    "gemma2": Family("Gemma2Config", {"head_dim": 16, "sliding_window": 4,
                                      "attn_logit_softcapping": 50.0,
                                      "final_logit_softcapping": 30.0},
                     {"kiln.rms_norm": 5, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4},
                     attn_implementation="eager"),
    "phi": Family("PhiConfig", {"num_key_value_heads": 4}, {"kiln.rope": 4, "kiln.attention": 2}),
    "gpt_neox": Family("GPTNeoXConfig", {"num_key_value_heads": None, "use_parallel_residual": True},
                       {"kiln.rope": 4, "kiln.attention": 2}),
    "stablelm": Family("StableLmConfig", {}, {"kiln.rope": 4, "kiln.attention": 2,
                                              "kiln.silu_mul": 2}),
    "olmo2": Family("Olmo2Config", {}, {"kiln.rms_norm": 8, "kiln.fused_add_rms_norm": 1,
                                        "kiln.rope": 4, "kiln.attention": 2, "kiln.silu_mul": 2}),
    "cohere": Family("CohereConfig", {}, {"kiln.rms_norm": 3, "kiln.attention": 2,
                                          "kiln.silu_mul": 2}),
    "gpt2": Family("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
                   {"kiln.attention": 2}),
    "mixtral": Family("MixtralConfig", {**MOE, "num_local_experts": 4},
                      {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                       "kiln.attention": 2, "kiln.fused_moe": 2}),
    "qwen3_moe": Family("Qwen3MoeConfig", {**MOE, "num_experts": 4, "moe_intermediate_size": 32,
                                           "head_dim": 16, "decoder_sparse_step": 1,
                                           "norm_topk_prob": True},
                        {"kiln.rms_norm": 5, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                         "kiln.attention": 2, "kiln.fused_moe": 2}),
    "olmoe": Family("OlmoeConfig", {**MOE, "num_experts": 4},
                    {"kiln.rms_norm": 5, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                     "kiln.attention": 2, "kiln.fused_moe": 2}),
    "qwen2_moe": Family("Qwen2MoeConfig", {**MOE, "num_experts": 4, "moe_intermediate_size": 32,
                                           "shared_expert_intermediate_size": 48},
                        {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                         "kiln.attention": 2, "kiln.silu_mul": 2, "kiln.fused_moe": 2}),
    "granitemoe": Family("GraniteMoeConfig", {**MOE, "num_local_experts": 4},
                         {"kiln.rms_norm": 1, "kiln.fused_add_rms_norm": 4, "kiln.rope": 4,
                          "kiln.attention": 2, "kiln.silu_mul": 2}),
    "deepseek_v3": Family("DeepseekV3Config", {**MOE, "num_key_value_heads": 4,
                                               "n_routed_experts": 4, "moe_intermediate_size": 32,
                                               "n_shared_experts": 1, "first_k_dense_replace": 1,
                                               "kv_lora_rank": 16, "q_lora_rank": 24,
                                               "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                                               "v_head_dim": 16, "n_group": 2, "topk_group": 1},
                          {"kiln.rms_norm": 5, "kiln.fused_add_rms_norm": 4, "kiln.silu_mul": 3}),
}


def build(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The family's tiny model; weights are the same on every call (a fixed seed)."""
    fam = FAMILIES[name]
    kw = {**BASE, **fam.overrides}
    config = getattr(transformers, fam.config)(**{k: v for k, v in kw.items() if v is not None})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=fam.attn_implementation, dtype=dtype)
    return model.to(device).eval()
