"""When two literals, or two sizes, are equal: `lit_equal` is how the matcher compares a
`$c` or a literal with the graph's; `dims_equal` also holds for symbolic sizes equal after
simplification (the rewriter's type check and `where` conditions use it)."""
from __future__ import annotations

import math

import sympy

from kiln.ir import Value


def lit_equal(a, b) -> bool:
    if isinstance(a, Value) or isinstance(b, Value):
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(lit_equal(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and a == b
    except Exception:  # noqa: BLE001
        return False


def dims_equal(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float, sympy.Basic)) and isinstance(b, (int, float, sympy.Basic)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b:
            return True
        if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
            return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0
        return False
    return lit_equal(a, b)
