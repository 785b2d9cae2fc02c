"""Greedy/sampled generation with an HF model and a StaticCache in a plain loop: the
loop `kiln generate` runs and the benchmarks time (same loop for every backend)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.frontends.hf import cache_call_kwargs


@dataclass
class Generation:
    tokens: list[int]          # generated ids (prompt excluded)
    prompt_tokens: int
    prefill_seconds: float     # first call, compilation included when compiled lazily
    first_decode_seconds: float  # the first decode step (compiles the decode graph)
    decode_seconds: float      # the remaining steps: steady-state decode
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else 0.0


def make_cache(model, max_cache_len: int):
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@torch.no_grad()
def greedy(model_fn, config_model, input_ids: torch.Tensor, max_new_tokens: int,
           eos_token_id: int | list[int] | None = None, cache=None, prefill_fn=None,
           mark_dynamic: bool = True) -> Generation:
    """Greedy decoding: one prefill call, then one call per token, with a StaticCache.

    `model_fn` is the (possibly compiled) model; `config_model` the HF model it wraps (for
    its config). Batch and prompt length are marked dynamic so new sizes reuse graphs.
    Passing the `cache` of an earlier run reuses its storage (reset in place), so captured
    CUDA graphs stay valid across runs. `prefill_fn` (default `model_fn`) runs the prompt:
    transformers' own recipe for `mode="reduce-overhead"` is an eager prefill, which also
    allocates the StaticCache and marks its tensors static addresses, then compiled decode
    steps of one fixed shape (`mark_dynamic=False`)."""
    batch, prompt_len = input_ids.shape
    if cache is None:
        cache = make_cache(config_model, prompt_len + max_new_tokens)
    else:
        cache.reset()
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    mark = torch._dynamo.maybe_mark_dynamic if mark_dynamic else (lambda t, d: None)
    mark(input_ids, 0)
    mark(input_ids, 1)
    positions = torch.arange(prompt_len, device=input_ids.device)
    mark(positions, 0)
    t0 = time.perf_counter()
    logits = (prefill_fn or model_fn)(input_ids=input_ids, logits_to_keep=1,
                                      **cache_call_kwargs(config_model, cache, positions)).logits
    token = logits[:, -1].argmax(-1)
    sync()
    t1 = time.perf_counter()
    out = [token]
    t_first = None
    for step in range(max_new_tokens - 1):
        if step == 1:
            sync()
            t_first = time.perf_counter()
        if batch == 1 and int(token[0]) in eos:
            break
        ids = token[:, None]
        mark(ids, 0)
        pos = torch.tensor([prompt_len + step], device=input_ids.device)
        logits = model_fn(input_ids=ids, logits_to_keep=1,
                          **cache_call_kwargs(config_model, cache, pos)).logits
        token = logits[:, -1].argmax(-1)
        out.append(token)
    sync()
    t2 = time.perf_counter()
    tokens = torch.stack(out, dim=1)[0].tolist()
    if t_first is None:
        return Generation(tokens, prompt_len, t1 - t0, t2 - t1, 0.0, 0)
    return Generation(tokens, prompt_len, t1 - t0, t_first - t1, t2 - t_first, len(out) - 2)


def chat_input_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


def compile_model(model, backend: str, options: dict | None = None):
    """The same model under each backend the benchmarks compare."""
    if backend == "eager":
        return model
    if backend == "kiln":
        return torch.compile(model, backend="kiln", options=options or {})
    if backend == "inductor":
        return torch.compile(model)
    if backend == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead")
    raise ValueError(f"unknown backend {backend!r}; use kiln, eager, inductor or reduce-overhead")
