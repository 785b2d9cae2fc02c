"""fuse.parallel_linear: linears that read the same input become one GEMM.

    %q = aten.mm(%x, permute(%Wq, [1, 0]))          %w = aten.cat([%Wq, %Wk, %Wv], dim=0)
    %k = aten.mm(%x, permute(%Wk, [1, 0]))    ->    %y = aten.mm(%x, permute(%w, [1, 0]))
    %v = aten.mm(%x, permute(%Wv, [1, 0]))          %q = aten.slice(%y, dim=1, 0, Nq) ...

(and `aten.addmm(%b, %x, ...)` with the biases concatenated too). q/k/v and gate/up of
every decoder layer are such groups: one launch instead of two or three, which is what a
launch-bound decode step of a small model pays for. The results are column slices of one
[M, ΣN] tensor; every consumer of a linear's output here accepts a row stride (views,
kiln.rope, kiln.silu_mul, cache writes).

Targets say whether they want it (`Target.merge_parallel_linears`: GPUs yes, the CPU no),
except under weight-only quantisation (quant="int8_weight_only" / "int4_weight_only"), where
the CPU merges too: what kept it from merging (a copy of the weights) is paid anyway by the
quantised copy, and each quantised GEMM carries a fixed host cost on the CPU (casts, the
two bf16 halves of an fp32 input; SmolLM2 with int4 weights on 2 cores: 63.5 -> 68.3
decode tok/s merged, 120 GEMMs a token instead of 210).
The weights W are graph inputs ([N, K], one dtype, one K), or a rank's slices of them
(shard.tensor_parallel); their `cat` depends on weights only, so the compiler computes it
once per set of weight tensors (compiler/driver.py, weight preparation), not on every call.
Left alone: MoE routers (a linear that feeds softmax / top-k: fuse.moe matches its output),
and linears whose weight is not a graph input (MoE experts index a stacked weight).

Why Python and not a `.kiln` rule: a rule matches a fixed number of statements, and this
merges however many linears read one input (two for gate/up, three for q/k/v, more in
other models), grouping them by what they read.
"""
from __future__ import annotations

from kiln.ir import Graph, Node, Value
from kiln.ir.ops import infer_types

from .manager import PassContext, register_pass
from .pattern import feeds_router, match_linear


def _from_input(v: Value) -> bool:
    """A graph input, or a slice of one (shard.tensor_parallel's rows or columns of a
    weight, made contiguous): weight preparation computes the `cat` of such once too."""
    while not v.is_input:
        p = v.producer
        if p.op not in ("aten.slice", "aten.contiguous") or not isinstance(p.args[0], Value):
            return False
        v = p.args[0]
    return True


def _linear(n: Node):
    """(input, weight, bias) of a linear whose weight (and bias) are graph inputs or
    slices of them."""
    lin = match_linear(n)
    if lin is None:
        return None
    _, w, bias = lin
    bias_ok = bias is None or (isinstance(bias, Value) and _from_input(bias) and bias.type.rank == 1)
    return lin if _from_input(w) and bias_ok else None


@register_pass("fuse.parallel_linear", "linears reading the same input (q/k/v, gate/up) -> one "
               "GEMM over concatenated weights, and column slices")
def parallel_linear(g: Graph, ctx: PassContext) -> int:
    from .quantize import WEIGHT_ONLY   # here: importing it first would register quantize first
    if not getattr(ctx.options.get("target"), "merge_parallel_linears", True) \
            and ctx.options.get("quant") not in WEIGHT_ONLY:
        return 0
    users = g.users()
    groups: dict[tuple, list[tuple[Node, Value, Value | None]]] = {}
    for n in g.nodes:
        lin = _linear(n)
        if lin is None:
            continue
        x, w, bias = lin
        if feeds_router(n.results[0], users):
            continue
        key = (x, w.type.dtype, w.type.shape[1], bias is not None,
               bias.type.dtype if bias is not None else None)
        groups.setdefault(key, []).append((n, w, bias))
    inserted: dict[int, list[Node]] = {}   # id(first linear of a group) -> its replacement
    mapping: dict[Value, Value] = {}
    dead: set[int] = set()
    for (x, *_), members in groups.items():
        weights = [w for _, w, _ in members]
        if len(members) < 2 or len(set(weights)) < len(weights):
            continue
        if not all(isinstance(w.type.shape[0], int) for w in weights) or not ctx.allow():
            continue
        new: list[Node] = []

        def emit(op, args, **attrs):
            node = Node(op, args, attrs, infer_types(op, args, attrs, g))
            new.append(node)
            return node.results[0]
        wt = emit("aten.permute", [emit("aten.cat", [weights], dim=0)], dims=[1, 0])
        if members[0][2] is None:
            fused = emit("aten.mm", [x, wt])
        else:
            fused = emit("aten.addmm", [emit("aten.cat", [[b for _, _, b in members]], dim=0), x, wt])
        start = 0
        for node, w, _ in members:
            end = start + w.type.shape[0]
            part = emit("aten.slice", [fused], dim=1, start=start, end=end)
            assert part.type == node.results[0].type, (part.type, node.results[0].type)
            mapping[node.results[0]] = part
            start = end
            dead.add(id(node))
        inserted[id(members[0][0])] = new
    if not inserted:
        return 0
    nodes = []
    for n in g.nodes:
        nodes.extend(inserted.get(id(n), ()))
        if id(n) not in dead:
            nodes.append(n)
    g.nodes = nodes
    g.replace_uses(mapping)
    return len(inserted)
