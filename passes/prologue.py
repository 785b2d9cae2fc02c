"""fuse.prologue: a norm or SiLU·mul computed in the prologue of the GEMM that reads it
(rules/prologue.kiln), on Triton targets; a decode-sized GEMM without one runs on the same
kernel (kiln.mm).

It runs after serve.kv_cache, which finds a serving capture's LM head by its GEMM and puts
the selection of each sequence's last token in front of it; the decode layers' GEMMs of a
flat serving batch then get their prologues like those of kiln.generate's decode steps.
"""
from __future__ import annotations

from kiln.ir import Graph

from .manager import PassContext, register_pass
from .rule_pass import run_rules
from .rules import load_rules


@register_pass("fuse.prologue", "rms_norm / residual add + rms_norm / silu_mul feeding a "
               "GEMM of at most 64 tokens (or a token count known at run time) -> one "
               "kiln.*_mm op, one launch for decode sizes; such a GEMM with nothing to fuse -> "
               "kiln.mm, the same kernel (Triton targets; rules/prologue.kiln)")
def fuse_prologue(g: Graph, ctx: PassContext) -> int:
    target = ctx.options.get("target")
    if target is None or target.triton_backend is None:
        return 0
    return run_rules(g, ctx, load_rules("prologue"))
