"""Speculative decoding with a draft model (`--speculative draft:PATH:K`): a smaller model of
the same tokenizer drafts k tokens greedily for each decoding sequence.

The draft model is a second compiled serving graph with a PagedModelRunner and a pool of KV
blocks of its own (a BlockManager without prefix caching). Per sequence the drafter keeps a
`DraftCache`: its block table in that pool and how many of the sequence's tokens have their
draft KV there. A drafting step, for all drafting sequences at once:
1. catch up: the tokens the draft cache has not seen (the whole prompt on first use, then
   the tokens accepted and emitted since) run through the draft runner as one prefill /
   extend batch (chunks of at most the runner's `max_num_batched_tokens`); each sequence's
   last logits give its first draft token;
2. k - 1 decode steps, one batch each, every sequence feeding the draft token it just got.
   The tokens stay on the device between steps (the batch's pending inputs, batch.py):
   the host reads the drafts once, after the last step.
The cache then holds the sequence's tokens and its first k - 1 drafts. After the verify step
the drafts that stood are the sequence's next tokens and their draft KV is right; the rest is
not. The next step compares the drafts written with the tokens the sequence has by then and
keeps the common prefix (the rollback: the KV past it is overwritten by the next catch-up).
Comparing tokens, rather than counting accepted drafts, also covers drafts the scheduler cut
and sequences preempted before verifying theirs. The sequence's last token always runs
again: its logits are the first draft's.

Drafting is greedy, hence deterministic: the point-mass proposal spec_decode's rejection
sampling assumes. Draft ids are taken from the logits of the ids both models know (their
vocabularies may be padded to different sizes; kiln.serving checks the tokenizers agree).

The pool holds as many tokens as the target's. A sequence the pool has no room for first
evicts the draft caches of sequences not drafting this step, least recently drafting first
(one evicted catches up again when it drafts); failing that, it drafts nothing this step.
The engine releases a finished or aborted sequence's blocks (`release`).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np
import torch

from .batch import PendingInputs, build_batch
from .kv_cache import BlockManager
from .sampler import argmax
from .sequence import Sequence
from .spec_decode import UnreadTokens, gather_drafts


@dataclass(eq=False)
class DraftCache:
    """One sequence's KV in the draft pool. BlockManager reads and writes `block_table`,
    `block_hashes` and `num_computed` as it does a Sequence's."""
    block_table: array = field(default_factory=lambda: array("i"))
    block_hashes: list = field(default_factory=list)
    num_computed: int = 0          # the sequence's first tokens whose draft KV is in the pool
    written: list[int] = field(default_factory=list)   # drafts written after those, unverified
    last_drafted: int = 0          # the proposer's step count when it last drafted (eviction)


class DraftModelProposer:
    """Drafts with `runner`, a compiled draft model whose KV lives in a pool of its own."""
    async_between_drafts = True   # it catches up on the tokens it has not seen (_settle)

    def __init__(self, runner, target_vocab_size: int):
        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
        self.vocab_size = min(runner.vocab_size, target_vocab_size)
        self.max_batch_tokens = getattr(runner, "max_num_batched_tokens", 512)
        self.caches: dict[Sequence, DraftCache] = {}
        self.steps = 0

    # -- per sequence ------------------------------------------------------------------------
    def cached_tokens(self, seq: Sequence) -> int:
        """How many of the sequence's tokens have their draft KV in the pool (after the
        rollback of its last drafts)."""
        cache = self.caches.get(seq)
        if cache is None:
            return 0
        self._settle(cache, seq)
        return cache.num_computed

    def release(self, seq: Sequence) -> None:
        cache = self.caches.pop(seq, None)
        if cache is not None:
            self.blocks.free_seq(cache)

    def _settle(self, cache: DraftCache, seq: Sequence) -> None:
        """Keep the drafts written that became the sequence's tokens; never the last token,
        whose logits the next draft needs."""
        tokens, at = seq.token_ids, cache.num_computed
        kept = 0
        for draft in cache.written:
            if at + kept >= len(tokens) or tokens[at + kept] != draft:
                break
            kept += 1
        cache.num_computed = min(at + kept, len(tokens) - 1)
        cache.written = []

    def _reserve(self, cache: DraftCache, num_tokens: int, drafting: set) -> bool:
        """Blocks for the sequence's first `num_tokens` tokens, evicting idle caches if need be."""
        if self.blocks.allocate(cache, num_tokens - cache.num_computed):
            return True
        for seq in sorted(self.caches, key=lambda s: self.caches[s].last_drafted):
            if seq in drafting:
                continue
            self.release(seq)
            if self.blocks.allocate(cache, num_tokens - cache.num_computed):
                return True
        return False

    # -- drafting ----------------------------------------------------------------------------
    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        self.steps += 1
        drafting = set(seqs)
        caches = []
        for seq in seqs:
            cache = self.caches.get(seq)
            if cache is None:
                cache = self.caches[seq] = DraftCache()
            self._settle(cache, seq)
            cache.last_drafted = self.steps
            caches.append(cache)
        # Room for the sequence's tokens and the k - 1 drafts fed back.
        live = [i for i, (seq, cache, k) in enumerate(zip(seqs, caches, ks))
                if self._reserve(cache, seq.num_tokens + k - 1, drafting)]
        outputs: list[tuple[list[int], torch.Tensor]] = []   # (sequence indices, their drafts)
        prev = self._catch_up([seqs[i] for i in live], [caches[i] for i in live])
        outputs.append((live, prev))
        bs = self.runner.block_size
        for j in range(1, max((ks[i] for i in live), default=0)):
            # Sequence i feeds its draft j - 1 at position num_tokens + j - 1.
            rows = [r for r, i in enumerate(live) if ks[i] > j]
            live = [live[r] for r in rows]
            batch = build_batch([(UnreadTokens(), seqs[i].num_tokens + j - 1, 1,
                                  caches[i].block_table) for i in live], bs)
            batch.pending = PendingInputs(np.arange(len(live)), np.asarray(rows), prev)
            prev = self._greedy(self.runner.execute(batch))
            outputs.append((live, prev))
        drafts = gather_drafts(outputs, len(seqs))
        for i in range(len(seqs)):
            caches[i].written = drafts[i][:ks[i] - 1]
        return drafts

    def _catch_up(self, seqs: list[Sequence], caches: list[DraftCache]) -> torch.Tensor:
        """Run each sequence's tokens its draft cache lacks; returns their first drafts [n]
        on the device, in order. A round takes the sequences in order while the token budget
        lasts, cutting the last one short: sequences finish in order."""
        firsts = []
        todo = 0   # sequences before it have their first draft
        while todo < len(seqs):
            budget, run = self.max_batch_tokens, []
            for i in range(todo, len(seqs)):
                if budget <= 0:
                    break
                count = min(seqs[i].num_tokens - caches[i].num_computed, budget)
                run.append((i, count))
                budget -= count
            batch = build_batch([(seqs[i].token_ids, caches[i].num_computed, count,
                                  caches[i].block_table) for i, count in run], self.runner.block_size)
            logits = self.runner.execute(batch)
            for i, count in run:
                caches[i].num_computed += count
            done = sum(caches[i].num_computed == seqs[i].num_tokens for i, _ in run)
            firsts.append(self._greedy(logits[:done]))
            todo += done
        return torch.cat(firsts) if firsts else torch.empty(0, dtype=torch.int64)

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, :self.vocab_size]
        return argmax(logits)
