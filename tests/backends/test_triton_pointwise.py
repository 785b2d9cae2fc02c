"""Triton row/pointwise kernels (norm, rope, activation, quant) against kiln_ref.

Run under TRITON_INTERPRET=1 (as `make test` does) on CPU tensors; on a machine with a
GPU the same tests run the compiled kernels when TRITON_INTERPRET is unset. Inputs are
fresh random values every run; errors are ‖out − ref‖ / ‖ref‖ in float64.
"""
from __future__ import annotations

import pytest
import torch

from kiln.ir import kiln_ref
from kiln.backends.triton import activation, norm, quant, rope
from launches import record_launches
from kernel_checks import DEVICE, DTYPES, TOL, assert_close, randn, rel_err, require_triton

require_triton()

EPS = 1e-6


def codes_for(v: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """kiln_ref's codes of already-scaled values v (x / scale)."""
    v = v.float()
    if qdtype == torch.int8:
        return torch.round(v).clamp(-128, 127).to(torch.int8)
    fmax = kiln_ref.FP8_MAX[qdtype]
    return v.clamp(-fmax, fmax).to(qdtype)


def assert_quant_close(q, scale, ref_q, ref_scale, y_ref, in_dtype):
    """Scales close to the reference's; dequantised values close; codes equal to the
    reference's codes of the unquantised reference values y_ref for the kernel's own
    scale, except where y_ref / scale lies within a few fp32 ulps of a rounding boundary
    (the kernels multiply by 1 / scale; torch divides) and a tiny fraction more, each
    mismatch one step (int8: ±1; fp8: a neighbour).

    The kernel's own scale, because a one-ulp difference in a row's amax (GPU exp/rsqrt
    approximations) moves every code of that row that is near a boundary."""
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    assert rel_err(scale, ref_scale) < TOL[in_dtype]
    deq, ref_deq = q.double() * scale.double(), ref_q.double() * ref_scale.double()
    # One code step apart wherever the kernel's scale and the reference's put a value on
    # either side of a boundary: an fp8 e4m3 step is 1/8 relative (H200, bf16 rows: 1.6e-2).
    step_tol = 1e-2 if q.dtype == torch.int8 else 4e-2
    assert rel_err(deq, ref_deq) < max(TOL[in_dtype], step_tol)
    v = y_ref.double().cpu() / scale.double().cpu()
    a, b = q.cpu().double(), codes_for(v, q.dtype).double()
    up, down = codes_for(v * (1 + 2.0 ** -21), q.dtype), codes_for(v * (1 - 2.0 ** -21), q.dtype)
    near_boundary = up.view(torch.uint8) != down.view(torch.uint8)
    bad = a != b
    n_bad = int((bad & ~near_boundary).sum())
    assert n_bad <= max(2, 1e-3 * q.numel()), f"{n_bad} of {q.numel()} codes differ"
    if q.dtype == torch.int8:
        assert ((a[bad] - b[bad]).abs() <= 1).all()
    else:  # e4m3 has 3 mantissa bits: neighbours differ by at most 1/8 of the larger
        gap = (a[bad] - b[bad]).abs()
        assert (gap <= torch.maximum(a[bad].abs(), b[bad].abs()) / 8 + 2.0 ** -9).all()


# ----------------------------------------------------------------------------- norm

NORM_SHAPES = [(4, 64), (2, 3, 48), (5, 100), (3, 1000), (2, 33000)]  # last: looped rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(dtype, shape):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    assert_close(norm.rms_norm(x, w, EPS), kiln_ref.rms_norm(x, w, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_fused_add_rms_norm(dtype, shape):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    out, summed = norm.fused_add_rms_norm(x, r, w, EPS)
    ref_out, ref_summed = kiln_ref.fused_add_rms_norm(x, r, w, EPS)
    assert_close(out, ref_out, dtype)
    assert_close(summed, ref_summed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_rows_and_mixed_weight(dtype):
    big = randn(6, 3, 160, dtype=dtype)
    x = big[:, :, 16:144]  # row stride 160, last dim contiguous
    w = randn(128, dtype=torch.float32)  # fp32 weight: output promotes to fp32
    out = norm.rms_norm(x, w, EPS)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close(out, kiln_ref.rms_norm(x, w, EPS), dtype)
    xt = randn(64, 5, dtype=dtype).t()  # non-unit column stride: copied
    assert_close(norm.rms_norm(xt, w[:64].to(dtype), EPS),
                 kiln_ref.rms_norm(xt, w[:64].to(dtype), EPS), dtype)
    r = randn(6, 3, 128, dtype=dtype)
    out, summed = norm.fused_add_rms_norm(x, r, w.to(dtype), EPS)
    ref_out, ref_summed = kiln_ref.fused_add_rms_norm(x, r, w.to(dtype), EPS)
    assert_close(out, ref_out, dtype)
    assert_close(summed, ref_summed, dtype)


def test_rms_norm_bad_weight():
    with pytest.raises(ValueError, match="weight shape"):
        norm.rms_norm(randn(2, 8), randn(7), EPS)


# ----------------------------------------------------------------------------- rope

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bhsd", [(2, 4, 5, 16), (1, 40, 3, 64), (2, 3, 7, 96)])
def test_rope_transposed_view(dtype, bhsd):
    B, H, S, D = bhsd
    x = randn(B, S, H, D, dtype=dtype).transpose(1, 2)  # [B, H, S, D], non-contiguous
    assert not x.is_contiguous()
    cos, sin = randn(B, S, D, dtype=dtype), randn(B, S, D, dtype=dtype)
    out = rope.rope(x, cos, sin)
    assert out.is_contiguous()
    assert_close(out, kiln_ref.rope(x, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_broadcast_cos_sin(dtype):
    B, H, S, D = 3, 4, 6, 32
    x = randn(B, H, S, D, dtype=dtype)
    cos, sin = randn(1, S, D, dtype=dtype), randn(1, S, D, dtype=dtype)  # shared by the batch
    assert_close(rope.rope(x, cos, sin), kiln_ref.rope(x, cos, sin), dtype)
    qkv = randn(B, S, 3 * H, D, dtype=dtype)  # k out of a fused qkv: strided heads
    k = qkv[:, :, H:2 * H].transpose(1, 2)
    assert_close(rope.rope(k, cos, sin), kiln_ref.rope(k, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (9, 3), (2, 6)])
def test_rope_pair_one_launch(dtype, heads, monkeypatch):
    """q and k (GQA head counts either way round, strided views of one q/k/v projection)
    rotated in one launch, each equal to its own rope."""
    (hq, hk), B, S, D = heads, 2, 5, 32
    qkv = randn(B, S, hq + 2 * hk, D, dtype=dtype)
    q, k = qkv[:, :, :hq].transpose(1, 2), qkv[:, :, hq:hq + hk].transpose(1, 2)
    cos, sin = randn(1, S, D, dtype=dtype), randn(1, S, D, dtype=dtype)
    launches = record_launches(monkeypatch, rope._rope_pair_kernel)
    out_q, out_k = rope.rope_pair(q, k, cos, sin)
    assert len(launches) == 1
    assert_close(out_q, kiln_ref.rope(q, cos, sin), dtype)
    assert_close(out_k, kiln_ref.rope(k, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_rope_pair_store_writes_the_cache_rows_in_one_launch(dtype, heads, monkeypatch):
    """q rotated, rotated k and v written into cache rows `index` (not consecutive, not in
    order) of caches with a padded row stride; every other cache row keeps its value."""
    (hq, hk), B, S, D, L = heads, 2, 3, 32, 9
    qkv = randn(B, S, hq + 2 * hk, D, dtype=dtype)
    q, k, v = (qkv[:, :, a:b].transpose(1, 2)
               for a, b in ((0, hq), (hq, hq + hk), (hq + hk, hq + 2 * hk)))
    cos, sin = randn(1, S, D, dtype=dtype), randn(1, S, D, dtype=dtype)
    k_cache = randn(B, hk, L, D + 8, dtype=dtype)[..., :D]
    v_cache = randn(B, hk, L, D, dtype=dtype)
    index = torch.tensor([6, 1, 4], device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q, _, _ = kiln_ref.rope_pair_store(q, k, v, cos, sin, want_k, want_v, index)
    launches = record_launches(monkeypatch, rope._rope_pair_store_kernel)
    out_q, out_k, out_v = rope.rope_pair_store(q, k, v, cos, sin, k_cache, v_cache, index)
    assert len(launches) == 1
    assert out_k is k_cache and out_v is v_cache
    assert_close(out_q, want_q, dtype)
    assert_close(k_cache, want_k, dtype)
    assert torch.equal(v_cache, want_v)
    untouched = [r for r in range(L) if r not in index.tolist()]
    assert torch.equal(k_cache[:, :, untouched], want_k[:, :, untouched])


def test_rope_pair_store_rejects_a_cache_of_other_heads():
    q, k = randn(1, 4, 1, 16), randn(1, 2, 1, 16)
    cos = randn(1, 1, 16)
    with pytest.raises(ValueError, match="k_cache must be"):
        rope.rope_pair_store(q, k, k, cos, cos, randn(1, 4, 8, 16), randn(1, 2, 8, 16),
                             torch.tensor([0], device=DEVICE))


# ----------------------------------------------------------------------------- activation

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 32), (2, 3, 100), (3, 5000)])
def test_silu_mul_halves_of_one_tensor(dtype, shape):
    gate_up = randn(*shape[:-1], 2 * shape[-1], dtype=dtype, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = activation.silu_mul(gate, up)
    assert out.is_contiguous() and out.shape == gate.shape
    assert_close(out, kiln_ref.silu_mul(gate, up), dtype)


# ----------------------------------------------------------------------------- quant

# e4m3fnuz is AMD's format: NVIDIA GPUs cannot cast to it (the interpreter and ROCm can).
FP8S = [torch.float8_e4m3fn] + ([torch.float8_e4m3fnuz] if DEVICE == "cpu" or torch.version.hip
                                 else [])
QDTYPES = [torch.int8] + FP8S
QUANT_SHAPES = [(4, 64), (2, 3, 100), (3, 40000)]  # last: looped rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("fp8", FP8S)
def test_quant_fp8(dtype, shape, fp8):
    x = randn(*shape, dtype=dtype, scale=4.0)
    q, scale = quant.quant_fp8(x, None, fp8)
    assert_quant_close(q, scale, *kiln_ref.quant_fp8(x, None, fp8), x, dtype)
    static = torch.tensor([0.021], device=DEVICE)  # some values saturate at ±max
    q, scale = quant.quant_fp8(x, static, fp8)
    ref_q, ref_scale = kiln_ref.quant_fp8(x, static, fp8)
    assert_quant_close(q, scale.expand(*x.shape[:-1], 1), ref_q, ref_scale.expand(*x.shape[:-1], 1),
                       x, dtype)


@pytest.mark.parametrize("fp8", FP8S)
def test_fp8_rounding_exact(fp8):
    """Every representable value, every midpoint (ties to even), just above/below, and
    the subnormals: codes equal torch's bit for bit."""
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[torch.isfinite(grid)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids * (1 + 2 ** -12), mids * (1 - 2 ** -12), grid * 1.2])
    x = x.to(DEVICE).view(1, -1)
    q, _ = quant.quant_fp8(x, torch.ones(1, device=DEVICE), fp8)
    ref_q, _ = kiln_ref.quant_fp8(x, torch.ones(1, device=DEVICE), fp8)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_int8_round_half_to_even():
    halves = torch.arange(-126, 127, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([127.0]), halves, halves + 0.25, -halves - 0.25]).to(DEVICE)
    q, scale = quant.quant_int8(x.view(1, -1))  # amax 127 -> scale exactly 1
    ref_q, ref_scale = kiln_ref.quant_int8(x.view(1, -1))
    assert scale.item() == 1.0
    assert torch.equal(q, ref_q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_quant_int8(dtype, shape):
    x = randn(*shape, dtype=dtype, scale=4.0)
    assert_quant_close(*quant.quant_int8(x), *kiln_ref.quant_int8(x), x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_rms_norm_quant(dtype, shape, qdtype):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    q, scale = quant.rms_norm_quant(x, w, EPS, qdtype)
    assert_quant_close(q, scale, *kiln_ref.rms_norm_quant(x, w, EPS, qdtype),
                       kiln_ref.rms_norm(x, w, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_fused_add_rms_norm_quant(dtype, shape, qdtype):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    q, scale, summed = quant.fused_add_rms_norm_quant(x, r, w, EPS, qdtype)
    ref_q, ref_scale, ref_summed = kiln_ref.fused_add_rms_norm_quant(x, r, w, EPS, qdtype)
    assert_quant_close(q, scale, ref_q, ref_scale,
                       kiln_ref.fused_add_rms_norm(x, r, w, EPS)[0], dtype)
    assert_close(summed, ref_summed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_silu_mul_quant(dtype, shape, qdtype):
    gate_up = randn(*shape[:-1], 2 * shape[-1], dtype=dtype, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    q, scale = quant.silu_mul_quant(gate, up, qdtype)
    assert_quant_close(q, scale, *kiln_ref.silu_mul_quant(gate, up, qdtype),
                       kiln_ref.silu_mul(gate, up), dtype)


def test_quant_rejects_bad_arguments():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="unsupported quantised dtype"):
        quant.rms_norm_quant(x, randn(8), EPS, torch.float16)
    with pytest.raises(ValueError, match="exactly one element"):
        quant.quant_fp8(x, torch.ones(2, device=DEVICE))


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_quant_all_zero_row_keeps_scale_finite(qdtype):
    x = randn(3, 40)
    x[1] = 0.0  # one all-zero row among random ones: its scale is the floor, its codes 0
    q, scale = quant._quant(x, qdtype, None)
    ref_q, ref_scale = kiln_ref.quantize(x, qdtype)
    floor = torch.tensor(kiln_ref.SCALE_FLOOR, dtype=torch.float32).item()
    assert scale[1].item() == ref_scale[1].item() == floor
    assert (q[1].float() == 0).all()
    assert_quant_close(q, scale, ref_q, ref_scale, x, torch.float32)
