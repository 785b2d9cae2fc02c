"""Passes that apply a rule file: `rule_pass(name, file, doc)` registers one that applies
the rules of `rules/<file>.kiln` (in file order, each everywhere it matches) and then drops
what became dead; `run_rules` is that step, for passes that decide first whether to run."""
from __future__ import annotations

from kiln.ir import Graph

from .canonicalize import dce
from .manager import PassContext, register_pass
from .pattern import Pattern, apply_patterns
from .rules import load_rules


def run_rules(g: Graph, ctx: PassContext, patterns: list[Pattern] | tuple[Pattern, ...]) -> int:
    n = apply_patterns(g, patterns, ctx)
    if n:
        dce(g)
    return n


def rule_pass(pass_name: str, file: str, doc: str):
    def run(g: Graph, ctx: PassContext) -> int:
        return run_rules(g, ctx, load_rules(file))
    run.__name__ = pass_name.replace(".", "_")
    register_pass(pass_name, doc)(run)
    return run
