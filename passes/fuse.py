"""The fusion passes: each applies the rules of one `.kiln` file (rule_pass.py), in this
order."""
from __future__ import annotations

from .rule_pass import rule_pass

FUSIONS = (   # (pass, rule file, what it does)
    ("fuse.norm", "norm", "rms_norm in every spelling, then residual add + rms_norm -> "
     "kiln.fused_add_rms_norm"),
    ("fuse.rope", "rope", "rotate-half rotary embedding -> kiln.rope, one per q and one per k"),
    ("fuse.attention", "attention", "SDPA ops and hand-written attention (GQA through "
     "repeat_kv) -> kiln.attention"),
    ("fuse.activation", "activation", "silu(gate) * up -> kiln.silu_mul"),
    ("fuse.moe", "moe", "router softmax/top-k/renormalize + grouped_mm experts -> "
     "kiln.fused_moe, one per layer"),
    ("fuse.quant", "quant", "norm + quant -> kiln.rms_norm_quant / "
     "kiln.fused_add_rms_norm_quant, silu_mul + quant -> kiln.silu_mul_quant"),
)

for _name, _file, _doc in FUSIONS:
    rule_pass(_name, _file, f"{_doc} (rules/{_file}.kiln)")
