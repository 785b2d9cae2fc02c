"""Greedy/sampled generation with an HF model and a StaticCache in a plain loop: the
loop `kiln generate` runs and the benchmarks time (same loop for every backend).

The loop is kiln's, so with a kiln-compiled model it need not pay for the model's Python
forward, dynamo's frame and AOTAutograd's wrappers on every token (several hundred us of
host time a step, more than a small model's whole step on a GPU): `DirectDecode` watches
two decode steps go through `torch.compile`, learns which of the compiled graph's
arguments stay the same objects (weights, the StaticCache's tensors) and which are the
step's token and position, and from then on calls the compiled graph with just those.
Where that graph replays a captured CUDA graph, a step is then only the copies of the
token and position into the graph's buffers and the replay (`CompiledGraph.bind`).

With `speculative=ngram:K` (batch 1) a step drafts up to K tokens by prompt lookup, or with
`draft:PATH:K` by a draft model (`LoopDraftModel`: greedy, over a StaticCache of its own),
and runs the last token and the drafts in one forward over 1 + K tokens at cache positions
p..p+K (drafts padded to K, so that one graph shape serves every verify step; a step with
no draft runs the ordinary one-token forward): the longest prefix of drafts that equals the
argmax at each position stands, plus the argmax after it. The cache then forgets the
entries past what stood (`rewind_cache`; the next forward writes over them). The tokens are
those of plain greedy decoding.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from kiln.frontends.hf import cache_call_kwargs, cache_rewinds, rewind_cache
from kiln.runtime.sampler import argmax
from kiln.runtime.spec_decode import NgramProposer

from .driver import CompiledGraph


# The drafters this loop runs (--speculative METHOD:K).
LOOP_METHODS = ("ngram", "draft")


@dataclass
class Generation:
    tokens: list[int]          # generated ids (prompt excluded)
    prompt_tokens: int
    prefill_seconds: float     # first call, compilation included when compiled lazily
    first_decode_seconds: float  # the first decode step (compiles the decode graph)
    decode_seconds: float      # the remaining steps: steady-state decode
    decode_steps: int
    direct: str = "off"        # DirectDecode's state at the end: "bound..." or why not
    direct_steps: int = 0      # decode steps that called the kiln graph directly
    verify_steps: int = 0      # speculative: steps that verified drafts
    accepted_drafts: int = 0   # speculative: the drafts that stood
    draft_tokens: int = 0      # speculative: the drafts verified

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step produced: the drafts that stood plus the one after them."""
        return 1 + self.accepted_drafts / self.verify_steps if self.verify_steps else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else 0.0


