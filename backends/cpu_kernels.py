"""CPU implementations of fused ops where torch has a faster kernel than the reference.
Each must match its `kiln.ir.kiln_ref` function (tests check)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ir.kiln_ref import visible_keys


def attention(q, k, v, mask, scale, causal, window=None):
    """kiln.attention via torch's fused SDPA (GQA without materialising repeat_kv)."""
    sq, skv = q.shape[-2], k.shape[-2]
    if window is not None or (causal and (sq != skv or mask is not None)):
        # SDPA's is_causal is top-left aligned, excludes a mask and knows no window: fold
        # them into the mask.
        keep = visible_keys(sq, skv, causal, window, q.device)
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
