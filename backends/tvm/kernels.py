"""The TVM kernels of the CPU target, each a TE definition plus its schedule.

Each function returns a scheduled IRModule whose `main` takes its inputs, then its outputs
(destination-passing: the caller allocates them with torch and TVM writes into them; the
tensors cross over DLPack without copies). Leading dims are symbolic (`te.var`), so one
module serves every batch and sequence length; the sizes a kernel is specialised for (the
hidden size, the group size, K and N of a weight) are its parameters and part of its cache
key. All compute in float32, as the ops' reference implementations (`kiln.ir.kiln_ref`) do.

Schedules: a row-wise op (a norm over the last dim) runs one row per iteration of the
fused leading loops, its last dim split by the vector width and vectorised; rows are not
parallel, because at decode there is one row and TVM's thread pool costs more to wake
than a row of a few hundred floats takes. The GEMV is parallel over blocks of output rows
and vectorised along them, dequantising each weight code in registers.
"""
from __future__ import annotations

import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.script import tirx as T

VECTOR = 16          # float32 lanes of an AVX-512 register (LLVM splits it on narrower CPUs)


def _leading(rank: int) -> list:
    return [te.var(f"n{i}") for i in range(rank - 1)]


def _rows_and_vector(s: Schedule, block: str, rank: int):
    """Fuses the block's leading loops into one row loop and vectorises its last dim."""
    loops = s.get_loops(s.get_sblock(block))
    row = s.fuse(*loops[:-1]) if rank > 2 else loops[0]
    _, lanes = s.split(loops[-1], [None, VECTOR])
    s.vectorize(lanes)
    return row


def _norm(x, w, d: int, eps: float, lead):
    k = te.reduce_axis((0, d), name="k")
    sumsq = te.compute(lead, lambda *i: te.sum(x[i + (k,)] * x[i + (k,)], axis=k), name="sumsq")
    return te.compute(lead + [d], lambda *i: w[i[-1]] * (x[i] * te.rsqrt(sumsq[i[:-1]] / float(d) + eps)),
                      name="out")


def rms_norm(rank: int, d: int, eps: float) -> tvm.IRModule:
    """kiln.rms_norm over the last dim (size d) of an fp32 x of the given rank."""
    lead = _leading(rank)
    x = te.placeholder(lead + [d], "float32", name="x")
    w = te.placeholder((d,), "float32", name="w")
    out = _norm(x, w, d, eps, lead)
    s = Schedule(te.create_prim_func([x, w, out]))
    row = _rows_and_vector(s, "out", rank)
    s.compute_at(s.get_sblock("sumsq"), row)
    return s.mod


def fused_add_rms_norm(rank: int, d: int, eps: float) -> tvm.IRModule:
    """kiln.fused_add_rms_norm: (rms_norm(residual + x), residual + x). Both outputs are
    written by the kernel, so neither can be scheduled inside the other's loops: the norm
    re-adds residual + x in registers rather than reading the sum back."""
    lead = _leading(rank)
    x = te.placeholder(lead + [d], "float32", name="x")
    r = te.placeholder(lead + [d], "float32", name="residual")
    w = te.placeholder((d,), "float32", name="w")
    added = te.compute(lead + [d], lambda *i: r[i] + x[i], name="added")
    out = _norm(added, w, d, eps, lead)
    summed = te.compute(lead + [d], lambda *i: r[i] + x[i], name="summed")
    s = Schedule(te.create_prim_func([x, r, w, out, summed]))
    s.compute_inline(s.get_sblock("added"))
    row = _rows_and_vector(s, "out", rank)
    s.compute_at(s.get_sblock("sumsq"), row)
    _rows_and_vector(s, "summed", rank)
    return s.mod


def silu_mul(rank: int, d: int) -> tvm.IRModule:
    """kiln.silu_mul: silu(gate) * up, silu(g) = g / (1 + exp(-g)) as torch computes it."""
    lead = _leading(rank)
    gate = te.placeholder(lead + [d], "float32", name="gate")
    up = te.placeholder(lead + [d], "float32", name="up")
    out = te.compute(lead + [d], lambda *i: gate[i] / (1.0 + te.exp(-gate[i])) * up[i], name="out")
    s = Schedule(te.create_prim_func([gate, up, out]))
    _rows_and_vector(s, "out", rank)
    return s.mod


