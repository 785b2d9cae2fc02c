"""Patterns over kiln graphs: the objects rules compile to, the matcher, and the rewriter.

Both front ends build the same objects: `.kiln` rule files (`kiln.passes.rules`; every
fixed-pattern fusion kiln ships is one) and the Python `PatternBuilder`, for code that
generates patterns. Both end in `Matcher` and `rewrite`, so they share every semantic:
`matcher` says what a pattern matches, `rewriter` how a match is replaced.

The modules, each importing (at run time) only ones listed above it:

- `op_classes`: classes of graph nodes: dtype casts (`is_cast`, `CAST_OPS`: the op
  registry's cast trait), linear layers as captured (`match_linear`), MoE routers
  (`feeds_router`) and the LM head (`is_lm_head`).
- `equality`: equality of literals (`lit_equal`) and of symbolic sizes (`dims_equal`).
- `objects`: `Pattern` and its parts (`Stmt`, `Var`, `Const`, `Lit`, `ListPat`, `AttrPat`,
  `Constraint`, `MISSING`), the `Match` the matcher hands a replacement and the
  `RuleContext` it was found in, and
  `KilnRuleError`, a bad rule in either front end.
- `matcher`: `Matcher`, the matches of one pattern in one graph.
- `rewriter`: `ReplaceBuilder` (the `b` of a replacement's `b.op(...)`), `rewrite` (one
  match replaced, type-checked and placed) and `apply_patterns` (the loop a pass runs).
- `builder`: `PatternBuilder`, the Python front end.

This package exports the names other modules import; the rest stay in their module.
"""
from .builder import PatternBuilder
from .equality import dims_equal
from .matcher import Matcher
from .objects import (MISSING, AttrPat, Const, Constraint, KilnRuleError, ListPat, Lit, Match,
                      Pattern, RuleContext, Stmt, Var)
from .op_classes import feeds_router, is_cast, is_lm_head, match_linear
from .rewriter import ReplaceBuilder, apply_patterns

__all__ = ["KilnRuleError", "MISSING", "Var", "Const", "Lit", "ListPat", "AttrPat", "Stmt",
           "Constraint", "Pattern", "Match", "RuleContext", "Matcher", "ReplaceBuilder", "apply_patterns",
           "PatternBuilder", "dims_equal", "is_cast", "match_linear", "feeds_router",
           "is_lm_head"]
