"""Wrapper codegen: a kiln Graph -> a readable, standalone Python module that runs it.

The module is straight-line code (no interpreter loop): one line per node, kernels
imported by name from the target's kernel table, intermediates deleted after their last
use so peak memory matches eager. `python wrapper.py inputs.pt` runs it on saved inputs.
"""
from __future__ import annotations

import hashlib
import keyword
import linecache
import math
import re

import torch

from kiln.ir import Graph, Value
from kiln.ir.ops import SYM_OPS, get_op, is_opaque

from .targets import Target

_SYM_PY = {name: py for name, (_, _, py) in SYM_OPS.items()}


def _ident(name: str, used: set[str]) -> str:
    base = re.sub(r"\W", "_", name)
    if not base or base[0].isdigit() or keyword.iskeyword(base):
        base = "a_" + base
    n, k = base, 1
    while n in used:
        n, k = f"{base}_{k}", k + 1
    used.add(n)
    return n


def py_literal(a, names: dict[Value, str]) -> str:
    if isinstance(a, Value):
        return names[a]
    if isinstance(a, float):
        if math.isnan(a):
            return "float('nan')"
        if math.isinf(a):
            return "float('inf')" if a > 0 else "float('-inf')"
        return repr(a)
    if isinstance(a, torch.dtype):
        return f"torch.{str(a).split('.')[-1]}"
    if isinstance(a, torch.device):
        return f"torch.device({str(a)!r})"
    if isinstance(a, (torch.layout, torch.memory_format)):
        return f"torch.{str(a).split('.')[-1]}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(py_literal(x, names) for x in a) + "]"
    return repr(a)


def code_generator(target: Target):
    """`can_generate(node)` of the target's kernel generator, for the schedule pass; None
    when the target has none (its kiln.call functions then run as torch code)."""
    if target.triton_backend is None:
        return None
    from .triton.codegen import can_generate
    return can_generate


def _callees(g: Graph, target: Target, used: set[str]) -> tuple[dict[str, str], list[str]]:
    """kiln.call callee -> the Python name that runs it, and the source defining them:
    generated Triton kernels, or (targets without a generator) straight-line torch code."""
    names, source = {}, []
    for fname, f in g.functions.items():
        py = _ident(fname, used)
        names[fname] = py
        if target.triton_backend is not None:
            # Values a model keeps on the host (StaticCache's lengths) run the torch version.
            from .triton.codegen import generate as triton_kernel
            host = _ident(f"{fname}_host", used)
            source.append(_function(f, target, host, used, {})[0])
            source.append(triton_kernel(f, py, host))
        else:
            source.append(_function(f, target, py, used, {})[0])
    return names, source


def generate(g: Graph, target: Target, prepare: Graph | None = None,
             positions: tuple[int, ...] = (), copied: tuple[int, ...] = ()) -> str:
    """The wrapper module: `forward(*inputs)` runs g. With a weight preparation
    (passes/weight_prep.py), g is the forward graph that takes the prepared values after
    the original inputs: the module defines `prepare_weights` and `forward_prepared`, and
    `forward` feeds the latter from a PreparedWeights cache over the inputs at
    `positions` (version-checked where `copied`)."""
    used: set[str] = {"torch", "aten", "prims", "operator", "triton", "tl", "os", "ON_HOST_OK",
                      "PreparedWeights", "prepared_weights", "prepare_weights",
                      "forward_prepared", "forward"}
    imports: dict[str, tuple[str, str]] = {}  # kiln op -> (alias, import line)
    callees, kernels = _callees(g, target, used)
    fns = []
    if prepare is None:
        fn, params, names = _function(g, target, "forward", used, imports, callees)
    else:
        fns.append(_function(prepare, target, "prepare_weights", used, imports, callees)[0])
        share_key = hashlib.sha1(fns[-1].encode()).hexdigest()[:16]
        fn, params, names = _function(g, target, "forward_prepared", used, imports, callees)
        n_inputs = len(g.inputs) - len(prepare.outputs)
        fn += "\n".join([
            "",
            "",
            "",
            "# Computed once per set of weight tensors (kiln.backends.prepared).",
            "# Graphs with this same preparation (share key) share its results.",
            f"prepared_weights = PreparedWeights(prepare_weights, {tuple(positions)!r}, "
            f"copied={tuple(copied)!r}, share_key={share_key!r})",
            "",
            "",
            "def forward(*inputs):",
            f"    assert len(inputs) == {n_inputs}, f\"forward takes {n_inputs} inputs, got {{len(inputs)}}\"",
            "    return forward_prepared(*inputs, *prepared_weights(inputs))",
            "",
            "",
            "# For graph capture (kiln.backends.cudagraphs.capture_parts): a captured graph must",
            "# own the prepared tensors whose addresses it bakes in.",
            "forward.forward_prepared = forward_prepared",
            "forward.prepared_weights = prepared_weights",
        ])
    head = [
        f'"""kiln wrapper for @{g.name}, target {target.name}.',
        "",
        f"Generated from {len(g.nodes)} IR nodes. Inputs, in order: "
        + ", ".join(f"{names[v]}: {v.type}" for v in g.inputs[:6])
        + (" ..." if len(g.inputs) > 6 else "") + '"""',
        "import operator",
        "import torch",
    ]
    if kernels and target.triton_backend is not None:
        head += ["import os", "import triton", "import triton.language as tl"]
    head += ["", "aten = torch.ops.aten", "prims = torch.ops.prims"]
    if kernels and target.triton_backend is not None:
        head += ["# Triton's interpreter (TRITON_INTERPRET=1) runs generated kernels on CPU tensors.",
                 'ON_HOST_OK = os.environ.get("TRITON_INTERPRET") == "1"']
    if prepare is not None:
        head.append("from kiln.backends.prepared import PreparedWeights")
    head += sorted(line for _, line in imports.values())
    main = [
        "",
        "",
        'if __name__ == "__main__":',
        "    import sys",
        "    inputs = torch.load(sys.argv[1])",
        "    for i, out in enumerate(forward(*inputs)):",
        "        print(i, tuple(out.shape) if isinstance(out, torch.Tensor) else out)",
    ]
    parts = ["\n".join(head)] + kernels + fns + [fn]
    return "\n\n\n".join(parts) + "\n".join(main) + "\n"


