"""CPU implementations of fused ops where torch has a faster kernel than the reference.
Each must match its `kiln.ir.kiln_ref` function (tests check)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, k, v, mask, scale, causal):
    """kiln.attention via torch's fused SDPA (GQA without materialising repeat_kv)."""
    sq, skv = q.shape[-2], k.shape[-2]
    if causal and (sq != skv or mask is not None):
        # SDPA's is_causal is top-left aligned and excludes a mask: fold it into the mask.
        keep = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if mask is not None:
        # SDPA yields NaN for rows with every key masked; kiln's semantics give zeros.
        out = torch.nan_to_num(out, nan=0.0)
    return out
