"""Pass manager: an ordered pipeline of named passes, each timed, counted, optionally
verified, and dumped.

A pass is `fn(graph, ctx) -> int`: it rewrites the graph in place and returns how many
rewrites it made. Every rewrite asks `ctx.allow()` first, so `KILN_PASS_LIMIT=N` stops the
whole pipeline after N rewrites (bisecting a wrong result to one rewrite).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.ir import Graph, print_graph, verify

log = logging.getLogger("kiln.passes")


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[Graph, "PassContext"], int]
    doc: str
    serving_only: bool = False


# The default pipeline, in order (DESIGN.md, Passes). Passes register themselves here.
PIPELINE: list[Pass] = []


def register_pass(name: str, doc: str, serving_only: bool = False):
    def deco(fn):
        if any(p.name == name for p in PIPELINE):
            raise ValueError(f"pass {name} registered twice")
        PIPELINE.append(Pass(name, fn, doc, serving_only))
        return fn
    return deco


def pass_names() -> list[str]:
    return [p.name for p in PIPELINE]


@dataclass
class PassStats:
    name: str
    rewrites: int
    seconds: float
    nodes_after: int
    notes: list[str] = field(default_factory=list)   # limits it hit (rounds, matcher states)

    def __str__(self) -> str:
        head = f"{self.name}: replaced {self.rewrites} ({self.seconds * 1e3:.1f} ms, {self.nodes_after} nodes)"
        return "\n".join([head, *(f"  note: {n}" for n in self.notes)])


class PassLimitReached(Exception):
    pass


@dataclass
class PassContext:
    options: dict = field(default_factory=dict)
    rewrite_limit: int | None = None
    rewrites_done: int = 0
    notes: list[str] = field(default_factory=list)   # of the pass running now

    def note(self, text: str) -> None:
        """Record that a pass stopped short of what it could do (a cap it hit)."""
        self.notes.append(text)

    def allow(self) -> bool:
        """Asks for one more rewrite; False once KILN_PASS_LIMIT is spent."""
        if self.rewrite_limit is not None and self.rewrites_done >= self.rewrite_limit:
            return False
        self.rewrites_done += 1
        return True


class PassManager:
    def __init__(self, passes: list[str] | None = None, disabled: set[str] | None = None,
                 verify_each: bool = False, dump_dir: str | os.PathLike | None = None,
                 rewrite_limit: int | None = None, stop_after: str | None = None,
                 serving: bool = False, options: dict | None = None):
        known = {p.name: p for p in PIPELINE}
        for n in list(passes or []) + sorted(disabled or ()) + ([stop_after] if stop_after else []):
            if n not in known:
                raise ValueError(f"unknown pass {n!r}; known passes: {', '.join(known)} "
                                 f"(`kiln passes` lists them)")
        selected = [known[n] for n in passes] if passes is not None else list(PIPELINE)
        self.passes = [p for p in selected
                       if p.name not in (disabled or set()) and (serving or not p.serving_only)]
        self.stop_after = stop_after
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.ctx = PassContext(dict(options or {}), rewrite_limit)
        self.stats: list[PassStats] = []
        self.snapshots: list[tuple[str, str]] = []  # (pass, IR text) when recording

    def run(self, g: Graph, record: bool = False) -> Graph:
        self._dump(0, "input", g, record)
        if self.verify_each:
            verify(g)
        for i, p in enumerate(self.passes, start=1):
            t0 = time.perf_counter()
            self.ctx.notes = []
            n = p.fn(g, self.ctx) or 0
            self.stats.append(PassStats(p.name, n, time.perf_counter() - t0, len(g.nodes),
                                        self.ctx.notes))
            for text in self.ctx.notes:
                log.warning("kiln: %s: %s", p.name, text)
            if self.verify_each:
                try:
                    verify(g)
                except Exception as e:
                    raise type(e)(f"after pass {p.name}: {e}") from None
            self._dump(i, p.name, g, record)
            if p.name == self.stop_after:
                break
        return g

    def _dump(self, i: int, name: str, g: Graph, record: bool) -> None:
        if self.dump_dir is None and not record:
            return
        text = print_graph(g)
        if record:
            self.snapshots.append((name, text))
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{i:03d}_{name}.kir").write_text(text)

    def summary(self) -> str:
        return "\n".join(str(s) for s in self.stats)
