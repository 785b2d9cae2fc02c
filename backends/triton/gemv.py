"""Small-M matmul with a fused prologue: `rms_norm_mm`, `fused_add_rms_norm_mm`, `silu_mul_mm`,
and `mm`, the same kernel with no prologue.

y = prologue(x) @ b for M <= MAX_M rows (LLM decode: 1-16 tokens), where the prologue is
kiln_ref.rms_norm, kiln_ref.fused_add_rms_norm (which also returns h = residual + x) or
kiln_ref.silu_mul, so that a norm or an activation and the projection after it are one
launch instead of two. `mm` (attention's output projection, which has nothing in front
to fuse) is one launch where cuBLAS takes two at these sizes (split-K, then its reduce). In a decode step replayed from a CUDA graph every launch costs
~2.5 us on an H200, more than a small model's matmuls take, so each fusion is a launch
saved; large weights (Llama-3-8B) must still stream at close to copy bandwidth.

Layout: x (or gate and up) is [..., K] with a unit last stride and any row stride (gate and
up may be the two column halves of one [M, 2I] tensor); b is [K, N] with any strides,
usually `W.permute(1, 0)` of an nn.Linear weight W [N, K] (stride (1, K)). The tl.dot
path has one program per BLOCK_N output columns, which handles all M rows (M <= BLOCK_M),
so the weight is read exactly once whatever M is; the FMA path has one program per
(BLOCK_N columns, row), the rows of a column block adjacent, so a row is computed by the
same code whatever M is (batch invariance) and the block's weight tile comes from L2 after
the first row. Each program loops over K in BLOCK_K chunks. An rms_norm prologue first makes a pass over its rows of x to get each row's sum
of squares (a row is at most 16384 elements in the models kiln targets and comes from L2:
cheap next to the weight), then normalises each x chunk on the fly in the main loop. The fused-add variant recomputes
h = residual + x in both passes rather than reading back the stored h, and only the
program with pid_n == 0 stores h. y is a new contiguous [M, N]; h has x's shape. K is a
compile-time constant (one compile per hidden size, as in norm.py); M and N are not.

Why these choices:
- M = 1 (BLOCK_M = 1) multiplies on the CUDA cores: a [BLOCK_N, BLOCK_K] fp32 accumulator
  takes weight tile * x chunk each iteration and is reduced over K once at the end (no
  cross-thread reduction in the loop), as torch.compile's GEMV reductions do. The weight
  tile is loaded in its own layout, K-contiguous for a permuted nn.Linear weight (Triton
  specialises a stride of 1, so the loads vectorise); the loop is a
  `tl.range(num_stages=...)`, which makes Triton software-pipeline these plain loads too
  (sm_90 PTX of the 16 x 512 config: 16-byte cp.async into 36 KB of shared memory, 116
  registers, no spills). A contiguous [K, N] b works on either path but is not the fast
  layout at M = 1 (its tile is N-contiguous, 16 columns: short rows, not pipelined).
- M > 1 uses tl.dot with BLOCK_M = 16/32/64 (the MMA's smallest tiles): rows past M are
  masked and cost only tensor-core time, which a memory-bound kernel has to spare.
- BLOCK_N is small (8-16) so that there are a few programs per SM (132 on an H100/H200)
  even at N = 576 or 4096; there is no split-K: it would need a zero-filled workspace,
  i.e. another launch, which is what this module exists to remove.
- Rounding follows the unfused ops exactly, so fused and unfused graphs agree to the
  dtype's last bit almost everywhere: the prologue is computed with the unfused kernels'
  own helpers (norm._inv_rms / _apply_weight: normalise in fp32, round to x's dtype, times
  the weight rounded to x's dtype; activation._silu_mul: silu rounded to the dtype, the
  product rounded), and that dtype-rounded value is what enters the dot product, which
  accumulates in fp32 like torch.mm. fp32 dots use input_precision="ieee" (no tf32).

Configs: GEMV_CONFIGS, keyed by (M, N, K); every launcher takes `config=` to override it
(tests and bench/gemv.py's sweep use that). Above FUSED_MAX_M rows (1: the tl.dot path
measured slower than the unfused pair) the launchers run the unfused pair, kiln's norm or
activation kernel then torch.mm, so each implements its kiln op for any M. Under
`batch_invariant()` (backends/batch_invariance.py) every M up to MAX_M takes the one-row
config, a program per row, so each row is rounded exactly as in a one-row batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.backends import batch_invariance

from . import activation, norm
from .activation import _silu_mul
from .aot import make_spec
from .norm import SHORT, _apply_weight, _inv_rms, _load_sum, as_rows

MAX_M = 64  # the largest M the kernels take; callers fall back to the unfused ops above it
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# PROLOGUE values (constexprs of _gemv_kernel)
RMS = tl.constexpr(0)       # rms_norm(x) @ b
ADD_RMS = tl.constexpr(1)   # h = residual + x; rms_norm(h) @ b
SILU = tl.constexpr(2)      # silu_mul(gate, up) @ b
NONE = tl.constexpr(3)      # x @ b


@dataclass(frozen=True)
class GemvConfig:
    block_m: int     # 1: CUDA-core FMA path; 16/32/64: tl.dot path
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int  # software-pipelining depth of the main loop

    @property
    def use_dot(self) -> bool:
        return self.block_m > 1


# (largest M, largest N, largest K, config); the first row that fits wins, None = any.
# M = 1 rows from `bench/gemv.py --sweep` on an H200 (bench/results/h200-2026-11-30b):
# - K <= 2048 with N <= 4096, or K <= 1024 (SmolLM2's projections and LM head, Llama-3.2-1B's
#   q/k/v): 8 columns x 1024 of K per program, 2 stages: 2.7-4.9 us, where the unfused pair
#   takes 5.7-9.2 us (a norm kernel, then cuBLAS);
# - larger weights: 16 x 512 tiles, 4 stages (256 programs at N = 4096), 0.63-0.92 of copy
#   bandwidth on Llama-3-8B's projections and 1.0 on the LM heads, as cuBLAS alone.
# M > 1 (tl.dot) is correct but measured slower than the unfused pair (Llama-3-8B gate/up at
# M = 8: 169 vs 60 us), so the launchers take it only up to FUSED_MAX_M rows.
GEMV_CONFIGS = (
    (1, 4096, 2048, GemvConfig(1, 8, 1024, 4, 2)),
    (1, None, 1024, GemvConfig(1, 8, 1024, 4, 2)),
    (1, None, None, GemvConfig(1, 16, 512, 4, 4)),
    (16, None, None, GemvConfig(16, 16, 256, 4, 4)),
    (32, None, None, GemvConfig(32, 16, 128, 4, 4)),
    (64, None, None, GemvConfig(64, 32, 128, 4, 3)),
)
# Rows up to which the launchers run the fused kernel; above it, the unfused pair.
FUSED_MAX_M = 1


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    if batch_invariance.enabled():
        m = 1   # every row as in a one-row batch: the same tile, a program per row
    for max_m, max_n, max_k, cfg in GEMV_CONFIGS:
        if m <= max_m and (max_n is None or n <= max_n) and (max_k is None or k <= max_k):
            return fit_config(cfg, k)
    raise ValueError(f"gemv: M = {m} exceeds MAX_M = {MAX_M}; use the unfused ops")


# The rms prologues' first pass (each row's sum of squares) runs before the first weight
# load, so its iterations are latency on every program's critical path: on the H200 the
# eight 512-wide chunks of K = 4096 cost ~4 us a launch (Llama-3-8B's q/k/v and gate/up ran
# ~7 us over their copy time, the SiLU-prologue down projection ~2.6). One chunk of up to
# PASS1_MAX_K elements is one round trip; the tl.dot path keeps BLOCK_K (its chunk is
# [BLOCK_M, BLOCK_K1] registers).
PASS1_MAX_K = 4096


def pass1_block(cfg: GemvConfig, k: int) -> int:
    if cfg.use_dot:
        return cfg.block_k
    return max(cfg.block_k, min(PASS1_MAX_K, triton.next_power_of_2(max(k, 1))))


def fit_config(cfg: GemvConfig, k: int) -> GemvConfig:
    """cfg with BLOCK_K no longer than K needs (a power of two, at least 16)."""
    block_k = max(16, min(cfg.block_k, triton.next_power_of_2(max(k, 1))))
    if block_k == cfg.block_k:
        return cfg
    return GemvConfig(cfg.block_m, cfg.block_n, block_k, cfg.num_warps, cfg.num_stages)


@triton.jit
def _gemv_kernel(X, X2, NW, B, Y, H, M, N, stride_x, stride_x2, stride_h, stride_bk,
                 stride_bn, stride_y, eps, K: tl.constexpr, PROLOGUE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr, BLOCK_K1: tl.constexpr):
    """Y[:M, n-block] = prologue(X, X2, NW) @ B[:, n-block].

    RMS: X = x, NW = norm weight (X2, H unused). ADD_RMS: X = x, X2 = residual, H = the
    sum (stored by program 0). SILU: X = gate, X2 = up (NW, H unused). NONE: X = x (X2,
    NW, H unused). BLOCK_M == 1 takes the FMA path, one program per (column block, row),
    M * cdiv(N, BLOCK_N) of them; larger BLOCK_M tl.dot, one program per column block for
    all rows. BLOCK_K1 is the chunk of the rms prologues' first pass (see `pass1_block`)."""
    XDT: tl.constexpr = X.dtype.element_ty
    USE_DOT: tl.constexpr = BLOCK_M > 1
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    if USE_DOT:
        pid_n = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
    else:
        # One row per program, M programs per column block, adjacent in launch order so
        # they share the block's weight tile through L2: each row runs exactly the code of
        # a one-row launch, whatever M is (see backends/batch_invariance.py).
        pid = tl.program_id(0)
        pid_n = pid // M
        rows = pid % M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # Columns past N read column 0 (in bounds) and are never stored: no mask on B.
    cols = tl.where(n_ok, offs_n, 0).to(tl.int64)

    # Pass 1 (rms prologues): each row's inverse RMS; program 0 also stores h.
    ADD: tl.constexpr = PROLOGUE == ADD_RMS
    inv = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == RMS or PROLOGUE == ADD_RMS:
        offs_k1 = tl.arange(0, BLOCK_K1)
        sum_sq = tl.zeros([BLOCK_M, BLOCK_K1], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K1):
            ks = k0 + offs_k1
            k_ok = ks < K
            mask = row_ok[:, None] & k_ok[None, :]
            if pid_n == 0:
                s = _load_sum(X, X2, H, rows, ks, mask, stride_x, stride_x2, stride_h, ADD, True)
            else:
                s = _load_sum(X, X2, H, rows, ks, mask, stride_x, stride_x2, stride_h, ADD, False)
            sum_sq += s * s
        inv = _inv_rms(tl.sum(sum_sq, axis=1), K, eps)

    # Main loop: prologue of one x chunk, times one weight tile.
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_ptrs = B + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    else:
        tl.static_assert(BLOCK_M == 1)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        b_ptrs = B + cols[:, None] * stride_bn + offs_k[None, :] * stride_bk
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        ks = k0 + offs_k
        k_ok = ks < K
        mask = row_ok[:, None] & k_ok[None, :]
        if PROLOGUE == SILU:
            g = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
            u = tl.load(X2 + rows[:, None] * stride_x2 + ks[None, :], mask=mask, other=0.0)
            a = _silu_mul(g, u, XDT, XDT)
        elif PROLOGUE == NONE:
            a = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            s = _load_sum(X, X2, H, rows, ks, mask, stride_x, stride_x2, stride_h, ADD, False)
            a = _apply_weight(s, inv, NW, ks, k_ok, XDT)
        # `a` holds values of x's dtype (in fp32): exactly what the unfused mm is fed.
        if USE_DOT:
            if EVEN_K:
                w = tl.load(b_ptrs)
            else:
                w = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if XDT == tl.float32:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(XDT), w, acc)
        else:
            if EVEN_K:
                w = tl.load(b_ptrs)
            else:
                w = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * tl.reshape(a, (BLOCK_K,))[None, :]
        b_ptrs += BLOCK_K * stride_bk

    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)[None, :]
    y_ptrs = Y + rows[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------- launchers

def _check(name: str, x: torch.Tensor, b: torch.Tensor, others: dict) -> None:
    """x [..., K] against b [K, N]; every tensor in `others` must have x's dtype."""
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got a scalar")
    if b.dim() != 2:
        raise ValueError(f"{name}: b must be [K, N], got shape {tuple(b.shape)}")
    if x.shape[-1] != b.shape[0]:
        raise ValueError(f"{name}: K mismatch: x is {tuple(x.shape)} (K = {x.shape[-1]}) but "
                         f"b is {tuple(b.shape)} (K = {b.shape[0]})")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} not supported; expected one of {DTYPES}")
    for what, t in {"b": b, **others}.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype mismatch: {what} is {t.dtype}, x is {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: device mismatch: {what} is on {t.device}, x on {x.device}")


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    x2 = as_rows(x)
    if x2.shape[0] > MAX_M:
        raise ValueError(f"{name}: M = {x2.shape[0]} rows exceeds MAX_M = {MAX_M}; "
                         "use the unfused ops")
    return x2


def _many_rows(x: torch.Tensor) -> bool:
    """More rows than the fused kernel pays for (FUSED_MAX_M, at most MAX_M): the launchers
    then run the unfused pair, kiln's norm or activation kernel and torch.mm. Under
    batch_invariant() up to MAX_M rows take the one-row kernel, a program per row (torch.mm
    would round each row as its batch's shape leads cuBLAS to)."""
    limit = MAX_M if batch_invariance.enabled() else min(FUSED_MAX_M, MAX_M)
    return x.numel() // max(x.shape[-1], 1) > limit


def _check_config(cfg: GemvConfig, m: int) -> None:
    if cfg.use_dot and cfg.block_m < m:   # (the FMA path runs a program per row: any M)
        raise ValueError(f"gemv: config block_m {cfg.block_m} < M = {m}")
    blocks = (cfg.block_m, cfg.block_n, cfg.block_k)
    if any(v & (v - 1) for v in blocks):
        raise ValueError(f"gemv: block sizes must be powers of two: {cfg}")
    if cfg.use_dot and min(blocks) < 16:
        raise ValueError(f"gemv: a tl.dot config needs block_m, block_n, block_k >= 16: {cfg}")


def _launch(prologue, x2, x2b, nw, b, h2, eps, config):
    """y [M, N] = prologue(x2 [, x2b, nw]) @ b; h2 receives the sum for ADD_RMS."""
    m, k = x2.shape
    n = b.shape[1]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    cfg = config or gemv_config(m, n, k)
    _check_config(cfg, m)
    dummy = x2
    x2b = dummy if x2b is None else x2b
    nw = dummy if nw is None else nw
    h2 = dummy if h2 is None else h2
    grid = (triton.cdiv(n, cfg.block_n) * (1 if cfg.use_dot else m),)
    _gemv_kernel[grid](
        x2, x2b, nw, b, y, h2, m, n, x2.stride(0), x2b.stride(0), h2.stride(0),
        b.stride(0), b.stride(1), y.stride(0), float(eps), K=k, PROLOGUE=prologue,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        STAGES=cfg.num_stages, BLOCK_K1=pass1_block(cfg, k), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y


def _norm_weight(name: str, x: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    if norm_weight.dim() != 1 or norm_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: norm_weight shape {tuple(norm_weight.shape)} does not "
                         f"match K = {x.shape[-1]}")
    return norm_weight.contiguous()


def rms_norm_mm(x: torch.Tensor, norm_weight: torch.Tensor, b: torch.Tensor, eps: float, *,
                config: GemvConfig | None = None) -> torch.Tensor:
    """kiln_ref.rms_norm(x, norm_weight, eps).reshape(-1, K) @ b in one launch.

    x [..., K] (M = the leading dims, at most MAX_M), norm_weight [K], b [K, N] with any
    strides; all of one dtype (fp32, fp16, bf16). Returns a new contiguous [M, N]."""
    _check("rms_norm_mm", x, b, {"norm_weight": norm_weight})
    nw = _norm_weight("rms_norm_mm", x, norm_weight)
    if _many_rows(x):
        return torch.mm(norm.rms_norm(x, nw, eps).reshape(-1, x.shape[-1]), b)
    return _launch(RMS.value, _rows("rms_norm_mm", x), None, nw, b, None, eps, config)


def fused_add_rms_norm_mm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                          b: torch.Tensor, eps: float, *,
                          config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h) @ b, h) with h = residual + x (kiln_ref.fused_add_rms_norm's sum), in
    one launch. Shapes as rms_norm_mm; residual like x. h is new, contiguous, x's shape."""
    _check("fused_add_rms_norm_mm", x, b, {"residual": residual, "norm_weight": norm_weight})
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm_mm: residual shape {tuple(residual.shape)} != "
                         f"x shape {tuple(x.shape)}")
    nw = _norm_weight("fused_add_rms_norm_mm", x, norm_weight)
    if _many_rows(x):
        normed, h = norm.fused_add_rms_norm(x, residual, nw, eps)
        return torch.mm(normed.reshape(-1, x.shape[-1]), b), h
    x2 = _rows("fused_add_rms_norm_mm", x)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = _launch(ADD_RMS.value, x2, as_rows(residual), nw, b, h.view(-1, x.shape[-1]), eps,
                config)
    if h.numel() and y.numel() == 0:  # N = 0: no program ran to store h
        torch.add(residual, x, out=h)
    return y, h


