"""RMSNorm kernels: `rms_norm` and `fused_add_rms_norm` (kiln_ref semantics).

Row kernels: the input is viewed as [rows, hidden] (last dim contiguous, any row stride)
and each program handles `ROWS` whole rows. Up to 32768 columns the row is loaded once and
kept in registers (one read, one write); beyond that a program loops over the row in
`LOOP_BLOCK` chunks (two reads). Arithmetic is float32, and every value is rounded where
the reference rounds it (the sum to its dtype, the normalised row to the input dtype,
the product with the weight to the promoted dtype), so fp16 results match torch bit for
bit up to the rsqrt's last bit. `row_config` and the helpers here are shared with the
fused norm/activation + quant kernels in `quant.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import make_spec

# (largest hidden size, rows per program, num_warps) for one-pass row kernels: small rows
# share a program so that a program moves at least ~4k elements. Measured on an H100 (bf16,
# CUDA graphs): at 4096 rows x 4096/8192 columns one row and 4 warps was the best or tied
# for rms_norm, quant_int8 and rms_norm_quant (up to 13% ahead of 16 warps; 4 rows of
# 8192 with 2 warps ran at a tenth of the speed, too many registers a thread); at 16384
# rows every choice from 4096 to 16384 columns ran at 2.9-3.0 TB/s (stream copy: 3.0);
# at 2048 columns one row with 4 warps was 15% slower than two rows; a looped
# 14336-column row ran at 1.5, 1.7 and 2.2 TB/s with 4, 8 and 16 warps.
ROW_TABLE = (
    (128, 16, 4),
    (256, 8, 4),
    (512, 4, 4),
    (1024, 4, 4),
    (2048, 2, 4),
    (4096, 1, 4),
    (8192, 1, 4),
    (16384, 1, 8),
    (32768, 1, 16),
)
# Rows longer than the table: loop over the row in chunks of this many columns.
LOOP_BLOCK, LOOP_WARPS = 4096, 16


@dataclass(frozen=True)
class RowConfig:
    block: int      # columns per chunk; >= hidden means one pass
    rows: int       # rows per program
    num_warps: int


def row_config(hidden: int) -> RowConfig:
    for max_hidden, rows, warps in ROW_TABLE:
        if hidden <= max_hidden:
            return RowConfig(triton.next_power_of_2(hidden), rows, warps)
    return RowConfig(LOOP_BLOCK, 1, LOOP_WARPS)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, hidden] with a unit column stride, copying only when it must."""
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension")
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dims that no single row stride describes
        return x.contiguous().view(-1, x.shape[-1])


@triton.jit
def _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
              HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """A [ROWS, BLOCK] chunk of x, or of residual + x rounded to the sum's dtype (stored to
    S when STORE_SUM), as float32; zeros outside `mask`."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (r.to(tl.float32) + x).to(S.dtype.element_ty)
        if STORE_SUM:
            tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _inv_rms(sum_sq, HIDDEN: tl.constexpr, eps):
    return tl.math.rsqrt(sum_sq / HIDDEN + eps)


@triton.jit
def _apply_weight(s, inv, W, cols, col_mask, SDT: tl.constexpr):
    """weight * (s * inv).to(SDT), rounded as torch rounds it (to SDT when the weight has
    that dtype; any other fp16/bf16/fp32 pairing promotes to float32)."""
    normed = (s * inv[:, None]).to(SDT).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0)
    y = w.to(tl.float32)[None, :] * normed
    if W.dtype.element_ty == SDT:
        y = y.to(SDT).to(tl.float32)
    return y


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, n_rows, stride_x, stride_r, stride_y, stride_s, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    """Y = rms_norm(X [+ R]) * W; S = X + R when HAS_RESIDUAL. Without a residual, R is
    unused and S must be X: the kernel takes the dtype of the normalised sum from S."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    SDT: tl.constexpr = S.dtype.element_ty
    if BLOCK >= HIDDEN:
        cols = tl.arange(0, BLOCK)
        col_mask = cols < HIDDEN
        mask = row_mask[:, None] & col_mask[None, :]
        s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
                      HAS_RESIDUAL, True)
        inv = _inv_rms(tl.sum(s * s, axis=1), HIDDEN, eps)
        y = _apply_weight(s, inv, W, cols, col_mask, SDT)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            col_mask = cols < HIDDEN
            mask = row_mask[:, None] & col_mask[None, :]
            s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
                      HAS_RESIDUAL, True)
            acc += s * s
        inv = _inv_rms(tl.sum(acc, axis=1), HIDDEN, eps)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            col_mask = cols < HIDDEN
            mask = row_mask[:, None] & col_mask[None, :]
            # Recompute the sum from X and R rather than read back S, which other threads
            # of this program wrote without a barrier.
            s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
                          HAS_RESIDUAL, False)
            y = _apply_weight(s, inv, W, cols, col_mask, SDT)
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match "
                         f"hidden size {x.shape[-1]}")


def _launch(x, residual, weight, eps):
    _check_weight(x, weight)
    hidden = x.shape[-1]
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else None
    sum_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    out_dtype = torch.promote_types(weight.dtype, sum_dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(x.shape, dtype=sum_dtype, device=x.device) if residual is not None else None
    n_rows = x2.shape[0]
    if n_rows == 0 or hidden == 0:
        return y, s
    weight = weight.contiguous()
    y2 = y.view(-1, hidden)
    s2 = s.view(-1, hidden) if s is not None else x2
    cfg = row_config(hidden)
    grid = (triton.cdiv(n_rows, cfg.rows),)
    _rms_norm_kernel[grid](
        x2, r2 if r2 is not None else x2, weight, y2, s2, n_rows,
        x2.stride(0), (r2 if r2 is not None else x2).stride(0), y2.stride(0), s2.stride(0),
        float(eps), HIDDEN=hidden, BLOCK=cfg.block, ROWS=cfg.rows,
        HAS_RESIDUAL=residual is not None, num_warps=cfg.num_warps)
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kiln_ref.rms_norm: x [..., hidden] (any row stride), weight [hidden]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln_ref.fused_add_rms_norm: returns (rms_norm(residual + x) * weight, residual + x)."""
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual shape {tuple(residual.shape)} != "
                         f"x shape {tuple(x.shape)}")
    return _launch(x, residual, weight, eps)


# --------------------------------------------------------------------------- AOT variants

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float8_e4m3fn: "fp8e4nv", torch.float8_e4m3fnuz: "fp8e4b8",
                torch.int8: "i8"}
SHORT = {"fp16": "f16", "bf16": "bf16", "fp32": "f32"}
AOT_HIDDEN = (4096, 8192)


def _rms_spec(dt: str, hidden: int, residual: bool):
    cfg = row_config(hidden)
    name = f"{'fused_add_' if residual else ''}rms_norm_{SHORT[dt]}_d{hidden}"
    p = "*" + dt
    types = {"X": p, "R": p, "W": p, "Y": p, "S": p, "n_rows": "i32", "stride_x": "i32",
             "stride_r": "i32", "stride_y": "i32", "stride_s": "i32", "eps": "fp32"}
    return make_spec(name, _rms_norm_kernel, types,
                     {"HIDDEN": hidden, "BLOCK": cfg.block, "ROWS": cfg.rows,
                      "HAS_RESIDUAL": residual},
                     num_warps=cfg.num_warps,
                     divisible_by_16=("X", "R", "W", "Y", "S", "stride_x", "stride_r",
                                      "stride_y", "stride_s"))


AOT_SPECS = [_rms_spec(dt, h, res) for dt in ("fp16", "bf16") for h in AOT_HIDDEN
             for res in (False, True)]
