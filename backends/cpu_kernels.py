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


def weight_int8_mm(x, w_q, w_scale, bias):
    """kiln.weight_int8_mm through torch's int8-weight CPU GEMM, which dequantises in
    registers: it reads a quarter of fp32's weight bytes, and decode on a CPU is bound by
    them. Its bf16-activation path is the vectorised one (SmolLM2's projections at one token
    on 2 cores: 6-26 us against 100-530 us with fp32 activations, 16-86 us for fp32 weights),
    so x goes in as bf16; the products accumulate in fp32."""
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), w_q, w_scale.reshape(-1).to(torch.bfloat16))
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype)