class DirectDecode:
    """Decode steps straight into the kiln graph that `torch.compile` built for them.

    `watch(ids, pos)` wraps a step run the ordinary way and records the kiln graph call it
    made. After two such steps that called the same graph, each argument must be either
    the same object both times (bound) or the step's `ids` (or `pos`) tensor; the graph must
    return one tensor, the logits the model returned (an int output is Python state, such
    as a sliding-window cache's length, that dynamo sets after the call: such models stay
    on the ordinary path). Anything else leaves `bound` None and says why in `reason`.
    """

    def __init__(self):
        self.seen: list = []      # per watched step: (graph, args, outputs, ids, pos, logits)
        self.bound = None         # (graph, args template, ids index, pos index)
        self.replay = None        # the graph's CUDA-graph replay bound to the template
        self.reason = "not watched yet"
        self.steps = 0            # steps run directly

    @contextlib.contextmanager
    def watch(self, ids, pos):
        calls = []
        CompiledGraph.watchers.append(lambda g, args, out: calls.append((g, args, out)))
        try:
            yield calls
        finally:
            CompiledGraph.watchers.pop()
        self._calls, self._ids, self._pos = calls, ids, pos

    def saw(self, logits) -> None:
        """The logits the watched step returned; binds after the second step."""
        if len(self._calls) != 1:
            self.reason = f"a step made {len(self._calls)} kiln graph calls, not 1"
            self.seen.clear()
            return
        self.seen = (self.seen + [(*self._calls[0], self._ids, self._pos, logits)])[-2:]
        if len(self.seen) == 2:
            self.bound, self.reason = self._bind()

    def _bind(self):
        (g0, a0, _, _, _, _), (g1, a1, out, ids, pos, logits) = self.seen
        if g0 is not g1 or len(a0) != len(a1):
            return None, "consecutive steps called different graphs"
        if len(out) != 1 or out[0] is not logits:
            return None, (f"the graph returns {len(out)} values (Python state it updates, "
                          f"or not the logits the model returned)")
        template, where = list(a1), {}
        for i, (x, y) in enumerate(zip(a0, a1)):
            if y is ids or y is pos:
                where["ids" if y is ids else "pos"] = i
            elif x is not y:
                return None, f"argument {i} changes between steps and is not the token or position"
        if "ids" not in where:
            return None, "the token is not an argument of the graph"
        # No position argument is fine: the cache may keep its own (transformers 5.24's
        # StaticCache counts its length in a tensor the graph updates). The graph runs with
        # dynamo's frame hook off, as when a compiled frame calls it: run as a script,
        # `python bench/decode.py`, the hook was still on here and looked at every Python
        # frame the CPU wrapper entered (61 vs 42 ms a SmolLM2-shape step).
        varying = [where["ids"]] + ([where["pos"]] if "pos" in where else [])
        self.replay = g1.bind(template, varying)
        how = "bound" if self.replay is None else "bound (CUDA graph replay)"
        return (torch.compiler.disable(g1), template, where["ids"], where.get("pos")), how

    def __call__(self, ids, pos):
        self.steps += 1
        if self.replay is not None:   # a captured CUDA graph: copy the step's tensors, replay
            return self.replay(ids, pos)[0] if self.bound[3] is not None else self.replay(ids)[0]
        graph, args, i_ids, i_pos = self.bound
        args[i_ids] = ids
        if i_pos is not None:
            args[i_pos] = pos
        return graph(*args)[0]


def make_cache(model, max_cache_len: int):
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@torch.no_grad()
def greedy(model_fn, config_model, input_ids: torch.Tensor, max_new_tokens: int,
           eos_token_id: int | list[int] | None = None, cache=None, prefill_fn=None,
           mark_dynamic: bool = True, direct: bool = True,
           host_us: list | None = None, speculative=None, draft=None) -> Generation:
    """Greedy decoding: one prefill call, then one call per token, with a StaticCache.

    `model_fn` is the (possibly compiled) model; `config_model` the HF model it wraps (for
    its config). Batch and prompt length are marked dynamic so new sizes reuse graphs.
    Passing the `cache` of an earlier run reuses its storage (reset in place), so captured
    CUDA graphs stay valid across runs. `prefill_fn` (default `model_fn`) runs the prompt:
    transformers' own recipe for `mode="reduce-overhead"` is an eager prefill, which also
    allocates the StaticCache and marks its tensors static addresses, then compiled decode
    steps of one fixed shape (`mark_dynamic=False`). `direct`: once two decode steps show
    how, call a kiln-compiled graph directly (`DirectDecode`; other backends never bind).
    `speculative`: a runtime.spec_decode.SpeculativeConfig, ngram:K or draft:PATH:K with
    `draft` = (the draft model as compiled, the draft model) (the module docstring); the
    cache must then hold K more tokens than prompt and output."""
    batch, prompt_len = input_ids.shape
    extra = 0 if speculative is None else speculative.k
    if cache is None:
        cache = make_cache(config_model, prompt_len + max_new_tokens + extra)
    else:
        cache.reset()
    if speculative is not None:
        check_loop_speculation(speculative, batch, cache, prompt_len + max_new_tokens + extra,
                               draft)
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
    token = argmax(logits[:, -1])
    sync()
    t1 = time.perf_counter()
    if speculative is not None:
        proposer = (NgramProposer(speculative.ngram_max, speculative.ngram_min)
                    if speculative.method == "ngram" else
                    LoopDraftModel(*draft, prompt_len + max_new_tokens + extra, direct))
        return _speculative_decode(model_fn, config_model, cache, input_ids[0].tolist(),
                                   int(token[0]), max_new_tokens, eos, speculative, proposer,
                                   direct, t1 - t0, sync)
    out = [token]
    t_first = None
    # The position stays on the device and steps there: a host tensor would be copied in
    # on every step, and a copy from pageable memory waits for the GPU to drain.
    pos = positions[-1:].clone()
    direct = DirectDecode() if direct else None
    for step in range(max_new_tokens - 1):
        if step == 1:
            sync()
            t_first = time.perf_counter()
        if eos and batch == 1 and int(token[0]) in eos:   # reads the token: a sync, so only with eos
            break
        ids = token[:, None]
        mark(ids, 0)
        pos = pos + 1
        if host_us is not None:
            sync()
            t_call = time.perf_counter()
        if direct is not None and direct.bound is not None:
            logits = direct(ids, pos)
        else:
            with direct.watch(ids, pos) if direct is not None else contextlib.nullcontext():
                logits = model_fn(input_ids=ids, logits_to_keep=1,
                                  **cache_call_kwargs(config_model, cache, pos)).logits
            if direct is not None:
                direct.saw(logits)
        if host_us is not None:
            host_us.append((time.perf_counter() - t_call) * 1e6)
        token = argmax(logits[:, -1])
        out.append(token)
    sync()
    t2 = time.perf_counter()
    tokens = torch.stack(out, dim=1)[0].tolist()
    how = (direct.reason, direct.steps) if direct is not None else ("off", 0)
    if t_first is None:
        return Generation(tokens, prompt_len, t1 - t0, t2 - t1, 0.0, 0, *how)
    return Generation(tokens, prompt_len, t1 - t0, t_first - t1, t2 - t_first, len(out) - 2, *how)


