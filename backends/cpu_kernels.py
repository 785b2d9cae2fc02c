"""CPU implementations of fused ops where torch or a TVM kernel is faster than the reference.
Each must match its `kiln.ir.kiln_ref` function (tests check).

TVM kernels (`kiln.backends.tvm`) run the ops in `TVM_OPS`, each chosen because it beat
the torch code it replaces at SmolLM2's decode shapes on the machine measured
(bench/cpu_kernels.py; BENCHMARKS.md, "CPU kernels: TVM against torch"); an op left out
lost there and stays torch. A call runs TVM when its operands are what the kernel takes
(float32, contiguous, 64-byte aligned; the GEMVs only at one row of x, the decode shape they were
measured at), else the torch code, as do all of them without the `cpu` extra (one warning) or
with KILN_TVM=0. `kiln.backends.tvm.counts()` counts each call by the path it took
("tvm:rms_norm", "torch:rms_norm:<why>"), so a test can tell which one ran.
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F

from kiln.ir import kiln_ref
from kiln.ir.kiln_ref import visible_keys

from .targets import get_target
from .tvm import build as tvm_build

# The ops whose TVM kernel won against torch (bench/cpu_kernels.py, BENCHMARKS.md). Rotary
# won alone (6.5 against 10.7 us a call) but lost end to end: `kiln generate` of SmolLM2
# with int4 weights decoded at 46-49 tok/s with it on TVM against 62-69 with torch's, for
# reasons not found yet, so torch runs it.
TVM_OPS = frozenset({"rms_norm", "fused_add_rms_norm", "weight_int8_grouped_mm"})
_counts = tvm_build._counts


def _tvm_kernel(op: str, kernel: str, **params):
    """The compiled TVM function, or None (counted, with why) when torch runs `op`."""
    if op not in TVM_OPS:
        _counts[f"torch:{op}:not chosen"] += 1
        return None
    if os.environ.get("KILN_TVM", "1") == "0":
        _counts[f"torch:{op}:KILN_TVM=0"] += 1
        return None
    if not tvm_build.available():
        tvm_build.warn_once("no-tvm", tvm_build.EXTRA_MESSAGE + "; running torch code for the "
                            "CPU's fused ops instead")
        _counts[f"torch:{op}:no tvm"] += 1
        return None
    _counts[f"tvm:{op}"] += 1
    return tvm_build.get(kernel, params)


# TVM's LLVM code assumes every buffer starts on a 64-byte boundary (its allocator's
# alignment) and loads it with aligned vector moves; a tensor that does not (a view at an
# odd offset) would fault, so torch runs it. The cpu target declares the boundary, and
# the pass prepare.align copies the weight vectors fused ops read onto it once.
TVM_ALIGNMENT = get_target("cpu").weight_alignment


def _aligned(*ts) -> bool:
    return all(t.is_contiguous() and t.device.type == "cpu" and t.data_ptr() % TVM_ALIGNMENT == 0
               for t in ts)


def _fp32(*ts) -> bool:
    return all(t.dtype == torch.float32 for t in ts) and _aligned(*ts)


def _operands(op: str, ok: bool) -> bool:
    if not ok:
        _counts[f"torch:{op}:operands"] += 1
    return ok


def rms_norm(x, weight, eps):
    """kiln.rms_norm: a TVM kernel for float32 rows (kiln_ref's torch code otherwise)."""
    if _operands("rms_norm", _fp32(x, weight) and x.dim() >= 2 and weight.dim() == 1):
        fn = _tvm_kernel("rms_norm", "rms_norm", rank=x.dim(), d=x.shape[-1], eps=float(eps))
        if fn is not None:
            out = torch.empty_like(x)
            fn(x, weight, out)
            return out
    return kiln_ref.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    """kiln.fused_add_rms_norm: (rms_norm(residual + x), residual + x) in one TVM kernel."""
    if _operands("fused_add_rms_norm", _fp32(x, residual, weight) and x.dim() >= 2
                 and x.shape == residual.shape and weight.dim() == 1):
        fn = _tvm_kernel("fused_add_rms_norm", "fused_add_rms_norm", rank=x.dim(),
                         d=x.shape[-1], eps=float(eps))
        if fn is not None:
            out, summed = torch.empty_like(x), torch.empty_like(x)
            fn(x, residual, weight, out, summed)
            return out, summed
    return kiln_ref.fused_add_rms_norm(x, residual, weight, eps)


def rope(x, cos, sin):
    """kiln.rope: x [B, H, S, D] with cos, sin [B, S, D]. A decode step's q and k are views
    of the projection's output that are contiguous where their sizes are not 1 (S = 1), so
    they go in without a copy; a prefill's permuted q runs torch's code."""
    if _operands("rope", _fp32(x, cos, sin) and x.dim() == 4 and cos.dim() == 3
                 and cos.shape == sin.shape == (x.shape[0], x.shape[2], x.shape[3])
                 and x.shape[3] % 2 == 0):
        fn = _tvm_kernel("rope", "rope", d=x.shape[-1])
        if fn is not None:
            out = torch.empty(x.shape, dtype=x.dtype)
            fn(x, cos, sin, out)
            return out
    return kiln_ref.rope(x, cos, sin)


def silu_mul(gate, up):
    """kiln.silu_mul: silu(gate) * up."""
    if _operands("silu_mul", _fp32(gate, up) and gate.shape == up.shape and gate.dim() >= 2):
        fn = _tvm_kernel("silu_mul", "silu_mul", rank=gate.dim(), d=gate.shape[-1])
        if fn is not None:
            out = torch.empty_like(gate)
            fn(gate, up, out)
            return out
    return kiln_ref.silu_mul(gate, up)


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
    """kiln.weight_int8_mm (per output channel) through torch's int8-weight CPU GEMM, which
    dequantises in registers: it reads a quarter of fp32's weight bytes, and decode on a CPU
    is bound by them. Its bf16-activation path is the vectorised one (SmolLM2's projections
    at one token on 2 cores: 6-26 us against 100-530 us with fp32 activations, 16-86 us for
    fp32 weights), so x goes in as bf16; the products accumulate in fp32. (A TVM GEMV over
    this layout, lanes along K, lost to it 3-7x; the grouped layout below is TVM's.)"""
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), w_q, w_scale.reshape(-1).to(torch.bfloat16))
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype)


