"""Triton fused MoE and quantised GEMM against kiln_ref.fused_moe / kiln_ref.scaled_mm.

Run under TRITON_INTERPRET=1 (as `make test` does) on CPU tensors; with a GPU and
TRITON_INTERPRET unset the same tests run the compiled kernels (and bf16 too). Inputs are
fresh random values every run; errors are ‖out − ref‖ / ‖ref‖ in float64. The
interpreter handles fp8 tensors (it decodes e4m3fn and e4m3fnuz bit patterns itself), so
the fp8 GEMM path runs for real here, numerics included.
"""
from __future__ import annotations

import pytest
import torch

from kiln.ir import kiln_ref
from kiln.backends.triton import gemm, moe
from kiln.backends.triton.gemm import GemmConfig
from kiln.backends.triton.moe import MoeConfig
from kernel_checks import DEVICE, DTYPES, assert_close, require_triton

require_triton()

# fp8 e4m3fnuz is the AMD flavour: the interpreter runs it; NVIDIA GPUs have no such type.
FP8 = [torch.float8_e4m3fn] + ([torch.float8_e4m3fnuz] if DEVICE == "cpu" else [])
# The interpreter sums fp8 products in fp32 like the reference (1e-5). Hopper's fp8 tensor
# cores sum each K tile in reduced precision before the kernel adds it in fp32 (cuBLAS
# without fast accumulation does the same; both measured 1.3e-4 at K = 4096 on an H100).
FP8_F32_TOL = 1e-5 if DEVICE == "cpu" else 1e-3
SMALL_MOE = MoeConfig(16, 32, 32, 4, 1)


def mm_tol(qdtype):
    return FP8_F32_TOL if qdtype != torch.int8 else None


def moe_inputs(t, h, i, e, dtype, unused=()):
    x = torch.randn(t, h, device=DEVICE).to(dtype)
    logits = torch.randn(t, e, device=DEVICE)
    for u in unused:  # these experts never make anyone's top-k
        logits[:, u] = -30.0
    w_gate_up = (torch.randn(e, 2 * i, h, device=DEVICE) / h ** 0.5).to(dtype)
    w_down = (torch.randn(e, h, i, device=DEVICE) / i ** 0.5).to(dtype)
    return x, logits, w_gate_up, w_down


# --------------------------------------------------------------------------- fused_moe

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_moe_top2(dtype, renormalize):
    """6 experts, top-2, two of them receiving no tokens; H and I not multiples of the
    tiles (ragged N and K edges); groups of 1..n tokens padded to 16-row blocks."""
    x, logits, wgu, wd = moe_inputs(13, 72, 40, 6, dtype, unused=(1, 4))
    out = moe.fused_moe(x, logits, wgu, wd, 2, renormalize, config=SMALL_MOE)
    assert_close(out, kiln_ref.fused_moe(x, logits, wgu, wd, 2, renormalize), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_default_tiles_top1_and_decode(dtype):
    x, logits, wgu, wd = moe_inputs(5, 64, 32, 4, dtype)
    for top_k, renorm in ((1, False), (3, True)):
        out = moe.fused_moe(x, logits, wgu, wd, top_k, renorm)
        assert_close(out, kiln_ref.fused_moe(x, logits, wgu, wd, top_k, renorm), dtype)
    # One token (decode): only top_k experts have work; all other blocks are idle.
    out = moe.fused_moe(x[:1], logits[:1], wgu, wd, 2, True)
    assert_close(out, kiln_ref.fused_moe(x[:1], logits[:1], wgu, wd, 2, True), dtype)


def test_fused_moe_strided_input_and_weights():
    """x as a column slice of a wider tensor (row stride != H) and transposed-then-back
    weights (a non-contiguous layout that the launcher copies)."""
    base, logits, wgu, wd = moe_inputs(9, 96, 24, 5, torch.float32)
    x = base[:, 16:80]
    wgu = wgu[:, :, :64]
    wd = wd[:, :64].transpose(1, 2).contiguous().transpose(1, 2)
    out = moe.fused_moe(x, logits, wgu, wd, 2, False, config=SMALL_MOE)
    assert_close(out, kiln_ref.fused_moe(x, logits, wgu, wd, 2, False), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_moe_align_invariants(impl):
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 2]], device=DEVICE)
    slots, block_expert = moe.moe_align(ids, 5, 4, impl=impl)
    n = ids.numel()
    slots, block_expert = slots.cpu(), block_expert.cpu()
    # Experts 0 (2 slots), 2 (4 slots), 3 (2 slots): one 4-row block each; 1 and 4 none.
    assert block_expert.tolist()[:3] == [0, 2, 3] and (block_expert[3:] == -1).all()
    assert slots[:12].tolist() == [1, 4, n, n, 0, 2, 5, 7, 3, 6, n, n]
    assert (slots[12:] == n).all()


