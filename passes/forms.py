"""canonicalize.forms: the rewrites of `rules/canonical.kiln`, right after `canonicalize`
and before any fusion, so that a fusion rule is written against one spelling of what
models write several ways (x * x and pow(x, 2), sum / n and mean, softmax spelled out)."""
from __future__ import annotations

from .rule_pass import rule_pass

canonical_forms = rule_pass("canonicalize.forms", "canonical", "one spelling for x*x, sum/n, a "
                            "spelled-out softmax (rules/canonical.kiln), before the fusions")
