"""Small-M matmul with a fused prologue (backends/triton/gemv.py) against the unfused ops.

Each launcher is compared with kiln_ref's rms_norm / fused_add_rms_norm / silu_mul followed
by torch.mm, all in the same dtype: what an unfused kiln graph computes. Run under
TRITON_INTERPRET=1 (as `make test` does) on CPU tensors; on a machine with a GPU the same
tests run the compiled kernels (bf16 too) when TRITON_INTERPRET is unset. Inputs are fresh
random values every run; errors are ‖out − ref‖ / ‖ref‖ in float64. A norm bound alone
cannot see a missing rounding step in fp16 (it moves values by 2^-11), so
`test_prologue_rounds_like_torch` reads the prologue out bit for bit through b = columns of
the identity, and checks that its check rejects the unrounded alternatives.
"""
from __future__ import annotations

import pytest
import torch

from kiln.ir import kiln_ref
from kiln.backends.triton import gemv
from launches import record_launches
from kernel_checks import DEVICE, DTYPES, assert_close, randn, require_triton

require_triton()


@pytest.fixture(autouse=True)
def fused_at_every_m(monkeypatch):
    """The kernel at every M it takes (the launchers' own choice for M > 1 is the unfused
    pair: see the last test)."""
    monkeypatch.setattr(gemv, "FUSED_MAX_M", gemv.MAX_M)


HALF_DTYPES = [d for d in DTYPES if d != torch.float32]
EPS = 1e-6
G = gemv.GemvConfig


def weight(k: int, n: int, dtype, layout: str) -> torch.Tensor:
    """b [K, N] as kiln graphs pass it: "permuted" = W.permute(1, 0) of an nn.Linear weight
    W [N, K] (stride (1, K)); "contiguous" = a plain [K, N]; "strided" = every other column
    of a [K, 2N] (strides (2N, 2)); "sliced" = columns 3..N+3 of a permuted [N + 6, K]."""
    scale = k ** -0.5
    if layout == "permuted":
        return randn(n, k, dtype=dtype, scale=scale).permute(1, 0)
    if layout == "contiguous":
        return randn(k, n, dtype=dtype, scale=scale)
    if layout == "strided":
        return randn(k, 2 * n, dtype=dtype, scale=scale)[:, ::2]
    if layout == "sliced":
        return randn(n + 6, k, dtype=dtype, scale=scale).permute(1, 0)[:, 3:n + 3]
    raise AssertionError(layout)


# (M, K, N): K and N not multiples of the block sizes; K = 576 takes two K chunks at M > 1.
# SmolLM2's N = 1536 on a GPU; under the interpreter, which runs every program in numpy,
# N = 200 (several column blocks still), ~7x less of the CPU suite's time.
N_LARGE = 1536 if DEVICE == "cuda" else 200
SHAPES = [(1, 96, 40), (3, 96, 40), (16, 96, 40), (1, 576, N_LARGE), (16, 576, N_LARGE)]
LAYOUTS = ["permuted", "contiguous"]


def ref_rms_norm_mm(x, w, b):
    return kiln_ref.rms_norm(x, w, EPS).reshape(-1, x.shape[-1]) @ b


def ref_silu_mul_mm(gate, up, b):
    return kiln_ref.silu_mul(gate, up).reshape(-1, gate.shape[-1]) @ b


