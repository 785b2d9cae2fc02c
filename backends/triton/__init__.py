"""Triton kernels for kiln fused ops (targets cuda and hip): the `triton` extra."""
from kiln.extras import require

require("triton", "lowering to Triton kernels (targets cuda and hip)")