def check_loop_speculation(speculative, batch: int, cache, needed: int, draft=None) -> None:
    """Raise ValueError (naming the fix) unless this loop can speculate with `speculative`."""
    if speculative.method not in LOOP_METHODS:
        raise ValueError(f"--speculative {speculative}: the StaticCache loop drafts with "
                         f"{' or '.join(LOOP_METHODS)}; {speculative.method} drafts in the serving "
                         f"engine: kiln generate MODEL --backend kiln --speculative {speculative}")
    if (speculative.method == "draft") != (draft is not None):
        raise ValueError(f"--speculative {speculative}: pass draft=(the draft model as compiled, "
                         f"the draft model) with draft:PATH:K and only then (the loop runs the "
                         f"models it is given; kiln generate --backend kiln-static loads PATH)")
    if batch != 1:
        raise ValueError(f"speculative decoding in the StaticCache loop runs one sequence, got a "
                         f"batch of {batch}; run the prompts one at a time, or serve them (kiln "
                         f"serve --speculative {speculative})")
    why = cache_rewinds(cache)
    if why is not None:
        raise ValueError(f"--speculative {speculative}: the StaticCache loop cannot take back "
                         f"rejected drafts from this model's cache ({why}); use the serving "
                         f"engine: kiln generate MODEL --backend kiln --speculative {speculative}")
    size = min((getattr(layer, "max_cache_len", needed) for layer in cache.layers), default=needed)
    if size < needed:
        raise ValueError(f"--speculative {speculative}: the cache holds {size} tokens; the prompt, "
                         f"the output and {speculative.k} drafts need {needed}: make_cache(model, "
                         f"{needed})")


class LoopDraftModel:
    """draft:PATH:K in the loop: the draft model decodes greedily over a StaticCache of its
    own. Its cache holds the KV of the sequence's first `cached` tokens and then of the drafts
    `written` (fed back). Before drafting, it keeps the drafts that became the sequence's
    tokens (never its last token: the first draft needs that one's logits), rewinds the
    cache past the rest, runs the tokens it lacks in one forward and then K - 1 one-token
    steps, each fed the draft before it, on the device; the host reads the drafts once."""

    def __init__(self, fn, model, max_cache_len: int, direct: bool = True):
        self.fn, self.model = fn, model
        self.cache = make_cache(model, max_cache_len)
        why = cache_rewinds(self.cache)
        if why is not None:
            raise ValueError(f"the draft model's cache cannot take back drafts ({why}); draft "
                             f"with another model, or use the serving engine (--backend kiln)")
        self.device = next(model.parameters()).device
        self.cached, self.written = 0, []
        self.step = DirectDecode() if direct else None   # its one-token forwards

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        kept = 0
        while (kept < len(self.written) and self.cached + kept < len(tokens) - 1
               and tokens[self.cached + kept] == self.written[kept]):
            kept += 1
        held = self.cached + len(self.written)
        self.cached = min(self.cached + kept, len(tokens) - 1)
        rewind_cache(self.cache, held - self.cached)
        n = len(tokens)
        ids = torch.tensor([tokens[self.cached:]], device=self.device)
        pos = torch.arange(self.cached, n, device=self.device)
        direct = self.step if ids.shape[1] == 1 else None
        drafts = [argmax(_forward(direct, self.fn, self.model, self.cache, ids, pos, 1)[:, -1])]
        for j in range(1, k):
            pos = torch.arange(n - 1 + j, n + j, device=self.device)
            logits = _forward(self.step, self.fn, self.model, self.cache, drafts[-1][:, None], pos, 1)
            drafts.append(argmax(logits[:, -1]))
        out = torch.cat(drafts).tolist()
        self.cached, self.written = n, out[:k - 1]
        return out


