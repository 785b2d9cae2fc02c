"""Quantised GEMM: `scaled_mm` with kiln_ref.scaled_mm semantics.

out = (a @ b.T) * a_scale * b_scale.T (+ bias), a [M, K] and b [N, K] both int8 or both
fp8 (e4m3fn on cuda, e4m3fnuz on hip). int8 products accumulate exactly in int32, fp8 in
fp32 (added per K tile: Hopper's fp8 MMA itself accumulates in reduced precision; see
`fast_accum`); the scales, the bias and the cast to the output dtype are the epilogue.
b is read in its nn.Linear layout (K contiguous) as [BLOCK_K, BLOCK_N] tiles; no copy.
A per-tensor b_scale is read through a zero stride, so one kernel serves both kinds.
Programs are ordered in groups of GROUP_M row blocks so that neighbouring programs share
B tiles in L2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import make_spec
from .tiles import on_hip, variants

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# (largest M, config). Small M (decode) streams the weight: thin M tiles, long K tiles,
# deep pipelining. Large M is tensor-core bound: 128x256x128 tiles with 8 warps (two
# warpgroups on H100), 3 stages = 3 x (16 + 32) KB of shared memory for 1-byte operands.
GEMM_CONFIGS = (
    (16, GemmConfig(16, 64, 256, 1, 4, 4)),
    (64, GemmConfig(64, 128, 128, 8, 4, 4)),
    (256, GemmConfig(128, 128, 128, 8, 8, 3)),
    (None, GemmConfig(128, 256, 128, 8, 8, 3)),
)


# fp8 with an fp32 add per K tile holds a second 128 x N accumulator: 128 x 256 tiles
# spill (586 us at 4096 x 8192 x 4096 on an H100); 128 x 128 with 4 stages: 301 us.
FP8_PRECISE_LARGE = GemmConfig(128, 128, 128, 8, 8, 4)


# hip (tiles.py): 3-4 stages of the 64- to 256-wide tiles ask gfx942 for 96 KiB of LDS;
# two stages of 128 x 128 fit its 64 KiB (32 KiB compiled). Not tuned on an AMD GPU.
HIP_GEMM_CONFIGS = (
    GEMM_CONFIGS[0],
    (64, GemmConfig(64, 128, 128, 8, 4, 2)),
    (256, GemmConfig(128, 128, 128, 8, 8, 2)),
    (None, GemmConfig(128, 128, 128, 8, 8, 2)),
)
HIP_FP8_PRECISE_LARGE = GemmConfig(128, 128, 128, 8, 8, 2)


def gemm_config(m: int, fp8_precise: bool = False, hip: bool | None = None) -> GemmConfig:
    """The tiles for M rows, on hip (default: this torch's) or cuda."""
    configs, precise = ((HIP_GEMM_CONFIGS, HIP_FP8_PRECISE_LARGE) if (on_hip() if hip is None else hip)
                        else (GEMM_CONFIGS, FP8_PRECISE_LARGE))
    if fp8_precise and m > configs[-2][0]:
        return precise
    for limit, cfg in configs:
        if limit is None or m <= limit:
            return cfg
    raise AssertionError("unreachable")


@triton.jit
def _scaled_mm_kernel(A, B, C, A_SCALE, B_SCALE, BIAS, M, N, K,
                      stride_am, stride_bn, stride_cm, stride_bs,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IS_INT8: tl.constexpr, FAST_ACCUM: tl.constexpr):
    """C[m, n] = (sum_k A[m, k] B[n, k]) * A_SCALE[m] * B_SCALE[n * stride_bs] (+ BIAS[n])."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Rows/columns past the edge read row/column 0 (in bounds) and are never stored.
    rows = tl.where(m_ok, offs_m, 0).to(tl.int64)
    cols = tl.where(n_ok, offs_n, 0).to(tl.int64)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + cols[None, :] * stride_bn + offs_k[:, None]
    if IS_INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            # Hopper's fp8 MMA accumulates in reduced precision. Unless FAST_ACCUM, each
            # K tile's product starts from zero and is added to the fp32 accumulator
            # (what cuBLAS does without fast accumulation; the same error, 1.3e-4 at
            # K = 4096, against 1.3e-3 when the MMA accumulates across all of K).
            if FAST_ACCUM:
                acc = tl.dot(a, b, acc)
            else:
                acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_s = tl.load(A_SCALE + offs_m, mask=m_ok, other=0.0)
    b_s = tl.load(B_SCALE + offs_n * stride_bs, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              config: GemmConfig | None = None, fast_accum: bool = False) -> torch.Tensor:
    """kiln_ref.scaled_mm: a [M, K] int8/fp8 with a_scale [M, 1] fp32, b [N, K] (same dtype)
    with b_scale [N, 1] or one element, optional bias [N]; returns [M, N] in out_dtype.
    `config` overrides the tile table (tests use it). `fast_accum` (fp8): let the tensor
    cores accumulate across all of K in their reduced precision, like torch._scaled_mm's
    use_fast_accum (H100, 4096 x 8192 x 4096: 221 us instead of 300-330 us; relative error
    1.3e-3 instead of 1.3e-4)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_mm: a {tuple(a.shape)} and b {tuple(b.shape)} are not "
                         "[M, K] and [N, K]")
    if a.dtype != b.dtype or (a.dtype != torch.int8 and a.dtype not in FP8_DTYPES):
        raise ValueError(f"scaled_mm: a {a.dtype}, b {b.dtype}; expected both int8 or both "
                         "the same fp8 dtype")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"scaled_mm: out_dtype {out_dtype} not in {OUT_DTYPES}")
    m, k = a.shape
    n = b.shape[0]
    if a_scale.numel() != m:
        raise ValueError(f"scaled_mm: a_scale has {a_scale.numel()} elements; expected M = {m}")
    if b_scale.numel() not in (1, n):
        raise ValueError(f"scaled_mm: b_scale has {b_scale.numel()} elements; expected 1 or N = {n}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"scaled_mm: bias has {bias.numel()} elements; expected N = {n}")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(_bias_only(m, n, bias, out_dtype, a.device))
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    a_scale = a_scale.reshape(-1).float().contiguous()
    b_scale = b_scale.reshape(-1).float().contiguous()
    if bias is not None:
        bias = bias.reshape(-1).contiguous()
    fp8_precise = a.dtype != torch.int8 and not fast_accum
    cfg = config or gemm_config(m, fp8_precise)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _scaled_mm_kernel[grid](
        a, b, out, a_scale, b_scale, bias if bias is not None else a_scale, m, n, k,
        a.stride(0), b.stride(0), out.stride(0), 0 if b_scale.numel() == 1 else 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, IS_INT8=a.dtype == torch.int8,
        FAST_ACCUM=bool(fast_accum), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _bias_only(m, n, bias, out_dtype, device):
    """K = 0: the product is zero, so the result is the bias (or zeros)."""
    out = torch.zeros(m, n, dtype=torch.float32, device=device)
    if bias is not None:
        out += bias.float().reshape(1, -1)
    return out.to(out_dtype)


# --------------------------------------------------------------------------- AOT variants

_OUT = {"bf16": "bf16", "fp16": "f16"}
# (operand type, name, targets): fp8 e4m3fn is the cuda flavour, e4m3fnuz (fp8e4b8) the
# gfx942 one; int8 runs on both.
_AOT_OPERANDS = (("i8", "int8", ("cuda", "hip")), ("fp8e4nv", "fp8e4m3", ("cuda",)),
                 ("fp8e4b8", "fp8e4m3fnuz", ("hip",)))


def _gemm_spec(op: str, opname: str, targets, out: str, bias: bool, tag: str, cfg: GemmConfig):
    types = {"A": "*" + op, "B": "*" + op, "C": "*" + out, "A_SCALE": "*fp32",
             "B_SCALE": "*fp32", "BIAS": "*" + out, "M": "i32", "N": "i32", "K": "i32",
             "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32", "stride_bs": "i32"}
    name = f"scaled_mm_{opname}_{_OUT[out]}{'_bias' if bias else ''}_{tag}"
    return make_spec(name, _scaled_mm_kernel, types,
                     {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                      "GROUP_M": cfg.group_m, "EVEN_K": True, "HAS_BIAS": bias,
                      "IS_INT8": op == "i8", "FAST_ACCUM": False},
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     divisible_by_16=("A", "B", "C", "A_SCALE", "B_SCALE", "BIAS", "N", "K",
                                      "stride_am", "stride_bn", "stride_cm"),
                     targets=targets)


def _gemm_specs(op: str, opname: str, targets, out: str, bias: bool, tag: str, m: int):
    """The variant for M rows (small_m: 1, large_m: many), per target's tiles (tiles.py)."""
    def make(cfg, spec_targets, suffix):
        return _gemm_spec(op, opname, spec_targets, out, bias, tag + suffix, cfg)
    precise = op != "i8"
    return variants(make, gemm_config(m, precise, hip=False), gemm_config(m, precise, hip=True),
                    targets)


AOT_SPECS = [s for op, opname, targets in _AOT_OPERANDS
             for out in ("bf16",)
             for bias in (False, True)
             for tag, m in (("small_m", 1), ("large_m", 1 << 20))
             for s in _gemm_specs(op, opname, targets, out, bias, tag, m)]
