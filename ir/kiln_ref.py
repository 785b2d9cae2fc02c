"""Reference semantics of the fused `kiln.*` operators, in plain torch.

These functions *are* the definition of each fused op: the op registry uses them as the
reference implementation, the interpreter runs them, and every kernel is tested against
them. They favour clarity over speed and compute in float32 where the models do.
"""
from __future__ import annotations

import math

import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
INT8_MAX = 127.0
# Keeps a per-token scale finite for an all-zero row.
SCALE_FLOOR = 1e-10


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in float32, cast back to x's dtype, then scale by weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + x`, then rms_norm of the sum; returns (normed, sum)."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [B, H, S, D]; cos, sin: [B, S, D] (broadcast over H)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope` of q and of k by the same cos/sin (one launch where kernels are launched)."""
    return rope(q, cos, sin), rope(k, cos, sin)


def rope_pair_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rope_pair` of q and k, with rotated k and v written into the KV cache in place:
    `k_cache[:, :, index[s]] = rope(k)[:, :, s]`, likewise v (a StaticCache's update).
    q, k, v: [B, H, S, D]; caches [B, H, L, D]; index: [S] cache rows. Returns (rotated q,
    k_cache, v_cache), the caches being the updated operands themselves."""
    q_rot, k_rot = rope_pair(q, k, cos, sin)
    k_cache.index_copy_(2, index, k_rot.to(k_cache.dtype))
    v_cache.index_copy_(2, index, v.to(v_cache.dtype))
    return q_rot, k_cache, v_cache


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def rms_norm_mm(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm(x) @ b` with x's leading dims flattened: x [..., K], b [K, N] -> [M, N]
    (a decode step's norm as the prologue of the GEMM that reads it)."""
    return rms_norm(x, weight, eps).reshape(-1, x.shape[-1]) @ b


def fused_add_rms_norm_mm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm` whose normalised value feeds `@ b`: returns ([M, N], the sum)."""
    normed, summed = fused_add_rms_norm(x, residual, weight, eps)
    return normed.reshape(-1, x.shape[-1]) @ b, summed


def silu_mul_mm(gate: torch.Tensor, up: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`silu_mul(gate, up) @ b` with leading dims flattened: [..., I], b [I, N] -> [M, N]."""
    return silu_mul(gate, up).reshape(-1, gate.shape[-1]) @ b


def mm(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`x @ b` with x's leading dims flattened: [..., K], b [K, N] -> [M, N] (fuse.prologue's
    GEMM with nothing in front to fuse; Triton targets run it on the same small-M kernel)."""
    return x.reshape(-1, x.shape[-1]) @ b


def visible_keys(sq: int, skv: int, causal: bool, window: int | None,
                 device=None) -> torch.Tensor | None:
    """[Sq, Skv] bool: which keys each query sees under `causal` and `window` (see
    `attention`); None when it sees all of them."""
    if not causal and window is None:
        return None
    keep = torch.ones(sq, skv, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(skv - sq)
    if window is not None:
        keep = keep.triu(skv - sq - window + 1)
    return keep


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, causal: bool, window: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] with Hq % Hkv == 0 (query head h reads KV
    head h // (Hq // Hkv)). `mask` broadcasts to [B, Hq, Sq, Skv]: bool (True = attend) or
    additive float. Query i sits at position p_i = i + Skv - Sq (the queries are the last
    Sq of the keys' positions). `causal`: query i attends key j only when j <= p_i (the
    diagonal aligned bottom right). `window` (sliding-window attention): only when
    p_i - j < window, i.e. the `window` most recent keys up to its own position. Softmax
    in float32; output in q's dtype.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    sq, skv = q.shape[-2], k.shape[-2]
    keep = visible_keys(sq, skv, causal, window, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    # A row with every key masked attends to nothing (zeros), not NaN.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over experts, top-k, optional renormalisation; (weights, ids)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, renormalize: bool,
              expert_start: int = 0) -> torch.Tensor:
    """Mixture of experts as transformers 5 writes it (Mixtral, Qwen3-MoE).

    x: [T, H]; router_logits: [T, E]; w_gate_up: [E', 2I, H] (gate rows first, then up);
    w_down: [E', H, I]. Each token goes to its top_k of the E experts; expert e computes
    down(silu(gate) * up); outputs are summed weighted by the routing weights.
    The weights hold experts expert_start .. expert_start + E' - 1 (all E of them by
    default): the sum then runs over those experts' contributions only, routing still
    over all E (expert parallelism: each rank holds some experts, an all_reduce adds the
    ranks' sums).
    """
    weights, ids = moe_route(router_logits, top_k, renormalize, x.dtype)
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(ids == expert_start + e)
        if token.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(x[token], w_gate_up[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(silu_mul(gate, up), w_down[e])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


def quant_fp8(x: torch.Tensor, scale: torch.Tensor | None = None,
              fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 quantisation. scale None: dynamic per token (scale [..., 1] = amax / fp8 max).
    scale given: static per tensor (a one-element float32 tensor). Returns (q, scale)."""
    fmax = FP8_MAX[fp8_dtype]
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / fmax).clamp(min=SCALE_FLOOR)
    q = (xf / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale.float()


def quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: scale [..., 1] = amax / 127, q = round(x / scale)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=SCALE_FLOOR)
    q = torch.round(xf / scale).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return q, scale


def quantize(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantisation to `qdtype` (int8 or an fp8 flavour)."""
    if qdtype == torch.int8:
        return quant_int8(x)
    return quant_fp8(x, None, qdtype)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(rms_norm(x, weight, eps), qdtype)


def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float, qdtype: torch.dtype
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q, scale, residual + x)."""
    normed, summed = fused_add_rms_norm(x, residual, weight, eps)
    q, scale = quantize(normed, qdtype)
    return q, scale, summed


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(silu_mul(gate, up), qdtype)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantised linear: (a @ b.T) * a_scale * b_scale.T (+ bias).

    a: [M, K] int8/fp8 with a_scale [M, 1]; b: [N, K] (nn.Linear layout) with b_scale
    [N, 1] per output channel or a one-element per-tensor scale. Accumulates in float32.
    """
    acc = torch.matmul(a.float(), b.float().t())
    out = acc * a_scale.float() * b_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def weight_int8_mm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only int8 linear: x @ (w_q * w_scale).T (+ bias), in x's dtype.

    x: [M, K] floating; w_q: [N, K] int8 (nn.Linear layout); w_scale: [N, 1] per output
    channel (kiln_ref.quant_int8 of the weight). Accumulates in float32."""
    out = torch.matmul(x.float(), (w_q.float() * w_scale.float().reshape(-1, 1)).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantize_weight(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantisation of an nn.Linear weight [N, K]."""
    return quantize(w, qdtype)


# Weight-only int4, grouped along K. kiln's int4 layout is the one torch's CPU int4 GEMM
# reads on an AVX-512 machine (`torch._convert_weight_to_int4pack_for_cpu`'s output for
# N % 64 == 0 there; other CPUs pack differently and the cpu target repacks for them),
# written here in plain torch so that the op is defined without that kernel:
#   w_q: uint8 [N, K / 2]; viewed as [N / 64, K, 32], byte [b, k, j] holds the code of
#        row 64 b + j in its low nibble and of row 64 b + 32 + j in its high nibble;
#   w_sz: [K / G, N, 2]: (scale, zero) of each group of G weights along K;
#   weight[n, k] = (code - 8) * scale + zero, code in 0..15.
INT4_BLOCK_N = 64
INT4_GROUP_SIZES = (32, 64, 128, 256)
# A group's values lie on a grid of L evenly spaced levels when each (w - min) / (max - min)
# * L is within this of a whole number (fp32 rounding of values a 4-bit format stored).
INT4_GRID_TOL = 1e-3
# Every grid of 1..15 steps is one of lcm(1..15) steps; fp32 positions scaled by it are
# within 0.05 of whole numbers (a random group passes with odds ~0.3^32).
_LCM_1_15 = 360360.0
_LCM_TOL = 0.15


def int4_fits(n: int, k: int, group_size: int) -> str | None:
    """None when an [n, k] weight has kiln's int4 layout with `group_size`; else why not."""
    if group_size not in INT4_GROUP_SIZES:
        return f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}"
    if not isinstance(n, int) or n % INT4_BLOCK_N:
        return f"output features {n} are not a multiple of {INT4_BLOCK_N}"
    if not isinstance(k, int) or k % group_size:
        return f"input features {k} are not a multiple of the group size {group_size}"
    return None


def int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantisation of w [N, K] per group of `group_size` along K:
    (codes uint8 [N, K] in 0..15, scale [N, K / G], zero [N, K / G]) in float32, with
    w ~= (code - 8) * scale + zero: codes count steps of scale = (max - min) / L up from the
    group's min, zero = min + 8 * scale. L is 15 (all 16 codes) unless the group's values
    lie on fewer evenly spaced levels (to fp32 rounding): then the fewest steps that hold
    them all, so that a group a 4-bit format stored (GGUF Q4_0 / Q4_1 blocks of 32: d * q +
    m, whose codes need not reach both 0 and 15) comes back exactly. Only groups whose
    positions are whole multiples of span / lcm(1..15) are searched (one pass rules out the
    groups of a checkpoint that was never 4-bit)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
    span = (hi - lo).clamp_(min=torch.finfo(torch.float32).tiny)
    levels = torch.full(lo.shape, 15.0)
    c = (g - lo).mul_(15.0 / span)                    # position in steps of span / 15
    q = c.round()
    off = (c.sub_(q).abs_() > INT4_GRID_TOL).any(-1)  # [N, K/G]: not on the 15-step grid
    del c
    if off.any():
        t = (g[off] - lo[off]) / span[off]              # [groups, G] in [0, 1]
        c = t * _LCM_1_15
        some_grid = ((c - c.round()).abs() <= _LCM_TOL).all(-1)
        if some_grid.any():
            t = t[some_grid]
            found = torch.full((t.shape[0], 1), 15.0)
            for steps in range(14, 0, -1):              # the fewest steps that hold it wins
                ts = t * steps
                fits = ((ts - ts.round()).abs() <= INT4_GRID_TOL).all(-1, keepdim=True)
                found = torch.where(fits, float(steps), found)
            where = off.nonzero()[some_grid]
            levels[where[:, 0], where[:, 1]] = found
            q[where[:, 0], where[:, 1]] = (t * found).round()
    scale = (hi - lo) / levels
    codes = q.clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return codes, scale.squeeze(-1), (lo + 8 * scale).squeeze(-1)


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (0..15) -> kiln's int4 layout, uint8 [N, K / 2]."""
    n, k = codes.shape
    v = codes.reshape(n // INT4_BLOCK_N, INT4_BLOCK_N, k).transpose(1, 2)   # [N/64, K, 64]
    half = INT4_BLOCK_N // 2
    return (v[..., :half] | (v[..., half:] << 4)).contiguous().reshape(n, k // 2)


def int4_unpack(w_q: torch.Tensor) -> torch.Tensor:
    """kiln's int4 layout uint8 [N, K / 2] -> codes uint8 [N, K]."""
    n, k = w_q.shape[0], w_q.shape[1] * 2
    v = w_q.reshape(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2)
    both = torch.cat([v & 15, v >> 4], dim=-1)                              # [N/64, K, 64]
    return both.transpose(1, 2).reshape(n, k)


def int4_dequantize(w_q: torch.Tensor, w_sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] that kiln's int4 layout and (scale, zero) stand for."""
    codes = int4_unpack(w_q).float()
    n, k = codes.shape
    scale = w_sz[..., 0].float().t().unsqueeze(-1)                           # [N, K/G, 1]
    zero = w_sz[..., 1].float().t().unsqueeze(-1)
    w = (codes.reshape(n, k // group_size, group_size) - 8) * scale + zero
    return w.reshape(n, k)


def quant_int4(w: torch.Tensor, group_size: int = 32,
               scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int4 of an nn.Linear weight [N, K], grouped along K (int4_codes): (w_q
    uint8 [N, K / 2] in kiln's int4 layout, w_sz [K / G, N, 2] (scale, zero) in
    `scale_dtype`). A group on a grid of at most 16 evenly spaced levels (a 4-bit GGUF
    block) comes back exactly in float32 scales; bfloat16 (what torch's CPU kernel reads)
    rounds scale and zero to 8 significant bits."""
    why = int4_fits(w.shape[0], w.shape[1], group_size)
    if why is not None:
        raise ValueError(f"kiln.quant_int4: weight {tuple(w.shape)}: {why}")
    codes, scale, zero = int4_codes(w, group_size)
    w_sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(scale_dtype)
    return int4_pack(codes), w_sz


def weight_int4_mm(x: torch.Tensor, w_q: torch.Tensor, w_sz: torch.Tensor,
                   bias: torch.Tensor | None, group_size: int = 32) -> torch.Tensor:
    """Weight-only int4 linear: x @ W.T (+ bias) in x's dtype, W = int4_dequantize(w_q,
    w_sz, group_size) (kiln.quant_int4's layout). Accumulates in float32."""
    out = torch.matmul(x.float(), int4_dequantize(w_q, w_sz, group_size).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# Weight-only int8, grouped along K, asymmetric: each group's values from its min to its max
# in 255 even steps, or in fewer where they all lie on a grid of fewer (to fp32 rounding),
# so a group a 4- or 8-bit format stored comes back exactly: GGUF Q4_1 (d * q + m, q in
# 0..15), Q4_0 and Q8_0 (d * q, q in -8..7 / -127..127) with any codes in use.
# The layout puts the codes of a block of 64 output rows side by side at each input
# position, so a CPU GEMV's vector lanes run along output rows (as kiln's int4 layout):
#   w_q: int8 [N / 64, K, 64], w_q[b, k, j] the code of weight[64 b + j, k];
#   w_sz: float32 [K / G, 2, N]: each group's scale (row 0) and zero (row 1);
#   weight[n, k] = code * scale + zero, code in -128..127.
INT8_BLOCK_N = 64
INT8_GROUP_SIZES = INT4_GROUP_SIZES
INT8_LEVELS = 255          # steps between a group's min and max


def int8_grouped_fits(n: int, k: int, group_size: int) -> str | None:
    """None when an [n, k] weight has kiln's grouped int8 layout with `group_size`; else why not."""
    if group_size not in INT8_GROUP_SIZES:
        return f"group_size must be one of {', '.join(map(str, INT8_GROUP_SIZES))}, got {group_size!r}"
    if not isinstance(n, int) or n % INT8_BLOCK_N:
        return f"output features {n} are not a multiple of {INT8_BLOCK_N}"
    if not isinstance(k, int) or k % group_size:
        return f"input features {k} are not a multiple of the group size {group_size}"
    return None


# Symmetric 4- and 8-bit formats store d * q with d = amax / a: GGUF Q8_0 (q in -127..127)
# and Q4_0 (q in -8..7, amax at -8). Their groups need not reach both ends of their codes,
# so their grid is found from amax; a grid of a divisor of 255 steps (Q4_1's 15) is exact in
# 255 steps already.
_AMAX_DIVISORS = (127, 8)
_QUANT_CHUNK = 1 << 18        # weights quantised at a time (1 MiB of float32)


def _on_grid(g: torch.Tensor, lo: torch.Tensor, steps: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    pos = (g - lo) * (steps / span.clamp(min=torch.finfo(torch.float32).tiny))
    return ((pos - pos.round()).abs() <= INT4_GRID_TOL).all(-1, keepdim=True)


def _grid_steps(g: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """[..., 1]: the steps from min to max of each group of g [..., G]: INT8_LEVELS, or
    the fewer steps of a symmetric format's grid (amax / a) that all its values lie on (to
    fp32 rounding) where they are not on INT8_LEVELS' already. The candidates are checked
    on those groups alone, so a checkpoint that was 4- or 8-bit costs one pass."""
    steps = torch.full_like(span, float(INT8_LEVELS))
    off = ~_on_grid(g, lo, steps, span).squeeze(-1)
    if not off.any():
        return steps
    sub, sub_lo, sub_span = g[off], lo[off], span[off]
    amax = sub.abs().amax(-1, keepdim=True)
    found = torch.full_like(sub_span, float(INT8_LEVELS))
    open_ = torch.ones_like(sub_span, dtype=torch.bool)
    for a in _AMAX_DIVISORS:
        cand = (sub_span * a / amax.clamp(min=torch.finfo(torch.float32).tiny)).round()
        try_ = open_ & (cand >= 1) & (cand <= INT8_LEVELS)
        if not try_.any():
            continue
        rows = try_.squeeze(-1)
        fits = torch.zeros_like(try_)
        fits[rows] = _on_grid(sub[rows], sub_lo[rows], cand[rows], sub_span[rows])
        found = torch.where(fits, cand, found)
        open_ &= ~fits
    steps[off] = found
    return steps


def quant_int8_grouped(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 of an nn.Linear weight [N, K], asymmetric per group of `group_size`
    along K: (w_q int8 [N / 64, K, 64], w_sz float32 [K / G, 2, N]) in kiln's grouped int8
    layout (above). scale = (max - min) / steps (255, or the fewer steps of a grid the
    group's values lie on), zero = min + 128 * scale."""
    n, k = w.shape
    why = int8_grouped_fits(n, k, group_size)
    if why is not None:
        raise ValueError(f"kiln.quant_int8_grouped: weight {tuple(w.shape)}: {why}")
    w_q = torch.empty(n // INT8_BLOCK_N, k, INT8_BLOCK_N, dtype=torch.int8, device=w.device)
    w_sz = torch.empty(k // group_size, 2, n, dtype=torch.float32, device=w.device)
    # A block of rows at a time: the grid checks' temporaries stay in cache (an LM head
    # at once took ~4x as long).
    rows = INT8_BLOCK_N * max(1, _QUANT_CHUNK // (INT8_BLOCK_N * k))
    for r in range(0, n, rows):
        g = w[r:r + rows].float().reshape(-1, k // group_size, group_size)
        lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
        span = hi - lo
        scale = (span / _grid_steps(g, lo, span)).clamp_(min=SCALE_FLOOR)
        codes = torch.round((g - lo) / scale).clamp_(0, INT8_LEVELS).sub_(128).to(torch.int8)
        w_q[r // INT8_BLOCK_N:(r + rows) // INT8_BLOCK_N] = (
            codes.reshape(-1, INT8_BLOCK_N, k).transpose(1, 2))
        w_sz[:, 0, r:r + rows] = scale.squeeze(-1).t()
        w_sz[:, 1, r:r + rows] = (lo + 128 * scale).squeeze(-1).t()
    return w_q, w_sz


def int8_grouped_dequantize(w_q: torch.Tensor, w_sz: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that kiln's grouped int8 layout and (scale, zero) stand for."""
    blocks, k, width = w_q.shape
    n, groups = blocks * width, w_sz.shape[0]
    codes = w_q.transpose(1, 2).reshape(n, groups, k // groups).float()
    scale = w_sz[:, 0].float().t().unsqueeze(-1)                             # [N, K/G, 1]
    zero = w_sz[:, 1].float().t().unsqueeze(-1)
    return (codes * scale + zero).reshape(n, k)


def weight_int8_grouped_mm(x: torch.Tensor, w_q: torch.Tensor, w_sz: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only grouped int8 linear: x @ W.T (+ bias) in x's dtype, W =
    int8_grouped_dequantize(w_q, w_sz) (kiln.quant_int8_grouped's layout; the group size is
    K / w_sz.shape[0]). Accumulates in float32."""
    out = torch.matmul(x.float(), int8_grouped_dequantize(w_q, w_sz).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def refine_top_logits(logits: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                      bias: torch.Tensor | None, k: int = 16) -> torch.Tensor:
    """logits [M, V] (an approximation of x @ w.T + bias, e.g. through quantised weights)
    with each row's k largest entries recomputed from x [M, K] and the full-precision w
    [V, K] in float32: the greedy token and the top of the distribution are the
    unquantised model's whenever its best token is among the approximation's k best."""
    idx = logits.float().topk(min(k, logits.shape[-1]), dim=-1).indices     # [M, k]
    rows = w[idx].float()                                                   # [M, k, K]
    exact = torch.matmul(rows, x.float().unsqueeze(-1)).squeeze(-1)         # [M, k]
    if bias is not None:
        exact = exact + bias.float()[idx]
    return logits.scatter(-1, idx, exact.to(logits.dtype))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start: torch.Tensor,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """Attention of a flattened batch of sequences over a paged KV cache (writes the cache).

    q: [T, Hq, D]; k, v: [T, Hkv, D]: the new tokens of N sequences laid end to end,
    sequence i owning rows query_start[i] : query_start[i+1] (query_start: [N+1] int32).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D]. First, token t's k/v are written in
    place at slot slot_mapping[t] (block slot // block_size, offset slot % block_size).
    Then sequence i, whose context after this step is its first context_lens[i] tokens
    (block b of it in block block_tables[i, b]), attends: its n new tokens are the last n of
    the context, and each attends every context token up to its own position (causal,
    bottom-right aligned), with query head h reading KV head h // (Hq // Hkv); with a
    `window`, only the `window` most recent of those (`attention`'s window). Softmax in
    float32; output [T, Hq, D] in q's dtype; rows no sequence owns are zero.
    """
    num_blocks, block_size, hkv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    out = torch.zeros_like(q)
    starts = query_start.tolist()
    for i, length in enumerate(context_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        blocks = block_tables[i, : -(-length // block_size)].long()
        keys = k_cache[blocks].reshape(-1, hkv, d)[:length]
        values = v_cache[blocks].reshape(-1, hkv, d)[:length]
        # [n, H, D] -> [1, H, n, D]: one sequence as a batch of one for `attention`.
        o = attention(q[lo:hi].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                      values.transpose(0, 1)[None], None, scale, True, window)
        out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)
    return out


def store_slots(pool: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Writes token t's row of x ([T, ...]) into the paged pool ([num_blocks, block_size, ...],
    holding as many elements a slot as x a row) at slot slot_mapping[t], in place, as
    paged_attention writes K/V: a per-token state kept beside the KV cache (the final hidden
    states a multi-token-prediction drafter reads). Returns the pool."""
    pool.view(pool.shape[0] * pool.shape[1], -1).index_copy_(
        0, slot_mapping, x.reshape(x.shape[0], -1).to(pool.dtype))
    return pool


def load_slots(pool: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The rows `store_slots` wrote at the slots slot_mapping ([T]): [T, elements a slot]."""
    return pool.reshape(pool.shape[0] * pool.shape[1], -1).index_select(0, slot_mapping)


# ---- collectives: the default torch.distributed process group of `world_size` ranks ----

def process_group(world_size: int):
    """The default process group, which must have `world_size` ranks."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"a kiln collective over {world_size} ranks runs, but no torch.distributed process "
            f"group is initialised in this process: call torch.distributed.init_process_group("
            f"backend='nccl' (GPUs) or 'gloo' (CPU), world_size={world_size}, rank=...) in every "
            f"rank before running a graph compiled with tensor_parallel_size={world_size}, or "
            f"start the ranks with torchrun")
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"a kiln collective over {world_size} ranks runs in a process group of "
            f"{dist.get_world_size()}: compile with tensor_parallel_size="
            f"{dist.get_world_size()}, or start {world_size} ranks")
    return dist.group.WORLD


def all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of `x` over the ranks (torch.distributed's functional all_reduce on the
    default group); `x` itself with one rank."""
    if world_size == 1:
        return x
    from torch.distributed import _functional_collectives as fc
    return fc.wait_tensor(fc.all_reduce(x, "sum", process_group(world_size)))


def all_gather(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim` in rank order; `x` itself with one rank."""
    if world_size == 1:
        return x
    from torch.distributed import _functional_collectives as fc
    return fc.wait_tensor(fc.all_gather_tensor(x.contiguous(), dim % x.dim(),
                                               process_group(world_size)))


def reduce_scatter(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """The sum of `x` over the ranks, split along `dim` into world_size equal chunks:
    rank r gets chunk r; `x` itself with one rank."""
    if world_size == 1:
        return x
    from torch.distributed import _functional_collectives as fc
    return fc.wait_tensor(fc.reduce_scatter_tensor(x.contiguous(), "sum", dim % x.dim(),
                                                   process_group(world_size)))


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm` of the ranks' sum of `x`: (rms_norm(residual + sum), residual
    + sum). A row-parallel linear's partial output, the residual add and the next norm."""
    return fused_add_rms_norm(all_reduce(x, world_size), residual, weight, eps)
