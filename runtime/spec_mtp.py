"""Speculative decoding with the model's multi-token-prediction module (`--speculative mtp:K`).

The draft runner runs the MTP module's serving graph (kiln.mtp): a decoder layer with a KV
cache of its own, indexed by the sequence's own block table (its pools have as many blocks
as the target's), whose row at position q takes the token after q and the target's final
hidden state at q and predicts the token after that one (frontends/mtp.py has the formula).
The target's serving graph writes every token's hidden state at the token's slot
(`kv_cache.hidden`), which is the draft graph's `kv_cache.hidden_in`; the draft graph
writes its own output hidden state at the row's slot in its `kv_cache.hidden`.

A sequence about to decode has n tokens, of which the target has computed positions
0..n-2 (its last token t_{n-1} was sampled from position n-2). A drafting step, for all
drafting sequences at once:
1. catch up: rows at the positions the module has not run yet, through n-2 (the whole
   prompt on first use, then the tokens emitted since), each with the token after it, as
   one prefill/extend batch (chunks of the runner's `max_num_batched_tokens`); the last
   row's logits give the first draft (a guess at t_n). Row n-2 always runs, so there are
   always logits for it.
2. k - 1 chained decode steps: the row at position n-2+j takes draft j and, as its hidden
   state, the module's own output at position n-3+j, copied into `kv_cache.hidden_in` at
   the row's slot beforehand (the target writes its hidden state there only when it
   verifies that position). The drafts stay on the device between steps (the batch's
   pending inputs); the host reads them once, after the last step.
Rollback is overwriting: the module's KV and hidden states at positions from n-1 on were
made from its own guesses, so the module counts only positions through n-2 as done, and
the next catch-up recomputes the rest from the target's verified hidden states. A
preempted sequence (its blocks freed, its KV recomputed by the target) starts over.

Blocks the prefix cache shares hold the target's hidden states of their tokens, so a
sequence that shares them catches up from them (from position 0: its module KV there may
be another sequence's). One slot cannot be right for two sequences at once: the module's
row at a shared block's last position reads the token after the block, which the sharers
may not have in common, and each one's catch-up writes its own. While two such sequences
run together, the later writer's row stands for both. That can change the other's drafts
(the module's KV at one position is off), never the output: the verify step decides. (A
module KV cache with block tables of its own, like the draft model's in spec_draft.py,
would keep them apart at the cost of a second block pool.)

Drafting is greedy (argmax), hence deterministic: the point-mass proposal spec_decode's
rejection sampling assumes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.ir.roles import HIDDEN_CACHE, HIDDEN_INPUT_CACHE

from .batch import PendingInputs, build_batch, to_device
from .sampler import argmax
from .sequence import Sequence
from .spec_decode import UnreadTokens, gather_drafts


@dataclass
class MTPState:
    """One sequence's progress through the MTP module."""
    done: int = 0          # positions 0..done-1 have the module's KV from verified inputs
    preemptions: int = 0   # the sequence's num_preemptions when `done` was counted


class _Following:
    """A sequence's tokens shifted by one: index q is the token after position q (what the
    module's row at q reads)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.tokens[index.start + 1:index.stop + 1]
        return self.tokens[index + 1]


class MTPProposer:
    """Drafts k tokens a sequence with the MTP runner, in the engine's blocks."""
    # Steps it did not see are caught up on: the target wrote their hidden states.
    async_between_drafts = True

    def __init__(self, runner, blocks):
        missing = [n for n in (HIDDEN_CACHE, HIDDEN_INPUT_CACHE) if n not in runner.caches]
        if missing:
            raise ValueError(f"the MTP draft runner has no {', '.join(missing)}: it runs the "
                             f"graph kiln.mtp.compile_mtp compiles")
        self.runner, self.blocks = runner, blocks
        # Flat views, one row a slot: the target's hidden states (the module's input) and
        # the module's own.
        self.hidden_in = _rows(runner.caches[HIDDEN_INPUT_CACHE])
        self.hidden_out = _rows(runner.caches[HIDDEN_CACHE])
        self.max_batch_tokens = getattr(runner, "max_num_batched_tokens", 512)
        self.states: dict[Sequence, MTPState] = {}

    def release(self, seq: Sequence) -> None:
        self.states.pop(seq, None)

    def _state(self, seq: Sequence) -> MTPState:
        state = self.states.get(seq)
        if state is None or state.preemptions != seq.num_preemptions:
            state = self.states[seq] = MTPState(preemptions=seq.num_preemptions)
        state.done = min(state.done, seq.num_tokens - 2)   # (row n-2 gives the first draft)
        return state

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        # Blocks for the verify step's 1 + k rows; the chained rows write inside them.
        live = [i for i, (s, k) in enumerate(zip(seqs, ks)) if self.blocks.allocate(s, 1 + k)]
        states = [self._state(seqs[i]) for i in live]
        prev = self._catch_up([seqs[i] for i in live], states)
        outputs = [(live, prev)]   # (sequence indices, their drafts on the device), per step
        bs = self.runner.block_size
        for j in range(1, max((ks[i] for i in live), default=0)):
            rows = [r for r, i in enumerate(live) if ks[i] > j]
            live = [live[r] for r in rows]
            positions = [seqs[i].num_tokens - 2 + j for i in live]
            self._chain_hidden([seqs[i] for i in live], positions)
            batch = build_batch([(UnreadTokens(), q, 1, seqs[i].block_table)
                                 for i, q in zip(live, positions)], bs)
            batch.pending = PendingInputs(np.arange(len(live)), np.asarray(rows), prev)
            prev = argmax(self.runner.execute(batch))
            outputs.append((live, prev))
        return gather_drafts(outputs, len(seqs))

    def _catch_up(self, seqs: list[Sequence], states: list[MTPState]) -> torch.Tensor:
        """Rows from each sequence's `done` through n-2; returns the first drafts [n] on the
        device, in order. A round takes sequences in order while the token budget lasts,
        cutting the last one short, so they finish in order."""
        firsts = []
        todo = 0
        while todo < len(seqs):
            budget, run = self.max_batch_tokens, []
            for i in range(todo, len(seqs)):
                if budget <= 0:
                    break
                count = min(seqs[i].num_tokens - 1 - states[i].done, budget)
                run.append((i, count))
                budget -= count
            batch = build_batch([(_Following(seqs[i].token_ids), states[i].done, count,
                                  seqs[i].block_table) for i, count in run], self.runner.block_size)
            logits = self.runner.execute(batch)
            for i, count in run:
                states[i].done += count
            finished = sum(states[i].done == seqs[i].num_tokens - 1 for i, _ in run)
            firsts.append(argmax(logits[:finished]))
            todo += finished
        return torch.cat(firsts) if firsts else torch.empty(0, dtype=torch.int64)

    def _chain_hidden(self, seqs: list[Sequence], positions: list[int]) -> None:
        """The module's output hidden state at q - 1 becomes the input at q, for each row."""
        bs = self.runner.block_size
        src, dst = [], []
        for seq, q in zip(seqs, positions):
            table = seq.block_table
            src.append(table[(q - 1) // bs] * bs + (q - 1) % bs)
            dst.append(table[q // bs] * bs + q % bs)
        src, dst = to_device([src, dst], self.hidden_in.device)
        self.hidden_in.index_copy_(0, dst, self.hidden_out.index_select(0, src))


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """A [blocks, block_size, ...] pool as one row a slot (a view: writes reach the pool)."""
    return pool.view(pool.shape[0] * pool.shape[1], -1)
