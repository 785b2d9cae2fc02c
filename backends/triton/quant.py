"""Quantisation kernels (kiln_ref semantics): `quant_fp8`, `quant_int8`, and the fused
`rms_norm_quant`, `fused_add_rms_norm_quant`, `silu_mul_quant`.

All are row kernels (see norm.py): a row is produced in float32, rounded to the dtype the
unfused reference would hold it in, reduced to amax, and stored as codes plus one float32
scale per row (scale = max(amax / qmax, 1e-10), codes = x / scale). Rows that fit in
registers take one pass over the inputs; longer rows loop (norm: sum of squares, amax,
store; others: amax, store), re-reading the inputs instead of keeping the row.

Rounding (the same code in the interpreter and on every GPU, except the fp8 cast):
- codes = x * (1 / scale), the reciprocal taken once per row with IEEE division, as
  vLLM does; torch divides every element, so a code can be one step off torch's where
  x / scale lies within an ulp of a rounding boundary (exact ties are common in rows of
  bf16 data: in a CPU simulation of random rows ~5e-4 of codes, ~5e-5 for fp16, none
  for fp32 inputs).
  Dividing exactly (a Markstein correction, two FMAs an element) made the fused
  silu_mul_quant ALU-bound on an H100: 2.3 instead of 3.1 TB/s.
- int8: round half to even like torch.round with the fp32 magic number
  (v + 1.5 * 2**23) - 1.5 * 2**23 (|v| <= 128 after the clamp): no libdevice, which
  the interpreter lacks. Neither LLVM nor ptxas folds it (IEEE arithmetic, no
  reassociation): both adds are in the PTX and in the AMD LLVM IR.
- fp8: compiled kernels cast with Triton's round-to-nearest-even conversion (on sm_90 the
  hardware's cvt.rn.satfinite; on gfx942 Triton's own, unverified here: no AMD GPU).
  The interpreter's own fp32 -> fp8 cast rounds ties away from zero and mishandles
  subnormals, so when the kernels run interpreted (SOFT_FP8) the value is
  first rounded onto the e4m3 grid in fp32 (`_round_e4m3`) and the cast is then exact.
qdtype: torch.int8, torch.float8_e4m3fn (cuda and hip), torch.float8_e4m3fnuz (hip only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import _silu_mul, check_gate_up
from .aot import make_spec
from .norm import (SHORT, TRITON_DTYPE, _apply_weight, _check_weight, _inv_rms, _load_sum,
                   as_rows, row_config)

INT8, E4M3FN, E4M3FNUZ = 0, 1, 2
QMODE = {torch.int8: INT8, torch.float8_e4m3fn: E4M3FN, torch.float8_e4m3fnuz: E4M3FNUZ}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}


@triton.jit
def _rint(v):
    """Round half to even of float32 v, |v| < 2**22, as float32."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_e4m3(v, EMIN: tl.constexpr):
    """v (|v| <= the format's max) rounded half to even onto the e4m3 grid: 3 mantissa
    bits, smallest normal exponent EMIN (-6 for e4m3fn, -7 for e4m3fnuz)."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # floor(log2|v|); -127 for 0
    e = tl.maximum(e, EMIN) - 3  # exponent of one unit in the last place
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - e) << 23).to(tl.float32, bitcast=True)
    r = _rint(tl.abs(v) * inv_ulp) * ulp  # both products exact
    # Put the sign back with the bits, so that what rounds to zero keeps it (-0 in e4m3fn).
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _codes(y, inv_scale, QDT: tl.constexpr, QMODE: tl.constexpr, QMAX: tl.constexpr,
           SOFT_FP8: tl.constexpr):
    """Quantised codes of y [ROWS, BLOCK] given 1 / scale (per row or scalar), as QDT."""
    v = y * inv_scale
    if QMODE == 0:
        q = _rint(tl.minimum(tl.maximum(v, -128.0), 127.0)).to(QDT)
    else:
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if SOFT_FP8:
            if QMODE == 1:
                v = _round_e4m3(v, -6)
            else:
                v = _round_e4m3(v, -7)
        q = v.to(QDT)
    return q


@triton.jit
def _row_scale(amax, QMAX: tl.constexpr):
    """(scale, 1 / scale) of rows with the given amax; IEEE divisions, once per row. The
    floor 1e-10 is kiln_ref.SCALE_FLOOR (keeps an all-zero row's scale finite)."""
    scale = tl.maximum(tl.math.div_rn(amax, QMAX), 1e-10)
    return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _row_ids(n_rows, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return rows.to(tl.int64), rows < n_rows


# ------------------------------------------------------------------- plain quantisation

@triton.jit
def _quant_kernel(X, Q, SC, n_rows, stride_x, stride_q,
                  HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                  QMODE: tl.constexpr, QMAX: tl.constexpr, STATIC: tl.constexpr,
                  SOFT_FP8: tl.constexpr):
    """Q = X / scale; scale per row written to SC, or (STATIC) one scale read from SC."""
    rows, row_mask = _row_ids(n_rows, ROWS)
    QDT: tl.constexpr = Q.dtype.element_ty
    if STATIC:
        inv = tl.math.div_rn(1.0, tl.load(SC))
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
            y = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            q = _codes(y.to(tl.float32), inv, QDT, QMODE, QMAX, SOFT_FP8)
            tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    elif BLOCK >= HIDDEN:
        cols = tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
        y = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        y = y.to(tl.float32)
        scale, inv = _row_scale(tl.max(tl.abs(y), axis=1), QMAX)
        tl.store(SC + rows, scale, mask=row_mask)
        q = _codes(y, inv[:, None], QDT, QMODE, QMAX, SOFT_FP8)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    else:
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
            y = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(y.to(tl.float32)), axis=1))
        scale, inv = _row_scale(amax, QMAX)
        tl.store(SC + rows, scale, mask=row_mask)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
            y = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            q = _codes(y.to(tl.float32), inv[:, None], QDT, QMODE, QMAX, SOFT_FP8)
            tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)


