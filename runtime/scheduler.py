"""Continuous batching: which tokens of which sequences run in the next step.

Each step fills a token budget (`max_num_batched_tokens`) in priority order:
1. running sequences that decode (one token each),
2. running sequences still in a chunked prefill,
3. waiting sequences, first come first served, their prefill cut to what the budget has
   left (cached prefix tokens cost nothing).
When a running sequence needs a block and the pool is empty, the most recently admitted
running sequence not yet scheduled this step is preempted by recompute: its blocks are freed
and it goes back to the front of the waiting queue with all its tokens, to be prefilled
again (mostly from the prefix cache). Admission never preempts.

With async scheduling (the engine's) a step is scheduled while the previous one runs: a
sequence's last token may be pending (`sequence.PENDING`, read after the step is planned);
it is still one token to run, and a sequence marked `final` (its pending token ends it) is
not scheduled again.

With speculative decoding a decoding sequence may carry draft tokens (`seq.draft`, set by
spec_decode before the step is planned): it runs its last token and its drafts, one row
each in the batch (spec_decode explains the layout), within the same token budget; the
drafts are cut to what the budget has left, and so that the batch has no more rows than
`max_num_seqs` (the largest decode bucket). `advance` counts only the last token as
computed: the engine adds the accepted drafts after verifying them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .batch import FlatBatch, build_batch
from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256              # running sequences at once
    max_num_batched_tokens: int = 512    # new tokens per step (prefill chunks + decodes)


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    num_new: list[int]     # tokens each sequence runs this step (drafts included)
    batch: FlatBatch
    drafts: list[list[int]] | None = None   # per sequence, the draft tokens it verifies


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        assert config.max_num_batched_tokens >= 1 and config.max_num_seqs >= 1
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> ScheduledStep | None:
        budget = self.config.max_num_batched_tokens
        preempted = self.num_preemptions
        # Running sequences: decodes first, then prefills in progress, each in admission order.
        decodes, prefills = [], []
        for seq in self.running:
            if not seq.final:
                pending = seq.num_pending
                (prefills if pending > 1 else decodes).append((seq, pending))
        queue = decodes + prefills
        head, end = 0, len(queue)   # the queue is queue[head:end]: preemption takes from the end
        seqs, num_new = [], []
        allocate = self.blocks.allocate
        # Rows a batch may have besides one per running sequence: for drafts.
        spare_rows, draft_rows = self.config.max_num_seqs - len(self.running), 0
        while head < end and budget > 0:
            seq, pending = queue[head]
            head += 1
            if seq.draft:
                seq.draft = seq.draft[:max(0, min(budget - 1, spare_rows))]
                spare_rows -= len(seq.draft)
                draft_rows += len(seq.draft)
                pending += len(seq.draft)
            n = pending if pending < budget else budget
            while not allocate(seq, n):
                if head < end:
                    end -= 1
                    victim = queue[end][0]
                else:
                    victim = seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        # Waiting sequences, while budget, seats and blocks last (none if we just preempted).
        while (self.waiting and budget > 0 and len(self.running) + draft_rows < self.config.max_num_seqs
               and self.num_preemptions == preempted):
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_pending, budget)
            if not self.blocks.allocate(seq, n):
                self.blocks.free_seq(seq)   # give the prefix hits back; try next step
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        if not seqs:
            return None
        if draft_rows:
            drafts = [s.draft for s in seqs]
            items = []
            for s, n, d in zip(seqs, num_new, drafts):
                if not d:
                    items.append((s.token_ids, s.num_computed, n, s.block_table))
                    continue
                tokens = s.token_ids + d
                items += [(tokens, s.num_computed + j, 1, s.block_table) for j in range(n)]
            return ScheduledStep(seqs, num_new, build_batch(items, self.blocks.block_size), drafts)
        batch = build_batch([(s.token_ids, s.num_computed, n, s.block_table) for s, n in zip(seqs, num_new)],
                            self.blocks.block_size)
        return ScheduledStep(seqs, num_new, batch)

    def advance(self, step: ScheduledStep, commit: bool = True) -> list[bool]:
        """After the model ran (or was launched): record the computed tokens; returns, per
        scheduled sequence, whether its logits are for a new token (False for a prefill chunk
        that is not the last). `commit=False` leaves hashing the full blocks to a later
        `blocks.commit`, for when some of their tokens are still pending."""
        ready = []
        for seq, n in zip(step.seqs, step.num_new):
            if seq.status is not Status.RUNNING:   # preempted or aborted meanwhile
                ready.append(False)
                continue
            seq.num_computed += n - len(seq.draft)   # (drafts count once accepted)
            if commit:
                self.blocks.commit(seq)
            ready.append(seq.num_pending == 0)
        return ready

    def _preempt(self, seq: Sequence) -> None:
        seq.draft = []
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
