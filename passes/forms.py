"""canonicalize.forms: the rewrites of `rules/canonical.kiln`, right after `canonicalize`
and before any fusion, so that a fusion rule is written against one spelling of what
models write several ways (x * x and pow(x, 2), sum / n and mean, softmax spelled out)."""
from __future__ import annotations

from kiln.ir import Graph

from .canonicalize import dce
from .manager import PassContext, register_pass
from .pattern import apply_patterns
from .rules import load_rules


@register_pass("canonicalize.forms", "one spelling for x*x, sum/n, a spelled-out softmax "
               "(rules/canonical.kiln), before the fusions")
def canonical_forms(g: Graph, ctx: PassContext) -> int:
    n = apply_patterns(g, load_rules("canonical"), ctx)
    if n:
        dce(g)
    return n
