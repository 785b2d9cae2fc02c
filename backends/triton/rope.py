"""Rotary position embedding, rotate-half form: `rope(x, cos, sin)` (kiln_ref.rope).

x is [B, H, S, D] with any strides over B, H, S (typically the transpose of a [B, S, H, D]
projection) and a unit stride over D; cos and sin are [B or 1, S, D]. The output is a
new contiguous [B, H, S, D]. One program handles one token (b, s) for a block of heads,
so cos/sin are read once per token and shared by the heads. `rope_pair` rotates q and k
in one launch (fuse.rope_pair); `rope_pair_store` also writes rotated k and v into their
KV-cache rows (fuse.rope_store), so a decode layer's RoPE and cache update are one launch
instead of three. Products and the sum are
rounded where torch rounds them (the promoted dtype of x and cos/sin).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import make_spec
from .norm import SHORT

TILE = 4096  # elements per program: heads per program = TILE // head_dim


@triton.jit
def _rope_heads(X, C, Sn, y_row, syh, b, s, heads, H, sxb, sxh, sxs, scb, scs, ssb, sss,
                HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates token (b, s) of the given heads of X into the row at `y_row` (head h at
    y_row + h * syh): the token's row of a contiguous output, or a KV-cache row."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    mask = (heads < H)[:, None] & d_mask[None, :]
    x_ptr = X + b * sxb + s * sxs + heads.to(tl.int64)[:, None] * sxh + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    c_ptr = C + b * scb + s * scs + d
    s_ptr = Sn + b * ssb + s * sss + d
    c1 = tl.load(c_ptr, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_ptr, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_ptr + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    ODT: tl.constexpr = y_row.dtype.element_ty
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    y1 = (x1 * c1).to(ODT).to(tl.float32) + (-x2 * s1).to(ODT).to(tl.float32)
    y2 = (x2 * c2).to(ODT).to(tl.float32) + (x1 * s2).to(ODT).to(tl.float32)
    y_ptr = y_row + heads.to(tl.int64)[:, None] * syh + d[None, :]
    tl.store(y_ptr, y1, mask=mask)
    tl.store(y_ptr + HALF, y2, mask=mask)


@triton.jit
def _rope_kernel(X, C, Sn, Y, H, S, sxb, sxh, sxs, scb, scs, ssb, sss,
                 HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _rope_heads(X, C, Sn, Y + (b * H * S + s) * HEAD_DIM, S * HEAD_DIM, b, s, heads, H,
                sxb, sxh, sxs, scb, scs, ssb, sss, HEAD_DIM, BLOCK_HALF)


@triton.jit
def _rope_pair_kernel(Q, K, C, Sn, YQ, YK, HQ, HK, S, sqb, sqh, sqs, skb, skh, sks,
                      scb, scs, ssb, sss, Q_BLOCKS,
                      HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """q's head blocks are programs [0, Q_BLOCKS) of axis 1, k's the rest: one launch."""
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    blk = tl.program_id(1)
    if blk < Q_BLOCKS:
        heads = blk * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(Q, C, Sn, YQ + (b * HQ * S + s) * HEAD_DIM, S * HEAD_DIM, b, s, heads, HQ,
                    sqb, sqh, sqs, scb, scs, ssb, sss, HEAD_DIM, BLOCK_HALF)
    else:
        heads = (blk - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(K, C, Sn, YK + (b * HK * S + s) * HEAD_DIM, S * HEAD_DIM, b, s, heads, HK,
                    skb, skh, sks, scb, scs, ssb, sss, HEAD_DIM, BLOCK_HALF)


@triton.jit
def _rope_pair_store_kernel(Q, K, V, C, Sn, YQ, KC, VC, IDX, HQ, HK, S,
                            sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                            scb, scs, ssb, sss, skcb, skch, skcs, svcb, svch, svcs,
                            Q_BLOCKS, K_BLOCKS,
                            HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    """`_rope_pair_kernel` whose k programs write the rotated heads into KV-cache row
    IDX[s], followed by programs copying v's heads into theirs: one launch for the
    rotation and both cache writes of a layer."""
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    row = tl.load(IDX + s).to(tl.int64)
    blk = tl.program_id(1)
    if blk < Q_BLOCKS:
        heads = blk * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(Q, C, Sn, YQ + (b * HQ * S + s) * HEAD_DIM, S * HEAD_DIM, b, s, heads, HQ,
                    sqb, sqh, sqs, scb, scs, ssb, sss, HEAD_DIM, BLOCK_HALF)
    elif blk < Q_BLOCKS + K_BLOCKS:
        heads = (blk - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(K, C, Sn, KC + b * skcb + row * skcs, skch, b, s, heads, HK,
                    skb, skh, sks, scb, scs, ssb, sss, HEAD_DIM, BLOCK_HALF)
    else:
        heads = (blk - Q_BLOCKS - K_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, 2 * BLOCK_HALF)
        mask = (heads < HK)[:, None] & (d < HEAD_DIM)[None, :]
        h64 = heads.to(tl.int64)[:, None]
        v = tl.load(V + b * svb + s * svs + h64 * svh + d[None, :], mask=mask)
        tl.store(VC + b * svcb + row * svcs + h64 * svch + d[None, :],
                 v.to(VC.dtype.element_ty), mask=mask)


def _config(heads: int, head_dim: int) -> tuple[int, int, int]:
    block_half = triton.next_power_of_2(max(head_dim // 2, 1))
    block_h = min(triton.next_power_of_2(heads), max(1, TILE // (2 * block_half)))
    warps = 4 if block_h * block_half * 2 <= 2048 else 8
    return block_half, block_h, warps


def _prepare(x, cos, sin, name="x"):
    """(x with a unit last stride, cos and sin expanded to [B, S, D], the new output)."""
    if x.dim() != 4:
        raise ValueError(f"rope: {name} must be [B, H, S, D], got shape {tuple(x.shape)}")
    B, H, S, D = x.shape
    if D % 2:
        raise ValueError(f"rope: head dim {D} must be even")
    for what, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (S, D):
            raise ValueError(f"rope: {what} must be [B or 1, S, D] = [{B}, {S}, {D}], "
                             f"got {tuple(t.shape)}")
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    y = torch.empty((B, H, S, D), dtype=out_dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = (cos if cos.stride(-1) == 1 else cos.contiguous()).expand(B, S, D)
    sin = (sin if sin.stride(-1) == 1 else sin.contiguous()).expand(B, S, D)
    return x, cos, sin, y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kiln_ref.rope: x [B, H, S, D] (strided views allowed), cos/sin [B or 1, S, D]."""
    x, cos, sin, y = _prepare(x, cos, sin)
    if y.numel() == 0:
        return y
    B, H, S, D = x.shape
    block_half, block_h, warps = _config(H, D)
    grid = (B * S, triton.cdiv(H, block_h))
    _rope_kernel[grid](x, cos, sin, y, H, S, x.stride(0), x.stride(1), x.stride(2),
                       cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
                       HEAD_DIM=D, BLOCK_HALF=block_half, BLOCK_H=block_h, num_warps=warps)
    return y