# ------------------------------------------------------------------- rms_norm + quant

@triton.jit
def _rms_norm_quant_kernel(X, R, W, Q, SC, S, n_rows, stride_x, stride_r, stride_q, stride_s,
                           eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, QMODE: tl.constexpr, QMAX: tl.constexpr,
                           SOFT_FP8: tl.constexpr):
    """Q, SC = quantize(rms_norm(X [+ R]) * W); S = X + R when HAS_RESIDUAL. Without a
    residual, R is unused and S must be X (the normalised row's dtype is S's)."""
    rows, row_mask = _row_ids(n_rows, ROWS)
    QDT: tl.constexpr = Q.dtype.element_ty
    SDT: tl.constexpr = S.dtype.element_ty
    if BLOCK >= HIDDEN:
        cols = tl.arange(0, BLOCK)
        col_mask = cols < HIDDEN
        mask = row_mask[:, None] & col_mask[None, :]
        s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s, HAS_RESIDUAL, True)
        rinv = _inv_rms(tl.sum(s * s, axis=1), HIDDEN, eps)
        y = _apply_weight(s, rinv, W, cols, col_mask, SDT)
        scale, inv = _row_scale(tl.max(tl.abs(y), axis=1), QMAX)
        tl.store(SC + rows, scale, mask=row_mask)
        q = _codes(y, inv[:, None], QDT, QMODE, QMAX, SOFT_FP8)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < HIDDEN)[None, :]
            s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
                          HAS_RESIDUAL, True)
            acc += s * s
        rinv = _inv_rms(tl.sum(acc, axis=1), HIDDEN, eps)
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            col_mask = cols < HIDDEN
            mask = row_mask[:, None] & col_mask[None, :]
            s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
                          HAS_RESIDUAL, False)
            y = _apply_weight(s, rinv, W, cols, col_mask, SDT)
            amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        scale, inv = _row_scale(amax, QMAX)
        tl.store(SC + rows, scale, mask=row_mask)
        for start in range(0, HIDDEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            col_mask = cols < HIDDEN
            mask = row_mask[:, None] & col_mask[None, :]
            s = _load_sum(X, R, S, rows, cols, mask, stride_x, stride_r, stride_s,
                          HAS_RESIDUAL, False)
            y = _apply_weight(s, rinv, W, cols, col_mask, SDT)
            q = _codes(y, inv[:, None], QDT, QMODE, QMAX, SOFT_FP8)
            tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)


# ------------------------------------------------------------------- silu_mul + quant

@triton.jit
def _silu_mul_quant_kernel(G, U, Q, SC, n_rows, stride_g, stride_u, stride_q,
                           N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                           QMODE: tl.constexpr, QMAX: tl.constexpr, SOFT_FP8: tl.constexpr):
    rows, row_mask = _row_ids(n_rows, ROWS)
    QDT: tl.constexpr = Q.dtype.element_ty
    GDT: tl.constexpr = G.dtype.element_ty
    UDT: tl.constexpr = U.dtype.element_ty
    if BLOCK >= N:
        cols = tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < N)[None, :]
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
        y = _silu_mul(g, u, GDT, UDT)
        scale, inv = _row_scale(tl.max(tl.abs(y), axis=1), QMAX)
        tl.store(SC + rows, scale, mask=row_mask)
        q = _codes(y, inv[:, None], QDT, QMODE, QMAX, SOFT_FP8)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
    else:
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < N)[None, :]
            g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(_silu_mul(g, u, GDT, UDT)), axis=1))
        scale, inv = _row_scale(amax, QMAX)
        tl.store(SC + rows, scale, mask=row_mask)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_mask[:, None] & (cols < N)[None, :]
            g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
            y = _silu_mul(g, u, GDT, UDT)
            q = _codes(y, inv[:, None], QDT, QMODE, QMAX, SOFT_FP8)
            tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)