def test_moe_align_kernel_matches_torch():
    """Random routing, 40 experts (padded to 64 in the kernel), several chunks of slots."""
    ids = torch.randint(0, 40, (150, 4), device=DEVICE)
    ids[:, 0] = 7  # one crowded expert spanning many blocks
    for block_m in (16, 64):
        a = moe.moe_align(ids, 40, block_m, impl="triton")
        b = moe.moe_align(ids, 40, block_m, impl="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fused_moe_errors():
    x, logits, wgu, wd = moe_inputs(3, 32, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        moe.fused_moe(x, logits, wgu, wd, 5, False)
    with pytest.raises(ValueError, match="agree"):
        moe.fused_moe(x, logits, wgu, wd[:, :, :8], 2, False)


# --------------------------------------------------------------------------- scaled_mm

def quantized(m, n, k, qdtype):
    a, a_scale = kiln_ref.quantize(torch.randn(m, k, device=DEVICE), qdtype)
    b, b_scale = kiln_ref.quantize_weight(torch.randn(n, k, device=DEVICE), qdtype)
    return a, a_scale, b, b_scale


OUT_DTYPES = DTYPES   # scaled_mm's output dtypes: those the kernels are checked at


@pytest.mark.parametrize("qdtype", [torch.int8] + FP8)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_scaled_mm_per_channel_bias(qdtype, out_dtype):
    """M, N, K not multiples of the (small) tiles: ragged edges and a masked K tail."""
    a, a_scale, b, b_scale = quantized(37, 45, 80, qdtype)
    bias = torch.randn(45, device=DEVICE).to(out_dtype)
    cfg = GemmConfig(16, 16, 32, 2, 4, 1)
    out = gemm.scaled_mm(a, a_scale, b, b_scale, bias, out_dtype, config=cfg)
    assert_close(out, kiln_ref.scaled_mm(a, a_scale, b, b_scale, bias, out_dtype), out_dtype,
                 mm_tol(qdtype))


@pytest.mark.parametrize("qdtype", [torch.int8] + FP8)
def test_scaled_mm_per_tensor_default_tiles(qdtype):
    """A one-element weight scale (static fp8 / per-tensor), no bias, default tile table
    (K = 256 divides the 256/128-wide K tiles: the unmasked loop)."""
    a, a_scale, b, _ = quantized(9, 40, 256, qdtype)
    b_scale = torch.rand(1, device=DEVICE) + 0.5
    for m in (9, 70):
        a, a_scale = kiln_ref.quantize(torch.randn(m, 256, device=DEVICE), qdtype)
        out = gemm.scaled_mm(a, a_scale, b, b_scale, None, torch.float32)
        assert_close(out, kiln_ref.scaled_mm(a, a_scale, b, b_scale, None, torch.float32),
                     torch.float32, mm_tol(qdtype))


def test_scaled_mm_fp8_fast_accum():
    a, a_scale, b, b_scale = quantized(24, 40, 128, torch.float8_e4m3fn)
    out = gemm.scaled_mm(a, a_scale, b, b_scale, None, torch.float32, fast_accum=True,
                         config=GemmConfig(16, 16, 32, 2, 4, 1))
    ref = kiln_ref.scaled_mm(a, a_scale, b, b_scale, None, torch.float32)
    assert_close(out, ref, torch.float32, 1e-5 if DEVICE == "cpu" else 1e-2)


def test_scaled_mm_int8_accumulates_exactly():
    """Extreme int8 codes over a long K: int32 accumulation is exact where fp16 would not be."""
    k = 512
    a = torch.full((16, k), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((16, k), 127, dtype=torch.int8, device=DEVICE)
    b[:, ::2] = -127
    ones = torch.ones(16, 1, device=DEVICE)
    out = gemm.scaled_mm(a, ones, b, ones, None, torch.float32,
                         config=GemmConfig(16, 16, 64, 1, 4, 1))
    assert (out == 0).all()
    out = gemm.scaled_mm(a, ones, b.abs(), ones, None, torch.float32)
    assert (out == -128 * 127 * k).all()


def test_scaled_mm_strided_and_errors():
    a, a_scale, b, b_scale = quantized(20, 24, 64, torch.int8)
    wide = torch.zeros(20, 96, dtype=torch.int8, device=DEVICE)
    wide[:, 16:80] = a
    out = gemm.scaled_mm(wide[:, 16:80], a_scale, b, b_scale, None, torch.float32)
    assert_close(out, kiln_ref.scaled_mm(a, a_scale, b, b_scale, None, torch.float32),
                 torch.float32)
    with pytest.raises(ValueError, match="same fp8|int8"):
        gemm.scaled_mm(a, a_scale, b.float(), b_scale)
    with pytest.raises(ValueError, match="b_scale"):
        gemm.scaled_mm(a, a_scale, b, b_scale[:3])


def test_aot_specs_are_well_formed():
    specs = moe.AOT_SPECS + gemm.AOT_SPECS
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        assert set(spec.signature) == set(spec.fn.arg_names)
    assert any("fp8e4m3_" in n for n in names) and any("int8" in n for n in names)
    assert any(n.startswith("moe_align") for n in names)
