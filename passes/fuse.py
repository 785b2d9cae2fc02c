"""The fusion passes. Each applies the rules of one `.kiln` file (in file order, each
everywhere it matches), then drops what became dead."""
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


def _rule_pass(pass_name: str, file: str, doc: str):
    def run(g: Graph, ctx: PassContext) -> int:
        return run_rules(g, ctx, load_rules(file))
    run.__name__ = pass_name.replace(".", "_")
    register_pass(pass_name, doc)(run)
    return run


fuse_norm = _rule_pass("fuse.norm", "norm", "rms_norm in every spelling, then residual add + "
                       "rms_norm -> kiln.fused_add_rms_norm (rules/norm.kiln)")
fuse_rope = _rule_pass("fuse.rope", "rope", "rotate-half rotary embedding -> kiln.rope, one per "
                       "q and one per k (rules/rope.kiln)")
fuse_attention = _rule_pass("fuse.attention", "attention", "SDPA ops and hand-written "
                            "attention (GQA through repeat_kv) -> kiln.attention "
                            "(rules/attention.kiln)")
fuse_activation = _rule_pass("fuse.activation", "activation", "silu(gate) * up -> "
                             "kiln.silu_mul (rules/activation.kiln)")
fuse_moe = _rule_pass("fuse.moe", "moe", "router softmax/top-k/renormalize + grouped_mm "
                      "experts -> kiln.fused_moe, one per layer (rules/moe.kiln)")
fuse_quant = _rule_pass("fuse.quant", "quant", "norm + quant -> kiln.rms_norm_quant / "
                        "kiln.fused_add_rms_norm_quant, silu_mul + quant -> "
                        "kiln.silu_mul_quant (rules/quant.kiln)")

