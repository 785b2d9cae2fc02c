"""Attention kernels: `attention` with kiln_ref.attention semantics.

Two paths, picked by the launcher:

* prefill (Sq > DECODE_MAX_SQ): flash-attention style. One program per (BLOCK_M query
  rows, batch * query head); it walks the KV range in BLOCK_N tiles with an online
  softmax (running max `m`, running sum `l`, fp32 accumulator). With `causal` the tiles
  above the diagonal are never visited, and the tiles wholly below it run without any
  per-element masking; only the diagonal band and the ragged tail are masked. With a
  `window` the loop starts at the first tile the block's first row can see, the tiles
  its last row sees in full (up to the diagonal) again run unmasked, and the band at the
  window's edge is masked like the diagonal one: a block visits about
  (window + BLOCK_M) / BLOCK_N tiles however long the keys.
* decode (Sq <= DECODE_MAX_SQ): flash-decoding. The KV range is cut into partitions of
  `split` keys; one program per (partition, batch * KV head, row block) computes partial
  (m, l, acc) for *all* the query rows that read that KV head (GROUP query heads x Sq
  queries folded into the M dimension of the tile), so K and V are read once per KV head
  rather than once per query head. A second kernel combines the partitions (one program
  per output row). With a single partition the first kernel normalises and writes the
  output itself. (Letting the last partition to finish do the combining, through an
  atomic counter, saves that launch but measured slower on an H100 at batch 1: 21 vs
  19 us at 8k keys, 59 vs 52 us at 32k, as one program then combines a whole tile's
  rows serially.) With a `window` the partitions cover only the keys from the tile
  holding the first key any query sees (`window_start`, known from shapes), so neither
  the grid nor the split grows with the keys left of the window.

Shared details:
* GQA: query head h reads KV head h // GROUP; repeat_kv is never materialised.
* Any strides for q/k/v (the launcher only copies when the last dim is not contiguous).
* `mask` broadcasts to [B, Hq, Sq, Skv]: broadcast dims get stride 0, nothing is expanded
  in memory. Bool masks are read as int8 (a free view); additive masks in their own dtype.
* Causal is aligned bottom-right: query i sees key j iff j <= i + Skv - Sq. A window
  is aligned the same way: query i sees key j only if i + Skv - Sq - j < window, causal
  or not. The window is a runtime argument behind the HAS_WINDOW constexpr, so kernels
  without one compile as they did before windows existed.
* Softmax runs in base 2 (scale * log2 e folded into the QK scale), except with an
  additive mask, where it runs in base e so that a mask of finfo(float32).min (what HF
  uses) stays finite exactly as in the reference instead of overflowing when multiplied
  by log2 e.
* A row whose keys are all masked keeps m = -inf and l = 0; the exponentials are taken
  against 0 instead of -inf (no NaN) and the output is 0, as in the reference.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import make_spec
from .tiles import on_hip, variants

LOG2E = 1.4426950408889634
# Query lengths up to this take the flash-decoding path.
DECODE_MAX_SQ = 16
# Partitions of fewer keys than this are not worth the partial writes and the reduction.
DECODE_MIN_SPLIT = 512
# Most partitions per row; also bounds the reduction's work.
DECODE_MAX_SPLITS = 256
# Splits in the reduction kernel are combined in chunks of this many.
REDUCE_BLOCK_S = 32

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Prefill tiles per head dim (as data). Swept on an H100 (torch 2.11, Triton 3.6; bf16,
# causal, 8k tokens, 32 query / 8 KV heads), as a fraction of SDPA's time: d=128 128x128
# 8 warps 3 stages 0.84, 128x64 0.80, 64x64 4 warps 0.78, 128x64 4 warps 0.48; Q 32 KB +
# 3 stages x (K 32 KB + V 32 KB) = 224 KB of the 227 KB of shared memory. d=64: 128x64
# 8 warps 0.93, 4 warps 0.83, 128x128 0.77-0.84. d=256 halves the tiles to fit shared
# memory (not measured).
PREFILL_CONFIGS = {
    64: AttnConfig(128, 64, 8, 3),
    128: AttnConfig(128, 128, 8, 3),
    256: AttnConfig(64, 32, 8, 2),
}
# With a mask the kernel also stages mask tiles: d=128's 3 stages (224 KB) no longer fit the
# 227 KB (a Llama-3-8B prefill with a StaticCache mask asked for 288 KB), so it keeps 2.
PREFILL_MASKED_CONFIGS = {**PREFILL_CONFIGS, 128: AttnConfig(128, 128, 8, 2)}
# Decode tiles: M is GROUP * Sq rows (>= 16 for tl.dot, more rows when GROUP * Sq needs
# them); the kernel streams K/V. d=128 on an H100 (graph-replayed, bf16, 8 KV heads):
# 64- and 128-key tiles within 5% of each other either way across batch 1-8 and 8k-32k
# keys; 4 stages or 8 warps no better. d=64 and d=256 are not tuned.
DECODE_CONFIGS = {
    64: AttnConfig(16, 128, 4, 3),
    128: AttnConfig(16, 64, 4, 3),
    256: AttnConfig(16, 32, 4, 2),
}


# hip (tiles.py): the prefill tables above ask gfx942 for 128-160 KiB of LDS at d=128, and
# the masked decode for 68-72 KiB; these fit its 64 KiB (32-48 KiB compiled), in the shape
# ROCm's own Triton flash attention uses (128 x 64 tiles, 4 waves, one stage). Not tuned
# on an AMD GPU; d=256 has no AOT variant, so its LDS is unchecked.
HIP_PREFILL_CONFIGS = {
    64: PREFILL_CONFIGS[64],
    128: AttnConfig(128, 64, 4, 1),
    256: AttnConfig(64, 32, 4, 1),
}
HIP_DECODE_CONFIGS = {
    64: AttnConfig(16, 64, 4, 2),
    128: AttnConfig(16, 64, 4, 2),
    256: AttnConfig(16, 32, 4, 2),
}


def prefill_configs(kind: int, hip: bool | None = None) -> dict:
    """The prefill tile table for a mask kind, on hip (default: this torch's) or cuda."""
    if on_hip() if hip is None else hip:
        return HIP_PREFILL_CONFIGS
    return PREFILL_MASKED_CONFIGS if kind else PREFILL_CONFIGS


def decode_configs(hip: bool | None = None) -> dict:
    return HIP_DECODE_CONFIGS if (on_hip() if hip is None else hip) else DECODE_CONFIGS


def _config(table: dict, block_d: int) -> AttnConfig:
    for d in sorted(table):
        if block_d <= d:
            return table[d]
    raise ValueError(f"attention: head dim {block_d} is larger than the largest supported "
                     f"({max(table)})")


# --------------------------------------------------------------------------- kernels

@triton.jit
def _mma(a, b, FP32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands use full-precision (not tf32) products."""
    if FP32_DOT:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _mma_acc(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b, accumulated by the MMA itself (no separate add over the tile)."""
    if FP32_DOT:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    if USE_EXP2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _attn_tiles(acc, l_i, m_i, q, k_base, v_base, mrow_ptrs, q_idx, row_ok, offs_n, offs_d,
                stride_ks, stride_vs, stride_mn, lo, hi, SKV, diag, WINDOW, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
                MASKED: tl.constexpr, FP32_DOT: tl.constexpr):
    """Online softmax over the keys [lo, hi) in BLOCK_N steps.

    q_idx: per tile row, the query index i, at position i + diag (for the causal test
    j <= i + diag and the window test i + diag - j < WINDOW).
    MASKED: apply the key bound, the causal and the window test (the bands at the edges
    of the visible range and the tail); tiles known to be fully visible skip all three.
    The user mask applies everywhere.
    """
    USE_EXP2: tl.constexpr = MASK_KIND != 2
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            col_ok = cols < SKV
            k = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = _mma(q, k, FP32_DOT) * qk_scale
        if MASK_KIND == 1:
            mv = tl.load(mrow_ptrs + cols[None, :] * stride_mn,
                         mask=row_ok[:, None] & (cols[None, :] < SKV), other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            mv = tl.load(mrow_ptrs + cols[None, :] * stride_mn,
                         mask=row_ok[:, None] & (cols[None, :] < SKV), other=0.0)
            s = s + mv.to(tl.float32)
        if MASKED:
            keep = (cols < SKV)[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= q_idx[:, None] + diag)
            if HAS_WINDOW:
                keep = keep & (cols[None, :] > q_idx[:, None] + diag - WINDOW)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf: subtract 0 instead (no inf - inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m_i - m_use, USE_EXP2)
        p = _exp(s - m_use[:, None], USE_EXP2)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _mma_acc(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_prefill_kernel(
        Q, K, V, O, MASK,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        stride_mb, stride_mh, stride_mm, stride_mn,
        H, SQ, SKV, GROUP, WINDOW, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr):
    """O[b, h, rows] for one BLOCK_M block of query rows of one (batch, query head)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        # The last query blocks see the most keys: start them first.
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SQ
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mrow_ptrs = MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = SKV - SQ
    if CAUSAL:
        # Keys the block's last row can see, and keys every row of the block can see.
        hi = tl.minimum(SKV, (pid_m + 1) * BLOCK_M + diag)
        hi = tl.maximum(hi, 0)
        full_hi = tl.minimum(hi, tl.maximum(pid_m * BLOCK_M + diag + 1, 0))
    else:
        hi = SKV
        full_hi = SKV
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        # Tiles left of what the block's first row sees are skipped; from the first tile
        # its last row sees in full, every row sees them all (up to full_hi). The band
        # in between is masked; when the window is narrower than the span of the block's
        # rows, that band reaches full_hi and no tile runs unmasked.
        lo = (tl.maximum(pid_m * BLOCK_M + diag - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        last_row = tl.minimum((pid_m + 1) * BLOCK_M, SQ) - 1
        full_lo = tl.cdiv(tl.maximum(last_row + diag - WINDOW + 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, full_hi)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, mrow_ptrs, offs_m, row_ok,
                                    offs_n, offs_d, stride_ks, stride_vs, stride_mn, lo, full_lo,
                                    SKV, diag, WINDOW, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                                    CAUSAL, HAS_WINDOW, MASK_KIND, True, FP32_DOT)
    else:
        full_lo = 0

    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, mrow_ptrs, offs_m, row_ok,
                                offs_n, offs_d, stride_ks, stride_vs, stride_mn, full_lo, full_hi,
                                SKV, diag, WINDOW, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                HAS_WINDOW, MASK_KIND, False, FP32_DOT)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, mrow_ptrs, offs_m, row_ok,
                                offs_n, offs_d, stride_ks, stride_vs, stride_mn, full_hi, hi,
                                SKV, diag, WINDOW, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                HAS_WINDOW, MASK_KIND, True, FP32_DOT)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_decode_kernel(
        Q, K, V, O, MASK, PACC, PML,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        stride_mb, stride_mh, stride_mm, stride_mn,
        HKV, SQ, SKV, GROUP, WINDOW, qk_scale, SPLIT, NUM_SPLITS,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr, DIRECT: tl.constexpr):
    """One KV partition of one (batch, KV head) for BLOCK_M of its GROUP * SQ query rows.

    Partition s holds the keys [start + s * SPLIT, start + (s + 1) * SPLIT): start is 0,
    or with a window the tile holding the first key query 0 sees (`window_start`).
    Row r of the tile is query head hk * GROUP + r // SQ, query r % SQ. DIRECT (a single
    partition): write the normalised output to O. Otherwise write the partial results,
    PACC[row, split, :] = acc and PML[row, split, 0:2] = (m, l), row = (b*H + h)*SQ + i,
    for `_attn_reduce_kernel` to combine.
    """
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    rblock = tl.program_id(2)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV

    r = rblock * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * SQ
    h = (hk * GROUP + r // SQ).to(tl.int64)
    qi = r % SQ
    hk = hk.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mrow_ptrs = MASK + b * stride_mb + h[:, None] * stride_mh + qi[:, None] * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = split * SPLIT
    if HAS_WINDOW:
        lo += (tl.maximum(SKV - SQ - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(lo + SPLIT, SKV)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, mrow_ptrs, qi, row_ok,
                                offs_n, offs_d, stride_ks, stride_vs, stride_mn, lo, hi,
                                SKV, SKV - SQ, WINDOW, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                                CAUSAL, HAS_WINDOW, MASK_KIND, True, FP32_DOT)
    o_ptrs = O + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_os + offs_d[None, :]
    if DIRECT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        row = (b * HKV * GROUP + h) * SQ + qi
        slot = row * NUM_SPLITS + split
        tl.store(PACC + slot[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(PML + slot * 2, m_i, mask=row_ok)
        tl.store(PML + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _attn_reduce_kernel(PACC, PML, O, stride_ob, stride_oh, stride_os, H, SQ, NUM_SPLITS,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        USE_EXP2: tl.constexpr):
    """O[row] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the row's partitions
    (base e instead of 2 when the partials were computed in base e)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = row * NUM_SPLITS
    m_max = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        sp = s0 + offs_s
        m = tl.load(PML + (base + sp) * 2, mask=sp < NUM_SPLITS, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    m_all = tl.max(m_max, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_tot = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        sp = s0 + offs_s
        s_ok = sp < NUM_SPLITS
        m = tl.load(PML + (base + sp) * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(PML + (base + sp) * 2 + 1, mask=s_ok, other=0.0)
        w = _exp(m - m_use, USE_EXP2)
        l_tot += w * l
        a = tl.load(PACC + (base + sp)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                    other=0.0)
        acc += tl.sum(a * w[:, None], 0)
    l_sum = tl.sum(l_tot, 0)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    b = row // (H * SQ)
    h = (row // SQ) % H
    i = row % SQ
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_os + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# --------------------------------------------------------------------------- launchers

def _mask_args(mask, b, hq, sq, skv, device):
    """(pointer tensor, kind, 4 strides) for an optional mask broadcastable to [B,Hq,Sq,Skv]."""
    if mask is None:
        return torch.empty(1, dtype=torch.int8, device=device), MASK_NONE, (0, 0, 0, 0)
    if mask.dim() > 4:
        raise ValueError(f"attention: mask has {mask.dim()} dims; expected at most 4")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    target = (b, hq, sq, skv)
    for got, want in zip(m.shape, target):
        if got not in (1, want):
            raise ValueError(f"attention: mask shape {tuple(mask.shape)} does not broadcast "
                             f"to [B, Hq, Sq, Skv] = {list(target)}")
    strides = tuple(0 if size == 1 else st for size, st in zip(m.shape, m.stride()))
    if m.dtype == torch.bool:
        return m.view(torch.int8), MASK_BOOL, strides
    if not m.dtype.is_floating_point:
        raise ValueError(f"attention: mask dtype {m.dtype}; expected bool or floating point")
    return m, MASK_ADD, strides


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be [B, H, S, D]")
    b, hq, sq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not match [B,Hq,Sq,D], [B,Hkv,Skv,D]")
    if hq % k.shape[1] != 0:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {k.shape[1]} KV heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                               torch.float32):
        raise ValueError(f"attention: q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected "
                         "one of float16, bfloat16, float32 for all three")


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def check_window(window, op: str) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"{op}: window {window!r}; expected a positive int or None")


def window_start(skv: int, sq: int, window: int, block_n: int) -> int:
    """The first key any of `sq` queries at the last sq of `skv` positions sees under
    `window`, rounded down to a BLOCK_N tile: decode partitions start there."""
    return max(skv - sq - window + 1, 0) // block_n * block_n


def _prepare(q, k, v, mask, scale, window, out):
    _check(q, k, v)
    check_window(window, "attention")
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("attention: `out` must have q's shape and dtype and a unit last stride")
    mt, kind, mstr = _mask_args(mask, b, hq, sq, skv, q.device)
    qk_scale = float(scale) * (LOG2E if kind != MASK_ADD else 1.0)
    return q, k, v, out, mt, kind, mstr, qk_scale


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_prefill(q, k, v, mask=None, scale=None, causal=False, window=None, *, out=None,
                      config: AttnConfig | None = None):
    """Flash-attention path (any Sq). `config` overrides the tile table (tests use it)."""
    q, k, v, out, mt, kind, mstr, qk_scale = _prepare(q, k, v, mask, scale, window, out)
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    cfg = config or _config(prefill_configs(kind), block_d)
    grid = (triton.cdiv(sq, cfg.block_m), b * hq)
    _attn_prefill_kernel[grid](
        q, k, v, out, mt, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *mstr,
        hq, sq, skv, hq // k.shape[1], window or 0, qk_scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, MASK_KIND=kind,
        FP32_DOT=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a few partitions, small grids


def decode_split(b: int, hkv: int, row_blocks: int, skv: int, block_n: int, num_sms: int) -> int:
    """Keys per partition (a multiple of block_n, at least DECODE_MIN_SPLIT, at most
    DECODE_MAX_SPLITS partitions). Few (batch x KV head) tiles: about 2 programs an SM,
    the fewest partitions that keep every SM streaming. Many tiles: about 4 an SM, which
    balances the waves better. Fitted on an H100 (bf16, d=128, 8 KV heads): batch 1
    prefers 512 keys at 8k and 1024 at 32k (2x rule; 4x gives 57 vs 52 us at 32k); batch
    32 at 8k prefers 3 partitions to 2 (361 vs 388 us)."""
    programs = b * hkv * row_blocks
    per_sm = 4 if 2 * programs >= num_sms else 2
    want = max(1, -(-per_sm * num_sms // programs))
    split = max(DECODE_MIN_SPLIT, -(-skv // want))
    split = max(split, -(-skv // DECODE_MAX_SPLITS))
    return -(-split // block_n) * block_n


def attention_decode(q, k, v, mask=None, scale=None, causal=False, window=None, *, out=None,
                     config: AttnConfig | None = None, split: int | None = None):
    """Flash-decoding path (meant for small Sq). `split`: keys per partition (a multiple of
    the tile's BLOCK_N), chosen from the machine's SM count when None. With a window the
    partitions cover only the keys from `window_start` on."""
    q, k, v, out, mt, kind, mstr, qk_scale = _prepare(q, k, v, mask, scale, window, out)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return out
    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    base = config or _config(decode_configs(), block_d)
    rows = group * sq
    block_m = config.block_m if config else min(64, max(base.block_m, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_m)
    keys = skv - window_start(skv, sq, window, base.block_n) if window is not None else skv
    if split is None:
        split = decode_split(b, hkv, row_blocks, max(keys, 1), base.block_n, _num_sms(q.device))
    elif split % base.block_n:
        raise ValueError(f"attention_decode: split {split} is not a multiple of BLOCK_N "
                         f"{base.block_n}")
    num_splits = max(1, triton.cdiv(keys, split))
    direct = num_splits == 1
    if direct:
        pacc = pml = torch.empty(1, dtype=torch.float32, device=q.device)
    else:
        pacc = torch.empty(b * hq * sq * num_splits * block_d, dtype=torch.float32, device=q.device)
        pml = torch.empty(b * hq * sq * num_splits * 2, dtype=torch.float32, device=q.device)
    grid = (num_splits, b * hkv, row_blocks)
    _attn_decode_kernel[grid](
        q, k, v, out, mt, pacc, pml,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *mstr,
        hkv, sq, skv, group, window or 0, qk_scale, split, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=base.block_n,
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, MASK_KIND=kind,
        FP32_DOT=q.dtype == torch.float32, DIRECT=direct,
        num_warps=base.num_warps, num_stages=base.num_stages)
    if not direct:
        _attn_reduce_kernel[(b * hq * sq,)](
            pacc, pml, out, *_strides3(out), hq, sq, num_splits,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=REDUCE_BLOCK_S, USE_EXP2=kind != MASK_ADD,
            num_warps=4 if block_d <= 128 else 8)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, window: int | None = None, *,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """kiln_ref.attention: q [B,Hq,Sq,D], k/v [B,Hkv,Skv,D] (any strides), optional mask
    broadcastable to [B,Hq,Sq,Skv] (bool: True attends; float: added), causal aligned
    bottom-right, optional sliding `window` (query i sees key j only when
    i + Skv - Sq - j < window); returns [B,Hq,Sq,D] in q's dtype (written into `out` when
    given)."""
    if q.dim() == 4 and q.shape[2] <= DECODE_MAX_SQ:
        return attention_decode(q, k, v, mask, scale, causal, window, out=out)
    return attention_prefill(q, k, v, mask, scale, causal, window, out=out)


# --------------------------------------------------------------------------- AOT variants

_DT = {"fp16": "f16", "bf16": "bf16"}
_STRIDES = ["stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
            "stride_vb", "stride_vh", "stride_vs", "stride_ob", "stride_oh", "stride_os"]
_MASK_STRIDES = ["stride_mb", "stride_mh", "stride_mm", "stride_mn"]
# What the models need, as (causal, mask kind, window): causal prefill without a mask,
# the same with a sliding window, or a (StaticCache-style) bool mask.
_AOT_VARIANTS = ((True, MASK_NONE, False), (True, MASK_NONE, True), (False, MASK_BOOL, False))


def _variant_name(causal: bool, kind: int, window: bool) -> str:
    return "".join(suffix for suffix, on in (("_causal", causal), ("_boolmask", kind),
                                             ("_window", window)) if on)


def _attn_types(dt: str, extra: dict) -> dict:
    p = "*" + dt
    types = {"Q": p, "K": p, "V": p, "O": p, "MASK": "*i8", "WINDOW": "i32"}
    types.update({s: "i32" for s in _STRIDES + _MASK_STRIDES})
    types.update(extra)
    return types


def _prefill_specs(dt: str, d: int, causal: bool, kind: int, window: bool):
    name = f"attn_prefill_{_DT[dt]}_d{d}{_variant_name(causal, kind, window)}"
    types = _attn_types(dt, {"H": "i32", "SQ": "i32", "SKV": "i32", "GROUP": "i32",
                             "qk_scale": "fp32"})

    def make(cfg, targets, suffix):
        return make_spec(name + suffix, _attn_prefill_kernel, types,
                         {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_M": cfg.block_m,
                          "BLOCK_N": cfg.block_n, "CAUSAL": causal, "HAS_WINDOW": window,
                          "MASK_KIND": kind, "FP32_DOT": False},
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                         divisible_by_16=("Q", "K", "V", "O", *_STRIDES), targets=targets)
    return variants(make, prefill_configs(kind, hip=False)[d], prefill_configs(kind, hip=True)[d])


def _decode_specs(dt: str, d: int, causal: bool, kind: int, window: bool):
    name = f"attn_decode_{_DT[dt]}_d{d}{_variant_name(causal, kind, window)}"
    types = _attn_types(dt, {"PACC": "*fp32", "PML": "*fp32", "HKV": "i32", "SQ": "i32",
                             "SKV": "i32", "GROUP": "i32", "qk_scale": "fp32", "SPLIT": "i32",
                             "NUM_SPLITS": "i32"})

    def make(cfg, targets, suffix):
        return make_spec(name + suffix, _attn_decode_kernel, types,
                         {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_M": cfg.block_m,
                          "BLOCK_N": cfg.block_n, "CAUSAL": causal, "HAS_WINDOW": window,
                          "MASK_KIND": kind, "FP32_DOT": False, "DIRECT": False},
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                         divisible_by_16=("Q", "K", "V", "O", "PACC", "PML", *_STRIDES),
                         targets=targets)
    return variants(make, decode_configs(hip=False)[d], decode_configs(hip=True)[d])


def _reduce_spec(dt: str, d: int):
    types = {"PACC": "*fp32", "PML": "*fp32", "O": "*" + dt, "stride_ob": "i32",
             "stride_oh": "i32", "stride_os": "i32", "H": "i32", "SQ": "i32", "NUM_SPLITS": "i32"}
    return make_spec(f"attn_decode_reduce_{_DT[dt]}_d{d}", _attn_reduce_kernel, types,
                     {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_S": REDUCE_BLOCK_S, "USE_EXP2": True},
                     num_warps=4)


AOT_SPECS = (
    [s for dt in _DT for d in (64, 128) for variant in _AOT_VARIANTS
     for s in _prefill_specs(dt, d, *variant)]
    + [s for dt in _DT for d in (64, 128) for variant in _AOT_VARIANTS
       for s in _decode_specs(dt, d, *variant)]
    + [_reduce_spec(dt, d) for dt in _DT for d in (64, 128)]
)
