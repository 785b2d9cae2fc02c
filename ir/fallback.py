"""Fallbacks to eager: loud, counted, and an error when asked.

Every stage that gives up on compiling something and runs it eagerly instead (a graph
kiln cannot capture, a CUDA graph that fails to capture, an op with no kiln schema) calls
`report`. It lives in `ir`, the one module every stage imports, so that frontends,
backends and the runtime report to one place and `kiln.stats()` reads it.

The policy is the `fallback` compile option (`"warn"`, the default, or `"error"`) or the
environment variable KILN_FALLBACK, which wins: under `"error"` a fallback raises
`FallbackError` instead of running eagerly. kiln's test suite runs under KILN_FALLBACK=error.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from dataclasses import dataclass

POLICIES = ("warn", "error")


class FallbackError(RuntimeError):
    """A fallback to eager under `fallback="error"`."""


class KilnFallbackWarning(UserWarning):
    """A fallback to eager under `fallback="warn"` (filter on this class to silence it)."""


@dataclass(frozen=True)
class Fallback:
    kind: str      # "graph" (capture), "cudagraph" (graph capture), "opaque_op" (no schema)
    what: str      # the op, attribute or shape that caused it
    message: str   # the whole message: what happened and how to fix it


_lock = threading.Lock()
_events: list[Fallback] = []


def policy(option: str | None = None) -> str:
    """KILN_FALLBACK if set, else the compile option, else "warn"."""
    chosen = os.environ.get("KILN_FALLBACK") or option or "warn"
    if chosen not in POLICIES:
        raise ValueError(f"fallback policy must be one of {', '.join(POLICIES)}, got {chosen!r} "
                         f"(the `fallback` option or KILN_FALLBACK)")
    return chosen


def report(kind: str, what: str, message: str, option: str | None = None) -> None:
    """Records a fallback; warns, or raises FallbackError under the "error" policy."""
    event = Fallback(kind, what, message)
    with _lock:
        _events.append(event)
    if policy(option) == "error":
        raise FallbackError(f"{message} [fallback=error: set fallback='warn' or KILN_FALLBACK=warn "
                            f"to run it eagerly instead]")
    warnings.warn(message, KilnFallbackWarning, stacklevel=3)


def events() -> list[Fallback]:
    with _lock:
        return list(_events)


def counts() -> dict[str, int]:
    with _lock:
        return dict(Counter(e.kind for e in _events))


def reset() -> None:
    with _lock:
        _events.clear()
