"""`--speculative mtp:K`: the model's own multi-token-prediction module drafts.

Two serving graphs, compiled like any other and run by two PagedModelRunners over one set
of block tables:
- the target: the model's serving capture with its final hidden state exposed as a second
  output (passes/serve_hidden.py's `expose_final_hidden`), which serve.hidden_states writes
  to the pool `kv_cache.hidden` at every token's slot;
- the draft: the MTP module (frontends/mtp.py) captured as a flat-batch forward of
  (input_ids, position_ids, hidden_states), its decoder layer's attention paged over a KV
  cache of its own, `hidden_states` read from `kv_cache.hidden_in` (the target's
  `kv_cache.hidden`, shared) and its own hidden state written to its `kv_cache.hidden`.
Both runners index the engine's blocks with the sequence's block table: the draft's KV
cache and pools have as many blocks as the target's, so the KV-cache budget is split by the
bytes a block takes in both. runtime/spec_mtp.py drafts with them.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from kiln.ir import Graph
from kiln.ir.roles import HIDDEN_CACHE, HIDDEN_INPUT, HIDDEN_INPUT_CACHE

from . import compile_cache
from .driver import CapturedText, CompiledGraph
from .serving import (EXAMPLE_TOKENS, ServingConfig, _capture_graphs, _compile_captured,
                      cached_capture, capture_serving, default_max_model_len, make_runner,
                      model_weights)


def capture_target(model: torch.nn.Module, use_cache: bool = True) -> Graph:
    """The model's serving capture (from the capture cache when it has it) that also
    returns its final hidden state."""
    from kiln.passes.serve_hidden import expose_final_hidden
    graph = cached_capture(model, use_cache)
    graph = graph.parse() if isinstance(graph, CapturedText) else graph.copy()
    expose_final_hidden(graph)
    return graph


def capture_mtp(module: torch.nn.Module) -> Graph:
    """An MTP module's flat-batch forward: (input_ids [1, T], position_ids [1, T],
    hidden_states [1, T, H]) -> (logits, its own hidden state)."""
    param = next(module.parameters())
    hidden = torch.randn(1, EXAMPLE_TOKENS, module.config.hidden_size, dtype=param.dtype,
                         device=param.device)
    return capture_serving(module, extra_inputs={HIDDEN_INPUT: hidden})


def compile_target(model, target: str = "cpu", block_size: int = 16, record: bool = False,
                   **options) -> CompiledGraph:
    graph = capture_target(model, compile_cache.enabled(options.get("cache", True)))
    return _compile_captured(graph, target, block_size, record, options)


def compile_mtp(module, target: str = "cpu", block_size: int = 16, record: bool = False,
                **options) -> CompiledGraph:
    """The MTP module's serving graph: the draft graph of `--speculative mtp:K`."""
    return _compile_captured(capture_mtp(module), target, block_size, record, options)


def mtp_runners(source, cfg: ServingConfig, target, dtype, block_size, step, device,
                on_choice=None, **options):
    """Load `source` with its MTP module, compile both graphs (with `options`; `quant` as
    kiln.quant_choice decides it for the model), allocate both runners and capture their
    graphs: (target runner, tokenizer, draft runner)."""
    from kiln.frontends import mtp

    from .quant_choice import choose
    with step(f"load {source} with its MTP module"):
        try:
            model, tok, modules = mtp.load(source, dtype=getattr(torch, dtype))
        except mtp.MTPError as e:
            raise ValueError(str(e)) from None
    choice = choose(options.get("quant"), model, target)
    options["quant"] = choice.quant
    if on_choice is not None:
        on_choice(choice)
    with step("compile the serving graph (keeping each token's final hidden state)"):
        main = compile_target(model, target, block_size, **options)
    with step("compile the MTP draft graph"):
        draft = compile_mtp(modules[0], target, block_size, **options)
    if torch.device(device).type != "cpu":
        # Both runners then bind the same device tensors for what the module shares with the
        # model (embedding, LM head, rotary tables) instead of a copy each.
        model.to(device)
        modules[0].to(device)
    max_len = cfg.max_model_len or default_max_model_len(model.config)
    cfg = dataclasses.replace(cfg, num_blocks=cfg.num_blocks or _num_blocks(cfg, max_len, main, draft))
    with step("allocate KV cache"):
        runner = make_runner(main.fn, main.graph, model_weights(model, main.graph),
                             model.config.vocab_size, max_len, cfg, device)
        draft_runner = draft_runner_for(draft, modules[0], runner, cfg)
    _capture_graphs(runner, step, cfg)
    _capture_graphs(draft_runner, lambda name: step(f"MTP draft: {name}"), cfg)
    return runner, tok, draft_runner


def _num_blocks(cfg: ServingConfig, max_len: int, main: CompiledGraph, draft: CompiledGraph) -> int:
    """Blocks that kv_cache_gib holds when each costs the target's caches and the draft's."""
    from kiln.runtime.model_runner import PagedModelRunner, cache_bytes_per_block
    per_block = cache_bytes_per_block(main.graph) + sum(
        b for name, b in _bytes_by_cache(draft.graph).items() if name != HIDDEN_INPUT_CACHE)
    return max(int(cfg.kv_cache_gib * 2**30 // per_block),
               math.ceil(max_len / PagedModelRunner.block_size_of(main.graph)))


def _bytes_by_cache(graph: Graph) -> dict[str, int]:
    from kiln.runtime.model_runner import cache_inputs
    return {v.name: math.prod(v.type.shape[1:]) * v.type.dtype.itemsize for v in cache_inputs(graph)}


def draft_runner_for(draft: CompiledGraph, module, runner, cfg: ServingConfig):
    """The MTP module's runner: as many blocks as the target runner, its `kv_cache.hidden_in`
    the target's `kv_cache.hidden`, its own KV cache and hidden-state pool."""
    from kiln.runtime.model_runner import PagedModelRunner, cache_inputs
    if HIDDEN_CACHE not in runner.caches:
        raise ValueError(f"the target runner keeps no {HIDDEN_CACHE} (compile it with "
                         f"kiln.mtp.compile_target)")
    caches = {}
    for v in cache_inputs(draft.graph):
        if v.name == HIDDEN_INPUT_CACHE:
            caches[v.name] = runner.caches[HIDDEN_CACHE]
        else:
            caches[v.name] = torch.zeros(runner.num_blocks + 1, *v.type.shape[1:],
                                         dtype=v.type.dtype, device=runner.device)
    return PagedModelRunner(draft.fn, draft.graph, model_weights(module, draft.graph),
                            num_blocks=runner.num_blocks, max_model_len=runner.max_model_len,
                            vocab_size=runner.vocab_size, device=runner.device,
                            seq_buckets=runner.seq_buckets, **runner.graph_options,
                            max_num_batched_tokens=cfg.max_num_batched_tokens, caches=caches)
