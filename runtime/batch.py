"""The contract between the scheduler and a model runner: one flattened batch per step.

A step runs the new tokens of several sequences at once: prefill chunks and single decode
tokens, mixed, laid end to end ("sequence after sequence"). Everything a paged-attention
kernel needs to find each sequence's KV is in the batch; the runner owns the KV cache
tensors, the scheduler owns which block holds what.

Conventions a runner can rely on:
- slot = block_id * block_size + offset; the new token `j` of sequence `i` sits at
  position `context_lens[i] - (query_start[i+1] - query_start[i]) + j` and writes its
  K/V to `slot_mapping[query_start[i] + j]` before attention reads it.
- Attention for sequence `i` reads exactly its first `context_lens[i]` tokens through
  `block_tables[i]` (causal inside the new tokens). Padding entries of `block_tables` are
  0 and must never be read past `context_lens`.
- Tensors are built on the CPU (int64 / int32 as documented); `to(device)` moves them.
- `block_tables` is only as wide as the longest sequence of this batch needs; a runner
  that replays captured graphs pads to its own bucket.
- With async scheduling the batch is built while the previous step still runs: the input
  tokens that step samples are placeholders in `input_ids` and listed in `pending`; a
  runner that declares `accepts_pending_inputs` applies `pending` to its device copy of
  `input_ids` before the model reads it (stream order makes the previous step's tokens
  ready by then, with no host wait).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from itertools import chain
from typing import Protocol, runtime_checkable

import numpy as np
import torch


def to_device(values, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Host `values` as a tensor on `device`, copied without a wait: on CUDA from pinned
    memory, since a blocking copy would synchronize the stream (a step launched ahead
    included)."""
    # (through numpy: torch.tensor of a list of 256 ints takes 12 us, numpy 3 us)
    t = torch.from_numpy(np.asarray(values)).to(dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class PendingInputs:
    """Input tokens of a batch that the previous step samples: `input_ids[rows[j]]` is
    `tokens[picks[j]]`, `tokens` being that step's sampled ids on the device."""
    rows: list[int] | np.ndarray
    picks: list[int] | np.ndarray
    tokens: torch.Tensor

    def apply(self, input_ids: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Write the pending tokens into `input_ids` (queued on the device, no host wait).
        `index`: rows and picks as int64 tensors already on the device (model_runner's
        StepBuffers send them with the step's inputs); else they are sent here. Two torch
        calls, no more: one costs 10-20 us of host time on the H200 host."""
        rows, picks = index if index is not None else to_device([self.rows, self.picks], input_ids.device)
        tokens = self.tokens if self.tokens.device == input_ids.device else self.tokens.to(input_ids.device)
        input_ids.index_copy_(0, rows, tokens.index_select(0, picks))   # (both int64)


@dataclass
class FlatBatch:
    input_ids: torch.Tensor     # [T] int64: all new tokens, sequence after sequence
    positions: torch.Tensor     # [T] int64: position of each token in its sequence
    query_start: torch.Tensor   # [N+1] int32: cumulative new-token counts (cu_seqlens_q)
    context_lens: torch.Tensor  # [N] int32: tokens in the sequence's KV after this step
    slot_mapping: torch.Tensor  # [T] int64: KV slot each new token writes
    block_tables: torch.Tensor  # [N, max_blocks] int32: block ids, padded with 0
    max_query_len: int          # host copies of the maxima, so kernels need no sync
    max_context_len: int
    pending: PendingInputs | None = None   # placeholders in input_ids (async scheduling)
    invariant: bool = False     # rows computed as in one-row batches (a verify step's drafts)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.numel()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token (the shape graph replay serves)."""
        return self.max_query_len == 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FlatBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return FlatBatch(**moved)


@runtime_checkable
class ModelRunner(Protocol):
    """What the engine needs from whatever executes the model (a compiled kiln graph)."""
    block_size: int      # tokens per KV block
    num_blocks: int      # KV blocks the runner allocated
    max_model_len: int   # longest sequence (prompt + output) the runner accepts
    vocab_size: int      # logits width
    # Optional: `device` (where execute runs). On "cuda" the engine times each step's
    # device work with CUDA events (metrics.DeviceTimer).
    # Optional: `accepts_pending_inputs = True` (it applies `batch.pending`): the engine may
    # then schedule a step while the previous one runs (EngineConfig.async_scheduling).

    def execute(self, batch: FlatBatch) -> torch.Tensor:
        """Write the new tokens' K/V, run the model, return [N, vocab_size] logits of each
        sequence's last new token (any float dtype, any device)."""
        ...


def build_batch(items: list[tuple[list[int], int, int, array | list[int]]], block_size: int) -> FlatBatch:
    """items: (token_ids, num_computed, num_new, block_table) per sequence, in batch order.
    A block table is an array('i') of block ids, as sequences keep theirs (the batch's
    tables are then one join of their bytes), or a list."""
    tokens, starts, counts, tables = zip(*items)
    n = len(items)
    ids = []
    for t, start, count in zip(tokens, starts, counts):
        if count == 1:
            ids.append(t[start])
        else:
            ids += t[start:start + count]
    lens = np.fromiter(map(len, tables), np.int64, n)
    try:
        flat = np.frombuffer(b"".join(tables), np.int32)
    except TypeError:   # lists
        flat = np.fromiter(chain.from_iterable(tables), np.int32, int(lens.sum()))
    width = int(lens.max())
    block_tables = np.zeros((n, width), np.int32)
    block_tables[np.arange(width) < lens[:, None]] = flat   # row after row, padded with 0
    pos = np.array(starts, np.int64)
    if len(ids) == n:   # decode: one token a sequence
        ctx = pos + 1
        seq_of = np.arange(n)
        qstart = np.arange(n + 1, dtype=np.int32)
    else:
        new = np.array(counts)
        ctx = pos + new
        seq_of = np.repeat(np.arange(n), new)
        qstart = np.zeros(n + 1, np.int32)
        np.cumsum(new, out=qstart[1:])
        pos = np.arange(len(ids)) + np.repeat(pos - qstart[:-1], new)
    slots = block_tables[seq_of, pos // block_size] * np.int64(block_size) + pos % block_size
    return FlatBatch(
        input_ids=torch.from_numpy(np.array(ids, np.int64)),
        positions=torch.from_numpy(pos),
        query_start=torch.from_numpy(qstart),
        context_lens=torch.from_numpy(ctx.astype(np.int32)),
        slot_mapping=torch.from_numpy(slots),
        block_tables=torch.from_numpy(block_tables),
        max_query_len=max(counts),
        max_context_len=int(ctx.max()),
    )
