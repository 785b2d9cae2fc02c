"""Graph -> text. The mirror image of `parser.py`: parse(print(g)) prints identically."""
from __future__ import annotations

import json
import math

import torch

from .graph import Graph, Value
from .types import dtype_name


def format_literal(a, names: dict[Value, str]) -> str:
    if isinstance(a, Value):
        return "%" + names[a]
    if a is None:
        return "none"
    if isinstance(a, bool):
        return "true" if a else "false"
    if isinstance(a, int):
        return str(a)
    if isinstance(a, float):
        if math.isnan(a):
            return "nan"
        if math.isinf(a):
            return "inf" if a > 0 else "-inf"
        return repr(a)
    if isinstance(a, str):
        return json.dumps(a)
    if isinstance(a, torch.dtype):
        return dtype_name(a)
    if isinstance(a, torch.device):
        return f'device({json.dumps(str(a))})'
    if isinstance(a, torch.layout):
        return "layout." + str(a).split(".")[-1]
    if isinstance(a, torch.memory_format):
        return "memory_format." + str(a).split(".")[-1]
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(format_literal(x, names) for x in a) + "]"
    raise TypeError(f"kiln IR cannot print the literal {a!r} ({type(a).__name__})")


def value_names(g: Graph) -> dict[Value, str]:
    names: dict[Value, str] = {v: v.name for v in g.inputs}
    i = 0
    for n in g.nodes:
        for r in n.results:
            names[r] = str(i)
            i += 1
    return names


def format_types(types) -> str:
    if len(types) == 1:
        return str(types[0])
    return "(" + ", ".join(str(t) for t in types) + ")"


def print_graph(g: Graph) -> str:
    """The graph, then each of its `kiln.call` callees, in the order they were added."""
    text = _print_func(g)
    for f in g.functions.values():
        text += "\n" + _print_func(f)
    return text


def _print_func(g: Graph) -> str:
    names = value_names(g)
    params = ", ".join(f"{v.role + ' ' if v.role else ''}%{v.name}: {v.type}" for v in g.inputs)
    head = f"func @{g.name}({params}) -> {format_types([v.type for v in g.outputs])}"
    lines = [head]
    if g.sym_ranges:
        ranges = ", ".join(
            f"{s} in [{lo}, {hi}]" + (f" example {g.sym_hints[s]}" if s in g.sym_hints else "")
            for s, (lo, hi) in sorted(g.sym_ranges.items()))
        lines.append(f"    where {ranges}")
    lines[-1] += " {"
    for n in g.nodes:
        args = [format_literal(a, names) for a in n.args]
        args += [f"{k}={format_literal(a, names)}" for k, a in n.attrs.items()]
        call = f"{n.op}({', '.join(args)}) : {format_types([r.type for r in n.results])}"
        if n.results:
            call = ", ".join("%" + names[r] for r in n.results) + " = " + call
        lines.append("  " + call)
    ret = ", ".join("%" + names[v] for v in g.outputs)
    lines.append(f"  return {ret}".rstrip())
    lines.append("}")
    return "\n".join(lines) + "\n"

