"""prepare.align: weight vectors read by fused ops, copied once onto the target's alignment.

The CPU's TVM kernels (kiln.backends.cpu_kernels) load their operands with aligned vector
moves and so run only on tensors that start on a 64-byte boundary (the target's
`weight_alignment`). Weights rarely do: a loaded artifact's and a transformers model's
parameters are views into the mapped safetensors file, at its offsets, so every norm of
SmolLM2 ran torch's code. This pass reads each 1-D weight (norm scales, biases) that a
fused `kiln.*` op takes through an `aten.clone`: weight preparation
(passes/weight_prep.py) moves the clone into `prepare_weights`, which runs once per set of
weights and again when one is written, and torch's allocator gives the copy an aligned
start. Vectors are what those kernels read and are small (SmolLM2: 61 norms, 140 KB);
matrices stay in place (torch's GEMMs take any address, and quantised weights are
prepared copies already).

Runs only for targets that declare an alignment (the cpu target).
"""
from __future__ import annotations

from kiln.ir import Graph, TensorType

from .manager import PassContext, register_pass
from .weight_prep import weight_inputs


@register_pass("prepare.align", "1-D weights read by fused ops: copied once (weight preparation) "
                                "onto the target's alignment (cpu: the TVM kernels)")
def align_weight_vectors(g: Graph, ctx: PassContext) -> int:
    if not getattr(ctx.options.get("target"), "weight_alignment", 0):
        return 0
    vectors = {v for v in weight_inputs(g)
               if isinstance(v.type, TensorType) and len(v.type.shape) == 1}
    copies = {}
    rewrites = 0
    for n in list(g.nodes):
        if not n.op.startswith("kiln."):
            continue
        for v in set(n.operands()):
            if v in vectors:
                if v not in copies:
                    if not ctx.allow():
                        return rewrites
                    copies[v] = g.add_node("aten.clone", [v], {}, [v.type],
                                           before=g.nodes[0]).results[0]
                    rewrites += 1
                n.replace_uses({v: copies[v]})
    return rewrites