def rope(d: int) -> tvm.IRModule:
    """kiln.rope (rotate-half): x [B, H, S, d], cos and sin [B, S, d] broadcast over H."""
    b, h, sq = te.var("b"), te.var("h"), te.var("s")
    half = d // 2
    x = te.placeholder((b, h, sq, d), "float32", name="x")
    cos = te.placeholder((b, sq, d), "float32", name="cos")
    sin = te.placeholder((b, sq, d), "float32", name="sin")

    def f(i, j, t, e):
        rotated = te.if_then_else(e < half, -x[i, j, t, e + half], x[i, j, t, e - half])
        return x[i, j, t, e] * cos[i, t, e] + rotated * sin[i, t, e]
    out = te.compute((b, h, sq, d), f, name="out")
    s = Schedule(te.create_prim_func([x, cos, sin, out]))
    loops = s.get_loops(s.get_sblock("out"))
    s.fuse(*loops[:-1])
    # The two halves as separate loops: each is a plain vector multiply-add, no select.
    first, second = s.split(loops[-1], [2, half])
    _, lanes = s.split(second, [None, VECTOR])
    s.vectorize(lanes)
    return s.mod


INT4_BLOCK_N = 64    # kiln's int4 layout: 64 output rows share a byte row (kiln_ref.int4_pack)

# The GEMVs are written as loop nests in TVMScript rather than TE: their vector loop runs
# inside the reduction over K (one accumulator register per lane), a loop order that TE's
# schedule primitives refuse to vectorise (the reduction is not local to the vector loop).