def _speculative_decode(model_fn, config_model, cache, prompt: list[int], first: int,
                        max_new_tokens: int, eos: set, speculative, proposer, direct: bool,
                        prefill_seconds: float, sync) -> Generation:
    """The decode steps of `greedy` with drafts from `proposer` (batch 1): see the module
    docstring."""
    k = speculative.k
    device = next(config_model.parameters()).device
    tokens, out = prompt + [first], [first]
    # One DirectDecode per step shape: a one-token step and a verify step call different graphs.
    plain, verify = (DirectDecode(), DirectDecode()) if direct else (None, None)
    verify_steps = accepted = drafted = 0
    t1 = time.perf_counter()
    t_first, decode_start = t1, 1   # after the first decode step: its time and len(out)
    while len(out) < max_new_tokens and out[-1] not in eos:
        if len(out) > 1 and decode_start == 1:   # the first decode step compiles: not timed
            sync()
            t_first, decode_start = time.perf_counter(), len(out)
        draft = proposer.propose(tokens, min(k, max_new_tokens - len(out) - 1))
        p = len(tokens) - 1   # the last token's position
        if draft:
            ids = torch.tensor([[tokens[-1]] + draft + [tokens[-1]] * (k - len(draft))], device=device)
            pos = torch.arange(p, p + 1 + k, device=device)
            best = argmax(_forward(verify, model_fn, config_model, cache, ids, pos)[0]).tolist()
            a = 0
            while a < len(draft) and draft[a] == best[a]:
                a += 1
            rewind_cache(cache, k - a)   # it holds p..p+k; p..p+a stand
            new = best[:a + 1]
            verify_steps += 1
            accepted += a
            drafted += len(draft)
        else:
            ids = torch.tensor([[tokens[-1]]], device=device)
            pos = torch.tensor([p], device=device)
            new = [int(argmax(_forward(plain, model_fn, config_model, cache, ids, pos)[:, -1])[0])]
        for t in new:
            tokens.append(t)
            out.append(t)
            if len(out) >= max_new_tokens or t in eos:
                break
    sync()
    t2 = time.perf_counter()
    steps = sum(d.steps for d in (plain, verify) if d is not None)
    binders = (("decode", plain), ("verify", verify), ("draft", getattr(proposer, "step", None)))
    how = " / ".join(f"{name}: {d.reason}" for name, d in binders if d is not None) or "off"
    if decode_start == 1:   # one decode step at most: nothing past the first
        return Generation(out, len(prompt), prefill_seconds, t2 - t1, 0.0, 0, how, steps,
                          verify_steps, accepted, drafted)
    return Generation(out, len(prompt), prefill_seconds, t_first - t1, t2 - t_first,
                      len(out) - decode_start, how, steps, verify_steps, accepted, drafted)


def _forward(direct: DirectDecode | None, model_fn, config_model, cache, ids, pos,
             keep: int | None = None):
    """One forward of `ids` at cache positions `pos`: the logits of its last `keep` positions
    (default: all), through the kiln graph directly once `direct` has bound it."""
    if direct is not None and direct.bound is not None:
        return direct(ids, pos)
    with direct.watch(ids, pos) if direct is not None else contextlib.nullcontext():
        logits = model_fn(input_ids=ids, logits_to_keep=keep or ids.shape[1],
                          **cache_call_kwargs(config_model, cache, pos)).logits
    if direct is not None:
        direct.saw(logits)
    return logits


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