# ----------------------------------------------------------------------------- rms_norm_mm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mkn", SHAPES)
def test_rms_norm_mm(dtype, layout, mkn):
    m, k, n = mkn
    x, w, b = randn(m, k, dtype=dtype), randn(k, dtype=dtype), weight(k, n, dtype, layout)
    y = gemv.rms_norm_mm(x, w, b, EPS)
    assert y.shape == (m, n) and y.is_contiguous()
    assert_close(y, ref_rms_norm_mm(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_mm_m64_strided_rows_and_b(dtype):
    """M = MAX_M, x rows with a stride (a column slice), b with strides (2N, 2) and a
    slice of a permuted weight (an offset base pointer)."""
    x = randn(64, 128, dtype=dtype)[:, 16:112]
    w = randn(96, dtype=dtype)
    for layout in ("strided", "sliced"):
        b = weight(96, 40, dtype, layout)
        assert_close(gemv.rms_norm_mm(x, w, b, EPS), ref_rms_norm_mm(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_mm_3d_x(dtype):
    x, w, b = randn(1, 1, 96, dtype=dtype), randn(96, dtype=dtype), weight(96, 40, dtype, "permuted")
    y = gemv.rms_norm_mm(x, w, b, EPS)
    assert y.shape == (1, 40)
    assert_close(y, ref_rms_norm_mm(x, w, b), dtype)


# Both paths with several K chunks (even and masked) and N tails, whatever the table picks.
CONFIGS = [G(1, 16, 32, 4, 2), G(1, 4, 64, 2, 1), G(16, 16, 32, 4, 2), G(32, 32, 64, 4, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("k", [96, 100])
def test_explicit_configs(dtype, cfg, k):
    m = 1 if cfg.block_m == 1 else 3
    x, r, w = randn(m, k, dtype=dtype), randn(m, k, dtype=dtype), randn(k, dtype=dtype)
    b = weight(k, 40, dtype, "permuted")
    assert_close(gemv.rms_norm_mm(x, w, b, EPS, config=cfg), ref_rms_norm_mm(x, w, b), dtype)
    y, h = gemv.fused_add_rms_norm_mm(x, r, w, b, EPS, config=cfg)
    assert torch.equal(h, r + x)
    assert_close(y, ref_rms_norm_mm(r + x, w, b), dtype)
    g, u = randn(m, k, dtype=dtype), randn(m, k, dtype=dtype)
    assert_close(gemv.silu_mul_mm(g, u, b, config=cfg), ref_silu_mul_mm(g, u, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass1_max_k", [16, 32])
def test_first_pass_in_several_chunks(dtype, pass1_max_k, monkeypatch):
    """The rms prologues' first pass takes one chunk of up to PASS1_MAX_K (4096) elements;
    hidden sizes past it take several, the last one masked (K = 100)."""
    monkeypatch.setattr(gemv, "PASS1_MAX_K", pass1_max_k)
    cfg = G(1, 8, 16, 4, 2)
    assert gemv.pass1_block(cfg, 100) == pass1_max_k
    x, r, w = randn(1, 100, dtype=dtype), randn(1, 100, dtype=dtype), randn(100, dtype=dtype)
    b = weight(100, 40, dtype, "permuted")
    assert_close(gemv.rms_norm_mm(x, w, b, EPS, config=cfg), ref_rms_norm_mm(x, w, b), dtype)
    y, h = gemv.fused_add_rms_norm_mm(x, r, w, b, EPS, config=cfg)
    assert torch.equal(h, r + x)
    assert_close(y, ref_rms_norm_mm(r + x, w, b), dtype)


# ----------------------------------------------------------------------------- fused_add

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mkn", SHAPES)
def test_fused_add_rms_norm_mm(dtype, layout, mkn):
    m, k, n = mkn
    x, r, w = randn(m, k, dtype=dtype), randn(m, k, dtype=dtype), randn(k, dtype=dtype)
    b = weight(k, n, dtype, layout)
    y, h = gemv.fused_add_rms_norm_mm(x, r, w, b, EPS)
    ref_normed, ref_h = kiln_ref.fused_add_rms_norm(x, r, w, EPS)
    assert h.shape == x.shape and h.is_contiguous() and h.dtype == dtype
    assert torch.equal(h, ref_h)  # one rounding of the same fp32 sum
    assert_close(y, ref_normed @ b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_mm_3d_and_m64(dtype):
    w, b = randn(96, dtype=dtype), weight(96, 40, dtype, "permuted")
    for shape in ((1, 1, 96), (64, 96)):
        x, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
        y, h = gemv.fused_add_rms_norm_mm(x, r, w, b, EPS)
        ref_normed, ref_h = kiln_ref.fused_add_rms_norm(x, r, w, EPS)
        assert h.shape == shape and torch.equal(h, ref_h)
        assert y.shape == (ref_h.numel() // 96, 40)
        assert_close(y, ref_normed.reshape(-1, 96) @ b, dtype)


# ----------------------------------------------------------------------------- silu_mul_mm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mkn", SHAPES)
def test_silu_mul_mm_halves_of_one_tensor(dtype, layout, mkn):
    """gate and up are the column halves of one [M, 2I] projection (row stride 2I)."""
    m, i, n = mkn
    gu = randn(m, 2 * i, dtype=dtype)
    gate, up = gu[:, :i], gu[:, i:]
    b = weight(i, n, dtype, layout)
    y = gemv.silu_mul_mm(gate, up, b)
    assert y.shape == (m, n) and y.is_contiguous()
    assert_close(y, ref_silu_mul_mm(gate, up, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_mm_separate_3d_and_m64(dtype):
    b = weight(96, 40, dtype, "sliced")
    for shape in ((1, 1, 96), (64, 96)):
        gate, up = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
        assert_close(gemv.silu_mul_mm(gate, up, b), ref_silu_mul_mm(gate, up, b), dtype)


# ----------------------------------------------------------------------------- rounding

def bits_mismatch(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(fraction of elements whose bits differ, largest distance in units in the last
    place) between two 16-bit float tensors. -0.0 counts as +0.0: the prologue gives -0.0
    for weight * 0 (x == -residual is common in fp16) and the dot's sum turns it into +0.0,
    as any matmul would."""
    def bits(t):
        t = t.cpu().contiguous()
        return torch.where(t == 0, torch.zeros_like(t), t).view(torch.int16).int()
    a, b = bits(out), bits(ref)
    return (a != b).float().mean().item(), int((a - b).abs().max())


def wrong_prologues(kind, x, r, w):
    """What a kernel that skipped one of torch's roundings would compute."""
    dt = x.dtype
    if kind == "rms":  # normalised row kept in fp32 before the weight
        xf = x.float()
        return [(w.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dt)]
    if kind == "add":  # the sum kept in fp32
        hf = r.float() + x.float()
        normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dt)
        return [w * normed]
    # silu: silu kept in fp32; or the product computed from an fp32 silu and rounded once
    return [(torch.nn.functional.silu(x.float()) * r.float()).to(dt)]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kind", ["rms", "add", "silu"])
@pytest.mark.parametrize("m", [1, 5])
def test_prologue_rounds_like_torch(dtype, kind, m):
    """With b = columns of the identity, y is the prologue itself (one product per output,
    exact in fp32): it must equal the unfused ops' output bit for bit, except where the last
    fp32 bit of an rsqrt or exp moves a value across a rounding boundary (at most 0.3% of
    the values in 300 seeds; one ulp there, two after the next rounding). The same check
    must reject a prologue that skips any of torch's intermediate roundings (23-30%)."""
    k = 256
    cols = torch.randperm(k)[:200]
    b = torch.eye(k, dtype=dtype)[cols].to(DEVICE).permute(1, 0)   # [K, 200], stride (1, K)
    x, r, w = randn(m, k, dtype=dtype), randn(m, k, dtype=dtype), randn(k, dtype=dtype)
    if kind == "rms":
        y = gemv.rms_norm_mm(x, w, b, EPS)
        ref = kiln_ref.rms_norm(x, w, EPS)
    elif kind == "add":
        y, _ = gemv.fused_add_rms_norm_mm(x, r, w, b, EPS)
        ref = kiln_ref.fused_add_rms_norm(x, r, w, EPS)[0]
    else:
        y = gemv.silu_mul_mm(x, r, b)
        ref = kiln_ref.silu_mul(x, r)
    frac, ulps = bits_mismatch(y, ref[:, cols])
    assert frac <= 0.01 and ulps <= 2, f"{frac:.2%} of values differ, by up to {ulps} ulp"
    for wrong in wrong_prologues(kind, x, r, w):
        wrong_frac, _ = bits_mismatch(wrong[:, cols], ref[:, cols])
        assert wrong_frac > 0.05, f"the check cannot see this rounding ({wrong_frac:.2%})"


# ----------------------------------------------------------------------------- mm (no prologue)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["strided", "sliced"])
@pytest.mark.parametrize("mkn", SHAPES)
def test_mm(dtype, layout, mkn):
    m, k, n = mkn
    x, b = randn(m, k, dtype=dtype), weight(k, n, dtype, layout)
    y = gemv.mm(x, b)
    assert y.shape == (m, n) and y.is_contiguous()
    assert_close(y, x @ b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_mm_explicit_configs_and_strided_rows(dtype, cfg):
    m = 1 if cfg.block_m == 1 else 3
    x = randn(m, 128, dtype=dtype)[:, 14:114]            # K = 100: a masked last chunk
    b = weight(100, 40, dtype, "permuted")
    assert_close(gemv.mm(x, b, config=cfg), x @ b, dtype)


# ----------------------------------------------------------------------------- launches, table

@pytest.mark.parametrize("m", [1, 16])
def test_one_launch_reading_the_weight_once(m, monkeypatch):
    """One launch per call, one program per BLOCK_N columns holding every row."""
    launches = record_launches(monkeypatch, gemv._gemv_kernel)
    x, r, w = randn(m, 96), randn(m, 96), randn(96)
    b = weight(96, 40, torch.float32, "permuted")
    gemv.rms_norm_mm(x, w, b, EPS)
    gemv.fused_add_rms_norm_mm(x, r, w, b, EPS)
    gemv.silu_mul_mm(x, r, b)
    gemv.mm(x, b)
    cfg = gemv.gemv_config(m, 40, 96)
    assert cfg.block_m >= m
    assert launches == [(-(-40 // cfg.block_n),)] * 4


def test_config_table():
    assert gemv.MAX_M == 64
    for m in range(1, gemv.MAX_M + 1):
        for n, k in ((576, 576), (4096, 14336), (28672, 4096)):
            cfg = gemv.gemv_config(m, n, k)
            assert cfg.block_m >= m and cfg.block_k <= max(16, 2 * k)
            assert cfg.block_m == 1 or min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16
    assert gemv.gemv_config(1, 40, 96).block_k == 128      # BLOCK_K no longer than K needs
    with pytest.raises(ValueError, match="exceeds MAX_M"):
        gemv.gemv_config(65, 4096, 4096)


def test_empty_dims():
    w, b = randn(96), weight(96, 40, torch.float32, "permuted")
    assert gemv.rms_norm_mm(randn(0, 96), w, b, EPS).shape == (0, 40)
    x, r = randn(2, 96), randn(2, 96)
    y, h = gemv.fused_add_rms_norm_mm(x, r, w, b[:, :0], EPS)
    assert y.shape == (2, 0) and torch.equal(h, r + x)


# ----------------------------------------------------------------------------- errors

def test_errors():
    f16, f32 = torch.float16, torch.float32
    x, w, b = randn(2, 96), randn(96), weight(96, 40, f32, "permuted")
    with pytest.raises(ValueError, match="K mismatch"):
        gemv.rms_norm_mm(x, w, weight(64, 40, f32, "permuted"), EPS)
    with pytest.raises(ValueError, match=r"b must be \[K, N\]"):
        gemv.rms_norm_mm(x, w, b[None], EPS)
    with pytest.raises(ValueError, match="dtype mismatch: b is torch.float16"):
        gemv.rms_norm_mm(x, w, b.to(f16), EPS)
    with pytest.raises(ValueError, match="dtype mismatch: norm_weight"):
        gemv.rms_norm_mm(x, w.to(f16), b, EPS)
    with pytest.raises(ValueError, match="norm_weight shape"):
        gemv.rms_norm_mm(x, w[:64], b, EPS)
    with pytest.raises(ValueError, match="not supported"):
        gemv.rms_norm_mm(x.double(), w.double(), b.double(), EPS)
    with pytest.raises(ValueError, match="at least one dimension"):
        gemv.rms_norm_mm(x[0, 0], w, b, EPS)
    with pytest.raises(ValueError, match="residual shape"):
        gemv.fused_add_rms_norm_mm(x, randn(3, 96), w, b, EPS)
    with pytest.raises(ValueError, match="dtype mismatch: residual"):
        gemv.fused_add_rms_norm_mm(x, x.to(f16), w, b, EPS)
    with pytest.raises(ValueError, match="gate shape"):
        gemv.silu_mul_mm(x, randn(3, 96), b)
    with pytest.raises(ValueError, match="dtype mismatch: up"):
        gemv.silu_mul_mm(x, x.to(f16), b)
    with pytest.raises(ValueError, match="K mismatch"):
        gemv.silu_mul_mm(randn(2, 64), randn(2, 64), b)
    with pytest.raises(ValueError, match="block_m 16 < M = 17"):
        gemv.rms_norm_mm(randn(17, 96), w, b, EPS, config=G(16, 16, 32, 4, 2))
    with pytest.raises(ValueError, match=">= 16"):
        gemv.rms_norm_mm(x, w, b, EPS, config=G(16, 8, 32, 4, 2))
    with pytest.raises(ValueError, match="powers of two"):
        gemv.rms_norm_mm(x, w, b, EPS, config=G(16, 24, 32, 4, 2))


@pytest.mark.parametrize("m", [2, gemv.MAX_M + 3])
def test_more_rows_than_the_kernel_pays_for_run_the_unfused_pair(monkeypatch, m):
    """Each launcher implements its kiln op for any M: above FUSED_MAX_M (1) rows, kiln's
    norm or activation kernel and torch.mm, never the gemv kernel."""
    monkeypatch.setattr(gemv, "FUSED_MAX_M", 1)
    launches = record_launches(monkeypatch, gemv._gemv_kernel)
    x, r, w, b = randn(m, 96), randn(m, 96), randn(96), weight(96, 40, torch.float32, "permuted")
    torch.testing.assert_close(gemv.rms_norm_mm(x, w, b, EPS),
                               kiln_ref.rms_norm_mm(x, w, b, EPS), rtol=1e-5, atol=1e-5)
    y, h = gemv.fused_add_rms_norm_mm(x, r, w, b, EPS)
    want_y, want_h = kiln_ref.fused_add_rms_norm_mm(x, r, w, b, EPS)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(gemv.silu_mul_mm(x, r, b), kiln_ref.silu_mul_mm(x, r, b),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemv.mm(x, b), kiln_ref.mm(x, b), rtol=1e-5, atol=1e-5)
    assert launches == []
