"""The tensor-parallel passes that run after fusion (both do nothing with one rank):

- `shard.experts`: expert parallelism on the `kiln.fused_moe` ops fuse.moe made
  (passes/shard.py says why the experts are split there and not before);
- `fuse.collective`: an all_reduce whose sum feeds a residual add and an RMSNorm ->
  `kiln.all_reduce_add_rms_norm` (rules/collective.kiln), after shard.experts so the
  experts' all_reduce fuses too. Switch it off by name (KILN_DISABLE_PASSES=fuse.collective)
  to measure what it buys.
"""
from __future__ import annotations

from .manager import register_pass
from .rule_pass import rule_pass
from .shard import shard_experts

register_pass("shard.experts", "with tensor_parallel_size N > 1: each kiln.fused_moe keeps E / N "
              "experts (routing over all E), kiln.all_reduce of the ranks' sums")(shard_experts)
rule_pass("fuse.collective", "collective", "kiln.all_reduce + residual add + rms_norm -> "
          "kiln.all_reduce_add_rms_norm (rules/collective.kiln)")
