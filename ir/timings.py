"""Where compile time goes: one record of named, nested phases that every stage adds to.

Capture (dynamo, AOTAutograd), the passes, codegen, kernel compilation (Triton compiles a
kernel at its first launch), weight preparation, graph capture and model loading each
time themselves with `phase(name)`, or `start(name)` where a phase begins and ends in
different calls (dynamo's compile callbacks, Triton's JIT hooks). A phase started while
another runs on the same thread is its child; the same path again adds to its seconds
and count, so a process that compiles many graphs keeps a small tree. It lives in `ir`,
the one module every stage imports, as `fallback` does.

Recording is always on (a few dozen phases a compile); showing it is asked for with
`kiln compile --timings`, KILN_TIMINGS=1 (the tree on stderr at exit), or KILN_DUMP_DIR
(timings.txt); `kiln.timings()` returns it.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable

ENV = "KILN_TIMINGS"

_lock = threading.Lock()
_local = threading.local()
# path (names from the root) -> [seconds, count], in the order phases first started.
_totals: dict[tuple[str, ...], list] = {}


def _stack() -> list[tuple[str, ...]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def start(name: str) -> Callable[[], float]:
    """Opens phase `name` under this thread's current phase; returns the function that
    closes it (and any of its children still open) and returns its seconds."""
    stack = _stack()
    path = (*stack[-1], name) if stack else (name,)
    with _lock:
        _totals.setdefault(path, [0.0, 0])
    stack.append(path)
    t0 = time.perf_counter()

    def stop() -> float:
        seconds = time.perf_counter() - t0
        if path in stack:
            del stack[stack.index(path):]
        add(path, seconds)
        return seconds
    return stop


@contextlib.contextmanager
def phase(name: str):
    stop = start(name)
    try:
        yield
    finally:
        stop()


def add(path: tuple[str, ...], seconds: float, count: int = 1) -> None:
    with _lock:
        entry = _totals.setdefault(path, [0.0, 0])
        entry[0] += seconds
        entry[1] += count


def record(name: str, seconds: float) -> None:
    """A phase measured elsewhere (the pass manager's per-pass times), as a child of this
    thread's current phase."""
    stack = _stack()
    add((*stack[-1], name) if stack else (name,), seconds)


def current() -> tuple[str, ...]:
    """This thread's open phase path (empty outside every phase)."""
    stack = _stack()
    return stack[-1] if stack else ()


def requested() -> bool:
    return os.environ.get(ENV) == "1"


def snapshot() -> list[tuple[tuple[str, ...], float, int]]:
    """(path, seconds, count) of every finished phase, in tree order: each phase after its
    parent, siblings in the order they first started."""
    with _lock:
        order = {path: i for i, path in enumerate(_totals)}
        rows = [(path, s, n) for path, (s, n) in _totals.items() if n]
    return sorted(rows, key=lambda r: [order.get(r[0][:i], -1) for i in range(1, len(r[0]) + 1)])


def report() -> str:
    """The tree: a phase's seconds include its children's; a count when it ran more than once."""
    rows = snapshot()
    if not rows:
        return "kiln timings: nothing timed yet\n"
    width = max(2 * (len(p) - 1) + len(p[-1]) for p, _, _ in rows)
    lines = [f"{'kiln timings':{width}s}  {'seconds':>8s}  count"]
    for path, seconds, count in rows:
        label = "  " * (len(path) - 1) + path[-1]
        lines.append(f"{label:{width}s}  {seconds:8.3f}" + (f"  {count:5d}" if count > 1 else ""))
    return "\n".join(lines) + "\n"


def reset() -> None:
    with _lock:
        _totals.clear()
