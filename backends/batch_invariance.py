"""Batch invariance: every row of a decode batch computed exactly as it would be alone.

A GPU kernel chosen by the batch's shape reduces in an order that depends on that shape:
cuBLAS picks another algorithm (and split-K) for 5 rows than for 1, flash-decoding splits
each sequence's keys into fewer slices when more sequences fill the machine. In bf16 the
different rounding flips near-tied greedy choices now and then, so a sequence's tokens
depend on what else was in its batch. Speculative decoding makes that visible: its verify
step runs a sequence's last token and its k drafts as 1 + k rows, where plain decoding
ran one row, and greedy output with speculation should be token for token the output
without it.

Under `batch_invariant()` the kernels that would vary take the shape of a one-row batch
for every row: the decode GEMMs (backends/triton/gemv.py) run the one-row kernel once per
row, up to its MAX_M rows, instead of the unfused norm + cuBLAS pair; paged decode
attention splits each sequence's keys as it would for a batch of one. What it costs: each
row re-reads the weights (from L2 when they fit, which they do for a small model's layers
but not for an 8B model's), and larger batches split more than they need. It is a mode of
the serving runner (`PagedModelRunner(batch_invariant=True)`, `--batch-invariant`), set
around every call of the compiled step and every CUDA-graph capture: a graph bakes in the
kernels chosen while it was captured.

The flag is a context variable rather than a graph attribute because the choice is made by
the launchers from run-time shapes, which is also what lets an artifact compiled without
it serve with it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

_ENABLED = contextvars.ContextVar("kiln_batch_invariant", default=False)


def enabled() -> bool:
    """Whether the kernels launched now must compute each row as in a one-row batch."""
    return _ENABLED.get()


@contextlib.contextmanager
def batch_invariant(on: bool = True):
    """Within the block, kernels launched (or captured) compute each row batch-invariantly."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def invariant_calls(fn):
    """`fn` wrapped so that every call runs under `batch_invariant()`."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with batch_invariant():
            return fn(*args, **kwargs)
    return call