def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln_ref.rope_pair: q and k rotated by the same cos/sin in one launch (a decode step
    is bound by launches, not by these few bytes)."""
    q, cos, sin, yq = _prepare(q, cos, sin, "q")
    k, _, _, yk = _prepare(k, cos, sin, "k")
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (S, D):
        raise ValueError(f"rope_pair: q {tuple(q.shape)} and k {tuple(k.shape)} must share "
                         f"batch, length and head dim")
    if yq.numel() == 0:
        return yq, yk
    block_half, block_h, warps = _config(max(HQ, HK), D)
    q_blocks = triton.cdiv(HQ, block_h)
    grid = (B * S, q_blocks + triton.cdiv(HK, block_h))
    _rope_pair_kernel[grid](q, k, cos, sin, yq, yk, HQ, HK, S, q.stride(0), q.stride(1),
                            q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
                            q_blocks, HEAD_DIM=D, BLOCK_HALF=block_half, BLOCK_H=block_h,
                            num_warps=warps)
    return yq, yk


def rope_pair_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kiln_ref.rope_pair_store: q rotated into a new tensor, k rotated and v copied into
    cache rows `index` in place, one launch (fuse.rope_store)."""
    q, cos, sin, yq = _prepare(q, cos, sin, "q")
    k, _, _, _ = _prepare(k, cos, sin, "k")
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (S, D) or v.shape != k.shape:
        raise ValueError(f"rope_pair_store: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} must share batch, length and head dim, k and v "
                         f"their heads")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[:2] != (B, HK) or c.shape[3] != D:
            raise ValueError(f"rope_pair_store: {name} must be [B, H, L, D] = [{B}, {HK}, L, "
                             f"{D}], got {tuple(c.shape)}")
        if c.stride(-1) != 1:
            raise ValueError(f"rope_pair_store: {name} needs a unit stride over the head dim, "
                             f"got strides {c.stride()}")
    if index.shape != (S,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope_pair_store: index must be [{S}] int32/int64 cache rows, got "
                         f"{tuple(index.shape)} {index.dtype}")
    if k_cache.dtype != yq.dtype:
        raise ValueError(f"rope_pair_store: k_cache is {k_cache.dtype} but rotated k is "
                         f"{yq.dtype}; store it through a cast, not this op")
    if yq.numel() == 0:
        return yq, k_cache, v_cache
    if v.stride(-1) != 1:
        v = v.contiguous()
    index = index if index.is_contiguous() else index.contiguous()
    block_half, block_h, warps = _config(max(HQ, HK), D)
    q_blocks, k_blocks = triton.cdiv(HQ, block_h), triton.cdiv(HK, block_h)
    grid = (B * S, q_blocks + 2 * k_blocks)
    _rope_pair_store_kernel[grid](
        q, k, v, cos, sin, yq, k_cache, v_cache, index, HQ, HK, S,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
        sin.stride(0), sin.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), q_blocks, k_blocks,
        HEAD_DIM=D, BLOCK_HALF=block_half, BLOCK_H=block_h, num_warps=warps)
    return yq, k_cache, v_cache


