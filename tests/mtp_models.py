"""Tiny random-weight checkpoints that ship a multi-token-prediction module, as DeepSeek-V3
and GLM-4.5 release theirs: config.json with num_hidden_layers = N and
num_nextn_predict_layers = 1, and in the safetensors file the module as layer N
(`model.layers.N.*`: a decoder layer in the checkpoint's per-expert format, written by
transformers' own save_pretrained, plus enorm, hnorm, eh_proj, shared_head.norm and copies
of the embedding and LM head), with the toy tokenizer (tests/runtime/toy.py).

The weights come from a fixed seed: every call writes the same checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

SEED = 0
BASE = dict(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            num_experts_per_tok=2, n_routed_experts=4, moe_intermediate_size=32,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1)
# config class, overrides of BASE
FAMILIES = {
    "glm4_moe": ("Glm4MoeConfig", {"head_dim": 16}),
    "deepseek_v3": ("DeepseekV3Config", {"num_key_value_heads": 4, "kv_lora_rank": 16,
                                         "q_lora_rank": 24, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 16, "v_head_dim": 16}),
}


@dataclass
class Checkpoint:
    path: Path
    source: torch.nn.Module        # the model it was saved from: N + 1 decoder layers
    mtp: dict[str, torch.Tensor]   # the module's tensors besides its decoder layer, by key suffix


def write_checkpoint(family: str, out: Path, mtp: bool = True, echo: bool = False,
                     tokenizer=None) -> Checkpoint:
    """The family's tiny model saved to `out` with (or, `mtp=False`, without) its MTP module.
    `echo`: a module that mostly repeats the main model's prediction at its position (eh_proj
    passes hnorm(h) through, the decoder layer's output projections scaled by 1e-2, its
    head's norm the main model's), so a draft stands whenever the main model repeats a
    token: speculation with drafts that are sometimes right."""
    from safetensors.torch import load_file, save_file
    cls, overrides = FAMILIES[family]
    kw = {**BASE, **overrides}
    n = kw["num_hidden_layers"]
    config = getattr(transformers, cls)(**{**kw, "num_hidden_layers": n + 1,
                                           "num_nextn_predict_layers": 1})
    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        prefix = f"model.layers.{n}."
        if echo:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.startswith(prefix) and ("o_proj" in name or "down_proj" in name):
                        p.mul_(1e-2)
        model.save_pretrained(out)
        file = out / "model.safetensors"
        tensors = load_file(file)
        h = kw["hidden_size"]
        own = {"enorm.weight": 1 + 0.2 * torch.randn(h), "hnorm.weight": 1 + 0.2 * torch.randn(h),
               "eh_proj.weight": torch.randn(h, 2 * h) / (2 * h) ** 0.5,
               "shared_head.norm.weight": 1 + 0.2 * torch.randn(h),
               "shared_head.head.weight": tensors["lm_head.weight"].clone(),
               "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()}
    if echo:
        own["eh_proj.weight"] = torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1)
        own["hnorm.weight"] = torch.ones(h)
        own["shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
    if mtp:
        tensors.update({prefix + k: v for k, v in own.items()})
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    save_file(tensors, str(file), metadata={"format": "pt"})
    saved = json.loads((out / "config.json").read_text())
    saved["num_hidden_layers"] = n
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    if tokenizer is None:
        import sys
        sys.path.insert(0, str(Path(__file__).parent / "runtime"))
        from toy import toy_tokenizer
        tokenizer = toy_tokenizer()
    tokenizer.save_pretrained(out)
    model.config.num_hidden_layers = n   # its forward: the main model (layer N kept aside)
    return Checkpoint(out, model, own)