# Rows of x up to which the grouped int8 GEMV runs on TVM: a decode step's one token per
# sequence, a speculative verify's few. Past them the rows are compute-bound and torch's
# fp32 GEMM over the dequantised weight is faster.
INT8_GROUPED_TVM_ROWS = 8


def weight_int8_grouped_mm(x, w_q, w_sz, bias):
    """kiln.weight_int8_grouped_mm: TVM's GEMV (float32 x, the weight's codes widened in
    registers) for up to INT8_GROUPED_TVM_ROWS rows, else torch's GEMM over the weight
    dequantised for the call (kiln_ref's). Both keep x in float32."""
    k = w_q.shape[1]
    n = w_q.shape[0] * w_q.shape[2]
    if x.dim() == 2 and x.shape[0] > INT8_GROUPED_TVM_ROWS:
        _counts["torch:weight_int8_grouped_mm:rows"] += 1
    elif _operands("weight_int8_grouped_mm", x.dim() == 2 and _fp32(x, w_sz) and _aligned(w_q)):
        fn = _tvm_kernel("weight_int8_grouped_mm", "weight_int8_grouped_mv", k=k, n=n,
                         group_size=k // w_sz.shape[0])
        if fn is not None:
            y = torch.empty(x.shape[0], n)
            fn(x, w_q, w_sz, y)
            return y if bias is None else y + bias.float()
    return kiln_ref.weight_int8_grouped_mm(x, w_q, w_sz, bias)


def quant_int4(w, group_size=32, scale_dtype=torch.float32):
    """kiln.quant_int4: kiln's int4 layout, whatever this machine's torch packs (see
    torch_int4_layout)."""
    why = kiln_ref.int4_fits(w.shape[0], w.shape[1], group_size)
    if why is not None:
        raise ValueError(f"kiln.quant_int4: weight {tuple(w.shape)}: {why}")
    codes, scale, zero = kiln_ref.int4_codes(w, group_size)
    w_sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(scale_dtype)
    return kiln_ref.int4_pack(codes), w_sz


@functools.cache
def torch_packs_kiln_int4_layout() -> bool:
    """Whether this torch's CPU int4 packing is kiln's layout. It is chosen by the CPU
    torch dispatches to: AVX-512 interleaves blocks of 64 output rows (kiln's layout), AVX2
    blocks of 32, plain C++ adjacent rows; so the same weight packs to different bytes on
    different machines (and ATEN_CPU_CAPABILITY)."""
    codes = torch.arange(kiln_ref.INT4_BLOCK_N * 2, dtype=torch.int32).reshape(-1, 2) % 16
    return torch.equal(torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                       kiln_ref.int4_pack(codes.to(torch.uint8)))


# w_q (kiln's layout) -> its bytes in torch's layout, on machines where the two differ;
# dropped with w_q. Prepared weights live as long as the compiled graph, so each weight is
# repacked once, on its first call.
_repacked: dict[int, torch.Tensor] = {}


def torch_int4_layout(w_q: torch.Tensor) -> torch.Tensor:
    """w_q in the layout torch's CPU int4 GEMM reads on this machine."""
    if torch_packs_kiln_int4_layout():
        return w_q
    key = id(w_q)
    packed = _repacked.get(key)
    if packed is None:
        packed = torch._convert_weight_to_int4pack_for_cpu(
            kiln_ref.int4_unpack(w_q).to(torch.int32), 1)
        _repacked[key] = packed
        weakref.finalize(w_q, _repacked.pop, key, None)
    return packed


def weight_int4_mm(x, w_q, w_sz, bias, group_size=32):
    """kiln.weight_int4_mm: TVM's GEMV at one row of float32 x when chosen (TVM_OPS), else
    weight_int4_mm_torch. TVM's keeps x in float32 (no bf16 halves), so it is also the
    more exact of the two."""
    n, k = w_q.shape[0], w_q.shape[1] * 2
    if _operands("weight_int4_mm", x.dim() == 2 and x.shape[0] == 1 and _fp32(x)
                 and _aligned(w_q, w_sz) and k % 64 == 0 and n % 64 == 0
                 and w_sz.dtype in (torch.float32, torch.bfloat16)):
        fn = _tvm_kernel("weight_int4_mm", "weight_int4_mv", k=k, n=n, group_size=group_size,
                         scale_dtype=str(w_sz.dtype).split(".")[-1])
        if fn is not None:
            y = torch.empty(1, n)
            fn(x, w_q, w_sz, y)
            return y if bias is None else y + bias.float()
    return weight_int4_mm_torch(x, w_q, w_sz, bias, group_size)


def weight_int4_mm_torch(x, w_q, w_sz, bias, group_size=32):
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
    w_q = torch_int4_layout(w_q)
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