def silu_mul_mm(gate: torch.Tensor, up: torch.Tensor, b: torch.Tensor, *,
                config: GemvConfig | None = None) -> torch.Tensor:
    """kiln_ref.silu_mul(gate, up).reshape(-1, I) @ b in one launch.

    gate, up [..., I] with a unit last stride and any row stride (e.g. the two halves of
    one [M, 2I] projection), b [I, N] with any strides; one dtype. Returns [M, N]."""
    _check("silu_mul_mm", gate, b, {"up": up})
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul_mm: gate shape {tuple(gate.shape)} != up shape "
                         f"{tuple(up.shape)}")
    if _many_rows(gate):
        return torch.mm(activation.silu_mul(gate, up).reshape(-1, gate.shape[-1]), b)
    return _launch(SILU.value, _rows("silu_mul_mm", gate), as_rows(up), None, b, None, 0.0,
                   config)


def mm(x: torch.Tensor, b: torch.Tensor, *, config: GemvConfig | None = None) -> torch.Tensor:
    """kiln_ref.mm: x.reshape(-1, K) @ b in one launch (torch.mm above FUSED_MAX_M rows).
    x [..., K] with any row stride, b [K, N] with any strides; one dtype. Returns [M, N]."""
    _check("mm", x, b, {})
    if _many_rows(x):
        return torch.mm(x.reshape(-1, x.shape[-1]), b)
    return _launch(NONE.value, _rows("mm", x), None, None, b, None, 0.0, config)


