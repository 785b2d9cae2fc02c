"""SwiGLU activation: `silu_mul(gate, up)` (kiln_ref.silu_mul).

gate and up are [..., I] with a unit column stride and any row stride, so the two halves
of one [T, 2I] projection are passed without a copy. The grid is (rows, column blocks);
each program reads a block of gate and up and writes one block of the contiguous output.
Values are rounded where torch rounds them: silu(gate) to gate's dtype, the product to
the promoted dtype. `_silu_mul` is shared with `quant.silu_mul_quant`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import make_spec
from .norm import SHORT, as_rows

# (largest intermediate size, column block, num_warps)
COL_TABLE = ((1024, 1024, 4), (4096, 2048, 8))
BIG_BLOCK, BIG_WARPS = 4096, 8


def col_config(n: int) -> tuple[int, int]:
    for max_n, block, warps in COL_TABLE:
        if n <= max_n:
            return min(block, triton.next_power_of_2(n)), warps
    return BIG_BLOCK, BIG_WARPS


@triton.jit
def _silu_mul(g, u, GDT: tl.constexpr, UDT: tl.constexpr):
    """silu(g) rounded to GDT, times u, rounded to the promoted dtype; float32 in and out."""
    g = g.to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(GDT).to(tl.float32)
    y = s * u.to(tl.float32)
    if GDT == UDT:
        y = y.to(GDT).to(tl.float32)
    return y


@triton.jit
def _silu_mul_kernel(G, U, Y, stride_g, stride_u, stride_y,
                     N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0)
    y = _silu_mul(g, u, G.dtype.element_ty, U.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=mask)


def check_gate_up(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """kiln_ref.silu_mul: silu(gate) * up, output contiguous with gate's shape."""
    check_gate_up(gate, up)
    n = gate.shape[-1]
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    g2, u2 = as_rows(gate), as_rows(up)
    if g2.shape[0] == 0 or n == 0:
        return y
    y2 = y.view(-1, n)
    block, warps = col_config(n)
    grid = (g2.shape[0], triton.cdiv(n, block))
    _silu_mul_kernel[grid](g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0),
                           N=n, BLOCK=block, num_warps=warps)
    return y


# --------------------------------------------------------------------------- AOT variants

AOT_INTERMEDIATE = (14336,)  # Llama-3-8B


def _spec(dt: str, n: int):
    block, warps = col_config(n)
    p = "*" + dt
    return make_spec(f"silu_mul_{SHORT[dt]}_i{n}", _silu_mul_kernel,
                     {"G": p, "U": p, "Y": p, "stride_g": "i32", "stride_u": "i32",
                      "stride_y": "i32"},
                     {"N": n, "BLOCK": block}, num_warps=warps,
                     divisible_by_16=("G", "U", "Y", "stride_g", "stride_u", "stride_y"))


AOT_SPECS = [_spec(dt, n) for dt in ("fp16", "bf16") for n in AOT_INTERMEDIATE]