# --------------------------------------------------------------------------- AOT variants

AOT_SHAPES = ((32, 128), (8, 128))  # (heads, head_dim): Llama-3-8B q and kv heads


def _spec(dt: str, heads: int, head_dim: int):
    block_half, block_h, warps = _config(heads, head_dim)
    p = "*" + dt
    strides = ("sxb", "sxh", "sxs", "scb", "scs", "ssb", "sss")
    return make_spec(f"rope_{SHORT[dt]}_h{heads}_d{head_dim}", _rope_kernel,
                     {"X": p, "C": p, "Sn": p, "Y": p, "H": "i32", "S": "i32",
                      **{k: "i32" for k in strides}},
                     {"HEAD_DIM": head_dim, "BLOCK_HALF": block_half, "BLOCK_H": block_h},
                     num_warps=warps, divisible_by_16=("X", "C", "Sn", "Y") + strides)


def _pair_spec(dt: str, q_heads: int, k_heads: int, head_dim: int):
    block_half, block_h, warps = _config(max(q_heads, k_heads), head_dim)
    p = "*" + dt
    strides = ("sqb", "sqh", "sqs", "skb", "skh", "sks", "scb", "scs", "ssb", "sss")
    return make_spec(f"rope_pair_{SHORT[dt]}_h{q_heads}_{k_heads}_d{head_dim}", _rope_pair_kernel,
                     {"Q": p, "K": p, "C": p, "Sn": p, "YQ": p, "YK": p, "HQ": "i32",
                      "HK": "i32", "S": "i32", "Q_BLOCKS": "i32", **{k: "i32" for k in strides}},
                     {"HEAD_DIM": head_dim, "BLOCK_HALF": block_half, "BLOCK_H": block_h},
                     num_warps=warps, divisible_by_16=("Q", "K", "C", "Sn", "YQ", "YK") + strides)


def _store_spec(dt: str, q_heads: int, k_heads: int, head_dim: int):
    block_half, block_h, warps = _config(max(q_heads, k_heads), head_dim)
    p = "*" + dt
    strides = ("sqb", "sqh", "sqs", "skb", "skh", "sks", "svb", "svh", "svs", "scb", "scs",
               "ssb", "sss", "skcb", "skch", "skcs", "svcb", "svch", "svcs")
    return make_spec(f"rope_pair_store_{SHORT[dt]}_h{q_heads}_{k_heads}_d{head_dim}",
                     _rope_pair_store_kernel,
                     {"Q": p, "K": p, "V": p, "C": p, "Sn": p, "YQ": p, "KC": p, "VC": p,
                      "IDX": "*i64", "HQ": "i32", "HK": "i32", "S": "i32",
                      **{k: "i32" for k in strides}, "Q_BLOCKS": "i32", "K_BLOCKS": "i32"},
                     {"HEAD_DIM": head_dim, "BLOCK_HALF": block_half, "BLOCK_H": block_h},
                     num_warps=warps,
                     divisible_by_16=("Q", "K", "V", "C", "Sn", "YQ", "KC", "VC", "IDX") + strides)


AOT_SPECS = ([_spec(dt, h, d) for dt in ("fp16", "bf16") for h, d in AOT_SHAPES]
             + [_pair_spec(dt, 32, 8, 128) for dt in ("fp16", "bf16")]
             + [_store_spec(dt, 32, 8, 128) for dt in ("fp16", "bf16")])