# --------------------------------------------------------------------------- AOT variants

# Llama-3-8B decode at M = 1: (name, prologue, K, N). b is a permuted nn.Linear weight, so
# stride_bk is compiled in as 1 (what the JIT's specialisation of a stride of 1 does) and
# the weight loads vectorise; a C launcher must pass such a b (and N % 16 == 0).
AOT_SHAPES = (("rms_norm_mm", RMS.value, 4096, 6144),
              ("fused_add_rms_norm_mm", ADD_RMS.value, 4096, 6144),
              ("silu_mul_mm", SILU.value, 14336, 4096),
              ("mm", NONE.value, 4096, 4096))
AOT_M = 1


def _spec(dt: str, name: str, prologue: int, k: int, n: int):
    cfg = gemv_config(AOT_M, n, k)
    p = "*" + dt
    types = {"X": p, "X2": p, "NW": p, "B": p, "Y": p, "H": p, "M": "i32", "N": "i32",
             "stride_x": "i32", "stride_x2": "i32", "stride_h": "i32", "stride_bn": "i32",
             "stride_y": "i32", "eps": "fp32"}
    return make_spec(f"{name}_{SHORT[dt]}_m{cfg.block_m}_k{k}", _gemv_kernel, types,
                     {"stride_bk": 1, "K": k, "PROLOGUE": prologue, "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                      "STAGES": cfg.num_stages, "BLOCK_K1": pass1_block(cfg, k)},
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     divisible_by_16=("X", "X2", "NW", "B", "Y", "H", "N", "stride_x",
                                      "stride_x2", "stride_h", "stride_bn", "stride_y"))


AOT_SPECS = [_spec(dt, name, prologue, k, n) for dt in ("fp16", "bf16")
             for name, prologue, k, n in AOT_SHAPES]