def weight_int4_mv(k: int, n: int, group_size: int, scale_dtype: str) -> tvm.IRModule:
    """kiln.weight_int4_mm for a few rows of x: y [M, n] = x [M, k] @ W.T with W in kiln's
    int4 layout (kiln_ref.int4_pack: w_q uint8 [n, k / 2], byte (c, r) of each block of 64
    output rows holding the codes of rows r and r + 32 at input c in its low and high
    nibble) and w_sz [k / G, n, 2] (scale, zero): W[o, c] = (code - 8) * scale + zero.
    Per group g, sum_c x[c] * W[o, c] = scale * sum_c x[c] * code + (zero - 8 * scale) *
    sum_c x[c]: the inner loop widens 32 codes to float in registers and multiplies them
    into x (the same 32 contiguous bytes give a block's low and high rows), the group's
    scale and zero are applied once per group. x stays float32 throughout. Parallel over
    blocks of 64 output rows; needs k % 64 == 0 and n % 64 == 0 (kiln's layout does)."""
    groups = k // group_size
    per = k // INT4_BLOCK_N      # byte rows of a block that one input position advances by
    half = INT4_BLOCK_N // 2

    @T.prim_func
    def main(x_h: T.handle, w_q_h: T.handle, w_sz_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        w_q = T.match_buffer(w_q_h, (n, k // 2), "uint8")
        w_sz = T.match_buffer(w_sz_h, (groups, n, 2), scale_dtype)
        out = T.match_buffer(out_h, (m, n), "float32")
        for ob in T.parallel(n // INT4_BLOCK_N):
            for i in range(m):
                acc = T.decl_buffer((INT4_BLOCK_N,), "float32", scope="local")
                dot = T.decl_buffer((INT4_BLOCK_N,), "float32", scope="local")
                xs = T.decl_buffer((1,), "float32", scope="local")
                for lane in T.vectorized(INT4_BLOCK_N):
                    acc[lane] = T.float32(0)
                for g in range(groups):
                    xs[0] = T.float32(0)
                    for lane in T.vectorized(INT4_BLOCK_N):
                        dot[lane] = T.float32(0)
                    for j in range(group_size):
                        xs[0] = xs[0] + x[i, g * group_size + j]
                        for nib in T.unroll(2):
                            for lane in T.vectorized(half):
                                dot[nib * half + lane] = dot[nib * half + lane] + x[i, g * group_size + j] * T.Cast(
                                    "float32", T.shift_right(
                                        w_q[ob * INT4_BLOCK_N + (g * group_size + j) // per,
                                            ((g * group_size + j) % per) * half + lane],
                                        T.uint8(nib * 4)) & T.uint8(15))
                    for lane in T.vectorized(INT4_BLOCK_N):
                        acc[lane] = acc[lane] + T.Cast("float32", w_sz[g, ob * INT4_BLOCK_N + lane, 0]) * dot[lane] + (
                            T.Cast("float32", w_sz[g, ob * INT4_BLOCK_N + lane, 1])
                            - T.float32(8) * T.Cast("float32", w_sz[g, ob * INT4_BLOCK_N + lane, 0])) * xs[0]
                for lane in T.vectorized(INT4_BLOCK_N):
                    out[i, ob * INT4_BLOCK_N + lane] = acc[lane]
    return tvm.IRModule({"main": main})


INT8_BLOCK_N = 64    # kiln's grouped int8 layout: 64 output rows side by side (kiln_ref)


def weight_int8_grouped_mv(k: int, n: int, group_size: int) -> tvm.IRModule:
    """kiln.weight_int8_grouped_mm for a few rows of x: y [M, n] = x [M, k] @ W.T with W in
    kiln's grouped int8 layout (kiln_ref.quant_int8_grouped: w_q int8 [n / 64, k, 64], the
    codes of 64 output rows side by side at each input position; w_sz float32 [k / G, 2, n],
    each group's scale and zero): W[o, c] = code * scale + zero. Per group g, sum_c x[c] *
    W[o, c] = scale * sum_c x[c] * code + zero * sum_c x[c]: the inner loop widens 64 codes
    to float in registers and multiplies them into the broadcast x[c]; the group's scale
    and zero are applied once per group. x stays float32 throughout. Parallel over blocks
    of 64 output rows; needs k % G == 0 and n % 64 == 0 (kiln_ref.int8_grouped_fits)."""
    groups = k // group_size

    @T.prim_func
    def main(x_h: T.handle, w_q_h: T.handle, w_sz_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        w_q = T.match_buffer(w_q_h, (n // INT8_BLOCK_N, k, INT8_BLOCK_N), "int8")
        w_sz = T.match_buffer(w_sz_h, (groups, 2, n), "float32")
        out = T.match_buffer(out_h, (m, n), "float32")
        for ob in T.parallel(n // INT8_BLOCK_N):
            for i in range(m):
                acc = T.decl_buffer((INT8_BLOCK_N,), "float32", scope="local")
                dot = T.decl_buffer((INT8_BLOCK_N,), "float32", scope="local")
                xs = T.decl_buffer((1,), "float32", scope="local")
                for lane in T.vectorized(INT8_BLOCK_N):
                    acc[lane] = T.float32(0)
                for g in range(groups):
                    xs[0] = T.float32(0)
                    for lane in T.vectorized(INT8_BLOCK_N):
                        dot[lane] = T.float32(0)
                    for j in range(group_size):
                        xs[0] = xs[0] + x[i, g * group_size + j]
                        for lane in T.vectorized(INT8_BLOCK_N):
                            dot[lane] = dot[lane] + x[i, g * group_size + j] * T.Cast(
                                "float32", w_q[ob, g * group_size + j, lane])
                    for lane in T.vectorized(INT8_BLOCK_N):
                        acc[lane] = (acc[lane] + w_sz[g, 0, ob * INT8_BLOCK_N + lane] * dot[lane]
                                     + w_sz[g, 1, ob * INT8_BLOCK_N + lane] * xs[0])
                for lane in T.vectorized(INT8_BLOCK_N):
                    out[i, ob * INT8_BLOCK_N + lane] = acc[lane]
    return tvm.IRModule({"main": main})
