"""CPU implementations of fused ops where torch has a faster kernel than the reference.
Each must match its `kiln.ir.kiln_ref` function (tests check)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ir import kiln_ref
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


def quant_int4(w, group_size=32, scale_dtype=torch.float32):
    """kiln.quant_int4 with torch's own packing into its CPU int4 layout (kiln_ref's is
    the same bytes in plain torch; a test keeps them equal)."""
    why = kiln_ref.int4_fits(w.shape[0], w.shape[1], group_size)
    if why is not None:
        raise ValueError(f"kiln.quant_int4: weight {tuple(w.shape)}: {why}")
    codes, scale, zero = kiln_ref.int4_codes(w, group_size)
    w_sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(scale_dtype)
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), w_sz


def weight_int4_mm(x, w_q, w_sz, bias, group_size=32):
    """kiln.weight_int4_mm through torch's int4-weight CPU GEMM, which dequantises in
    registers (SmolLM2's projections at one token on 2 cores: 4-16 us, against 7-50 us in
    fp32). Only its bf16-activation path is vectorised (fp32 or fp16 activations: ~650 us
    for a 1536 x 576 weight), and it returns bf16. Rounding x and the result to bf16 costs
    accuracy (SmolLM2, teacher-forced top-1 against fp32: 11 of 832 tokens differ, 5 of
    the test's 256, against 7 and 1), so an fp32 or fp16 x goes in as two bf16 rows, x_hi =
    bf16(x) and x_lo = bf16(x - x_hi), whose products are summed in fp32: x to 16
    significant bits. The price (SmolLM2 on 2 cores, BENCHMARKS.md): decode 71-73 tok/s
    instead of 79-85 (host time for the extra ops more than the GEMM's second row), and a
    prefill's compute-bound rows double (480 tokens: ~550 tok/s instead of ~1050; fp32
    ~740). Every row is fed the same way whatever the batch, so a token's result does not
    depend on what it is batched with."""
    if w_sz.dtype != torch.bfloat16:
        w_sz = w_sz.to(torch.bfloat16)
    hi = x.to(torch.bfloat16)
    if x.dtype == torch.bfloat16:
        y = torch._weight_int4pack_mm_for_cpu(hi, w_q, group_size, w_sz)
    else:
        m = x.shape[0]
        y = torch._weight_int4pack_mm_for_cpu(torch.cat([hi, (x - hi).to(torch.bfloat16)]), w_q,
                                              group_size, w_sz)
        y = y.view(2, m, -1).sum(0, dtype=torch.float32)
    if bias is not None:
        y = y.float() + bias.float()
    return y if y.dtype == x.dtype else y.to(x.dtype)