# ------------------------------------------------------------------- launchers

def _soft_fp8(qdtype: torch.dtype) -> bool:
    """Round fp8 in software only where the kernels run in the interpreter."""
    return qdtype != torch.int8 and not isinstance(_quant_kernel, triton.runtime.JITFunction)


def _check_qdtype(qdtype: torch.dtype, device: torch.device) -> None:
    if qdtype not in QMODE:
        raise ValueError(f"unsupported quantised dtype {qdtype}; use one of "
                         f"{', '.join(str(d) for d in QMODE)}")
    if qdtype == torch.float8_e4m3fnuz and device.type == "cuda" and torch.version.hip is None:
        raise ValueError("float8_e4m3fnuz is AMD's fp8 format and NVIDIA GPUs have no cast "
                         "to it; use torch.float8_e4m3fn")


def _outputs(x: torch.Tensor, qdtype: torch.dtype):
    q = torch.empty(x.shape, dtype=qdtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return q, scale, q.view(-1, x.shape[-1])


def _quant(x: torch.Tensor, qdtype: torch.dtype, static_scale: torch.Tensor | None):
    _check_qdtype(qdtype, x.device)
    hidden = x.shape[-1]
    x2 = as_rows(x)
    q, scale, q2 = _outputs(x, qdtype)
    if static_scale is not None:
        if static_scale.numel() != 1:
            raise ValueError("quant_fp8: a static scale must have exactly one element, "
                             f"got shape {tuple(static_scale.shape)}")
        scale = static_scale.float().reshape(1).contiguous()
    if x2.shape[0] == 0 or hidden == 0:
        return q, (static_scale.float() if static_scale is not None else scale)
    cfg = row_config(hidden)
    _quant_kernel[(triton.cdiv(x2.shape[0], cfg.rows),)](
        x2, q2, scale, x2.shape[0], x2.stride(0), q2.stride(0),
        HIDDEN=hidden, BLOCK=cfg.block, ROWS=cfg.rows, QMODE=QMODE[qdtype],
        QMAX=QMAX[qdtype], STATIC=static_scale is not None,
        SOFT_FP8=_soft_fp8(qdtype), num_warps=cfg.num_warps)
    return q, (static_scale.float() if static_scale is not None else scale)


def quant_fp8(x: torch.Tensor, scale: torch.Tensor | None = None,
              fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln_ref.quant_fp8: dynamic per-token scale [..., 1] when scale is None, else the
    static one-element float32 scale. Returns (q, scale)."""
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        raise ValueError(f"quant_fp8: fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, "
                         f"got {fp8_dtype}")
    return _quant(x, fp8_dtype, scale)


def quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln_ref.quant_int8: symmetric per-token int8, returns (q, scale [..., 1])."""
    return _quant(x, torch.int8, None)


def _norm_quant(x, residual, weight, eps, qdtype):
    _check_qdtype(qdtype, x.device)
    _check_weight(x, weight)
    hidden = x.shape[-1]
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2
    q, scale, q2 = _outputs(x, qdtype)
    summed = None
    if residual is not None:
        summed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                             device=x.device)
    if x2.shape[0] == 0 or hidden == 0:
        return q, scale, summed
    s2 = summed.view(-1, hidden) if summed is not None else x2
    cfg = row_config(hidden)
    _rms_norm_quant_kernel[(triton.cdiv(x2.shape[0], cfg.rows),)](
        x2, r2, weight.contiguous(), q2, scale, s2, x2.shape[0], x2.stride(0), r2.stride(0),
        q2.stride(0), s2.stride(0), float(eps), HIDDEN=hidden, BLOCK=cfg.block, ROWS=cfg.rows,
        HAS_RESIDUAL=residual is not None, QMODE=QMODE[qdtype], QMAX=QMAX[qdtype],
        SOFT_FP8=_soft_fp8(qdtype), num_warps=cfg.num_warps)
    return q, scale, summed


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln_ref.rms_norm_quant: returns (q, scale [..., 1])."""
    q, scale, _ = _norm_quant(x, None, weight, eps, qdtype)
    return q, scale


def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float, qdtype: torch.dtype):
    """kiln_ref.fused_add_rms_norm_quant: returns (q, scale [..., 1], residual + x)."""
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm_quant: residual shape {tuple(residual.shape)} "
                         f"!= x shape {tuple(x.shape)}")
    return _norm_quant(x, residual, weight, eps, qdtype)


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln_ref.silu_mul_quant: gate/up [..., I] with any row stride; (q, scale [..., 1])."""
    _check_qdtype(qdtype, gate.device)
    check_gate_up(gate, up)
    n = gate.shape[-1]
    g2, u2 = as_rows(gate), as_rows(up)
    q, scale, q2 = _outputs(gate, qdtype)
    if g2.shape[0] == 0 or n == 0:
        return q, scale
    cfg = row_config(n)
    _silu_mul_quant_kernel[(triton.cdiv(g2.shape[0], cfg.rows),)](
        g2, u2, q2, scale, g2.shape[0], g2.stride(0), u2.stride(0), q2.stride(0),
        N=n, BLOCK=cfg.block, ROWS=cfg.rows, QMODE=QMODE[qdtype], QMAX=QMAX[qdtype],
        SOFT_FP8=_soft_fp8(qdtype), num_warps=cfg.num_warps)
    return q, scale


# --------------------------------------------------------------------------- AOT variants

QDTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_QSHORT = {torch.int8: "i8", torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}
AOT_HIDDEN = 4096         # Llama-3-8B hidden size
AOT_INTERMEDIATE = 14336  # and intermediate size


def _targets(qdtype):
    return ("hip",) if qdtype == torch.float8_e4m3fnuz else ("cuda", "hip")


def _quant_spec(dt: str, qdtype, static: bool):
    cfg = row_config(AOT_HIDDEN)
    name = f"quant_{_QSHORT[qdtype]}{'_static' if static else ''}_{SHORT[dt]}_d{AOT_HIDDEN}"
    return make_spec(name, _quant_kernel,
                     {"X": "*" + dt, "Q": "*" + TRITON_DTYPE[qdtype], "SC": "*fp32",
                      "n_rows": "i32", "stride_x": "i32", "stride_q": "i32"},
                     {"HIDDEN": AOT_HIDDEN, "BLOCK": cfg.block, "ROWS": cfg.rows,
                      "QMODE": QMODE[qdtype], "QMAX": QMAX[qdtype], "STATIC": static,
                      "SOFT_FP8": False},
                     num_warps=cfg.num_warps, targets=_targets(qdtype),
                     divisible_by_16=("X", "Q", "SC", "stride_x", "stride_q"))


def _norm_quant_spec(dt: str, qdtype, residual: bool):
    cfg = row_config(AOT_HIDDEN)
    name = (f"{'fused_add_' if residual else ''}rms_norm_quant_{_QSHORT[qdtype]}_{SHORT[dt]}"
            f"_d{AOT_HIDDEN}")
    p = "*" + dt
    return make_spec(name, _rms_norm_quant_kernel,
                     {"X": p, "R": p, "W": p, "Q": "*" + TRITON_DTYPE[qdtype], "SC": "*fp32",
                      "S": p, "n_rows": "i32", "stride_x": "i32", "stride_r": "i32",
                      "stride_q": "i32", "stride_s": "i32", "eps": "fp32"},
                     {"HIDDEN": AOT_HIDDEN, "BLOCK": cfg.block, "ROWS": cfg.rows,
                      "HAS_RESIDUAL": residual, "QMODE": QMODE[qdtype], "QMAX": QMAX[qdtype],
                      "SOFT_FP8": False},
                     num_warps=cfg.num_warps, targets=_targets(qdtype),
                     divisible_by_16=("X", "R", "W", "Q", "SC", "S", "stride_x", "stride_r",
                                      "stride_q", "stride_s"))


def _silu_quant_spec(dt: str, qdtype):
    cfg = row_config(AOT_INTERMEDIATE)
    p = "*" + dt
    return make_spec(f"silu_mul_quant_{_QSHORT[qdtype]}_{SHORT[dt]}_i{AOT_INTERMEDIATE}",
                     _silu_mul_quant_kernel,
                     {"G": p, "U": p, "Q": "*" + TRITON_DTYPE[qdtype], "SC": "*fp32",
                      "n_rows": "i32", "stride_g": "i32", "stride_u": "i32", "stride_q": "i32"},
                     {"N": AOT_INTERMEDIATE, "BLOCK": cfg.block, "ROWS": cfg.rows,
                      "QMODE": QMODE[qdtype], "QMAX": QMAX[qdtype], "SOFT_FP8": False},
                     num_warps=cfg.num_warps, targets=_targets(qdtype),
                     divisible_by_16=("G", "U", "Q", "SC", "stride_g", "stride_u", "stride_q"))


AOT_SPECS = (
    [_quant_spec(dt, q, False) for dt in ("fp16", "bf16") for q in QDTYPES]
    + [_quant_spec(dt, q, True) for dt in ("fp16", "bf16") for q in QDTYPES if q != torch.int8]
    + [_norm_quant_spec(dt, q, res) for dt in ("fp16", "bf16") for q in QDTYPES
       for res in (False, True)]
    + [_silu_quant_spec(dt, q) for dt in ("fp16", "bf16") for q in QDTYPES]
)