def _function(g: Graph, target: Target, fname: str, used: set[str], imports: dict,
              callees: dict[str, str] | None = None):
    """`def fname(inputs): ...` running g's nodes as straight-line code."""
    local = set(used)
    names: dict[Value, str] = {}
    params = []
    for v in g.inputs:
        names[v] = _ident(v.name, local)
        params.append(names[v])
    body: list[str] = []
    last_use: dict[Value, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.operands():
            last_use[v] = i
    outputs = set(g.outputs)
    for i, n in enumerate(g.nodes):
        for r in n.results:
            names[r] = _ident(f"v{len(names) - len(g.inputs)}", local)
        args = [py_literal(a, names) for a in n.args]
        kwargs = [f"{k}={py_literal(a, names)}" for k, a in n.attrs.items()]
        if n.op in _SYM_PY:
            call = _SYM_PY[n.op].format(*args)
        elif n.op == "sym.size":
            call = f"{args[0]}.shape[{n.attrs['dim']}]"
        elif n.op == "kiln.call":
            call = f"{callees[n.attrs['callee']]}({', '.join(args)})"
            if len(n.results) == 1:   # callees return tuples
                call += "[0]"
        elif n.op.startswith("kiln."):
            if n.op not in imports:
                module, fn = target.kernel(n.op).split(":")
                alias = _ident(f"kiln_{fn}", used)
                imports[n.op] = (alias, f"from {module} import {fn} as {alias}")
            call = f"{imports[n.op][0]}({', '.join(args + kwargs)})"
        elif is_opaque(n.op):
            call = f"torch.ops.{n.op[len('torch.'):]}({', '.join(args + kwargs)})"
        else:
            get_op(n.op)
            call = f"{n.op}({', '.join(args + kwargs)})"
        lhs = ", ".join(names[r] for r in n.results)
        body.append(f"    {lhs} = {call}" if n.results else f"    {call}")
        dead = [names[v] for v in n.operands() if last_use.get(v) == i and v not in outputs
                and not v.is_input]
        if dead:
            body.append(f"    del {', '.join(sorted(set(dead)))}")
    ret = ", ".join(names[v] for v in g.outputs)
    body.append(f"    return ({ret}{',' if len(g.outputs) == 1 else ''})")
    return "\n".join([f"def {fname}({', '.join(params)}):"] + body), params, names


def load(source: str, name: str = "kiln_wrapper"):
    """The generated module's `forward`."""
    return load_module(source, name)["forward"]


def load_module(source: str, name: str = "kiln_wrapper") -> dict:
    """Compiles the generated source, returns its namespace; tracebacks show its lines."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<{name}-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": name}
    exec(compile(source, filename, "exec"), namespace)
    return namespace

