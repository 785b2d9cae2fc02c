"""KV-cache block manager: a fixed pool of blocks, reference counts, prefix caching.

A block holds `block_size` consecutive tokens of one or more sequences (shared prefixes).
When a block is full and its KV computed, it gets a hash chained from the previous block's
hash and its own token ids, so equal prefixes have equal hash chains. A new sequence
starts by walking its chain and taking every cached block it finds (reference count + 1).
A block whose count drops to zero goes to the free list but keeps its hash: it can still
be revived by a later prefix hit until it is handed out again, least recently freed first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.tokens: tuple[int, ...] = ()   # kept to rule out hash collisions


def chain_hash(prev: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """128-bit BLAKE2 of the previous block's hash and this block's token ids: stable across
    processes and not open to crafted collisions (Python's own hash of int tuples is)."""
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self.cached: dict[bytes, int] = {}        # hash -> block id
        self.query_tokens = 0                     # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0                       # of those, served from the cache

    # -- accounting ---------------------------------------------------------------------------
    def num_free_blocks(self) -> int:
        return len(self.free)

    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def usage(self) -> float:
        return self.num_used_blocks() / self.num_blocks

    # -- allocation ---------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Take the cached full blocks that start a fresh sequence; returns tokens reused.
        The block holding the last token is never taken whole: its logits are needed."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        prev = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed = len(seq.block_table) * bs
        if seq.num_preemptions == 0:   # count each prompt once, not again on recompute
            seq.num_cached_tokens = seq.num_computed
            self.query_tokens += seq.num_prompt_tokens
            self.hit_tokens += seq.num_computed
        return seq.num_computed

    def allocate(self, seq: Sequence, num_new: int) -> bool:
        """Grow the block table to hold `num_new` more tokens; False (nothing changed) if the
        pool is too small."""
        need = -(-(seq.num_computed + num_new) // self.block_size) - len(seq.block_table)
        if need <= 0:   # (most steps: a decode token fits in the last block)
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            block_id = next(iter(self.free))
            block = self.blocks[block_id]
            if block.hash is not None:     # evict: its cached content is overwritten
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.tokens = None, ()
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """After a step: hash the blocks that became full so later requests can reuse them."""
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if self.prefix_caching and block.hash is None:
                block.hash, block.tokens = h, tokens
                self.cached.setdefault(h, block.id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past those that hold the sequence's first `num_tokens` tokens (a
        verify step's rejected drafts). They were allocated for this step alone: no hash,
        no other owner."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            assert block.ref_count == 0 and block.hash is None, block.id
            self.free[block.id] = None
            self.free.move_to_end(block.id, last=False)

    def free_seq(self, seq: Sequence) -> None:
        """Drop a sequence's blocks (finish, abort, preemption). Its tail is freed first so
        it is evicted before its prefix, which other requests are likelier to share."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, block_id
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:      # nothing to keep: hand it out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = array("i")
        seq.block_hashes = []
        seq.num_computed = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
