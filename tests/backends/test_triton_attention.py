"""Triton attention (prefill and flash-decoding paths) against kiln_ref.attention.

Run under TRITON_INTERPRET=1 (as `make test` does) on CPU tensors; with a GPU and
TRITON_INTERPRET unset the same tests run the compiled kernels (and bf16 too). Inputs are
fresh random values every run; errors are ‖out − ref‖ / ‖ref‖ in float64. Shapes are tiny
and most tests force small tiles (16 x 16) so that a handful of rows and keys still spans
several query blocks, KV tiles and decode partitions.
"""
from __future__ import annotations

import math

import pytest
import torch

from kiln.ir import kiln_ref
from kiln.backends.triton import attention as attn
from kiln.backends.triton.attention import AttnConfig
from launches import record_launches
from kernel_checks import DEVICE, DTYPES, assert_close, require_triton

require_triton()

# The shared bounds (kernel_checks.TOL) hold: in fp32 the kernel and the reference both
# accumulate in fp32 over at most ~100 keys and 128 dims; the differences are summation
# order and exp2 vs exp, well under 1e-5.
SMALL = AttnConfig(16, 16, 4, 1)


def qkv(b, hq, hkv, sq, skv, d, dtype, layout="bshd"):
    """q [B,Hq,Sq,D], k/v [B,Hkv,Skv,D]. layout "bshd": transposed views of [B,S,H,D]
    tensors (what models produce); "bhsd": contiguous; "sliced": views into larger buffers
    (every stride differs from the contiguous one, like a StaticCache slice)."""
    def make(h, s):
        if layout == "bshd":
            return torch.randn(b, s, h, d, device=DEVICE).to(dtype).transpose(1, 2)
        if layout == "sliced":
            return torch.randn(b + 1, h + 2, s + 5, d, device=DEVICE).to(dtype)[1:, 1:h + 1, 3:s + 3]
        return torch.randn(b, h, s, d, device=DEVICE).to(dtype)
    return make(hq, sq), make(hkv, skv), make(hkv, skv)


def poison_left_of_window(k, v, sq, window, block_n):
    """Copies of k/v with NaN in every key before the tile holding the first key any query
    sees: a kernel that visits such a tile at all (even masked: 0 * NaN) outputs NaN."""
    start = attn.window_start(k.shape[2], sq, window, block_n)
    k, v = k.clone(), v.clone()
    k[:, :, :start] = float("nan")
    v[:, :, :start] = float("nan")
    return k, v


def check(q, k, v, mask=None, causal=False, scale=None, path="prefill", window=None, **kw):
    """With a window and an explicit tile config, the kernel runs on k/v poisoned left of
    the window (the reference on the clean ones), so skipping those tiles is checked too."""
    fn = {"prefill": attn.attention_prefill, "decode": attn.attention_decode,
          "auto": attn.attention}[path]
    ref = kiln_ref.attention(q, k, v, mask, scale or 1 / math.sqrt(q.shape[-1]), causal, window)
    if window is not None and "config" in kw:
        k, v = poison_left_of_window(k, v, q.shape[2], window, kw["config"].block_n)
    out = fn(q, k, v, mask, scale, causal, window, **kw)
    assert_close(out, ref, q.dtype)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_gqa_strided(dtype, d, causal):
    # Sq < Skv (a prefill chunk after cached tokens): the causal diagonal is offset.
    q, k, v = qkv(1, 4, 2, 37, 53, d, dtype)
    check(q, k, v, causal=causal, config=SMALL)


@pytest.mark.parametrize("layout", ["bhsd", "sliced"])
def test_prefill_layouts_and_scale(layout):
    q, k, v = qkv(2, 2, 1, 20, 20, 64, torch.float32, layout)
    check(q, k, v, causal=True, scale=0.3, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_default_tiles(dtype):
    """The launcher's own tile table (128-row blocks) on a shape smaller than one block."""
    q, k, v = qkv(1, 2, 2, 40, 40, 64, dtype)
    check(q, k, v, causal=True, path="auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_static_cache_mask(dtype, kind):
    """[B, 1, Sq, Skv] mask as with a StaticCache: causal inside the filled part, the tail
    of the cache (never written) masked out; per-batch fill lengths differ."""
    b, sq, past, skv = 2, 19, 7, 48
    q, k, v = qkv(b, 4, 2, sq, skv, 64, dtype)
    i = torch.arange(sq, device=DEVICE)[:, None]
    j = torch.arange(skv, device=DEVICE)[None, :]
    keep = torch.stack([(j <= i + past) & (j < past + sq - extra) for extra in (0, 3)])[:, None]
    if kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf")).to(dtype)
    check(q, k, v, mask=mask, config=SMALL)
    check(q, k, v, mask=mask, causal=True, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_float_mask_broadcast(dtype):
    """An additive bias with real values, broadcast over batch and heads ([Sq, Skv])."""
    q, k, v = qkv(2, 2, 2, 24, 30, 64, dtype)
    mask = torch.randn(24, 30, device=DEVICE).to(dtype)
    check(q, k, v, mask=mask, causal=True, config=SMALL)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_fully_masked_rows_are_zero(path):
    q, k, v = qkv(1, 2, 1, 5, 40, 64, torch.float32)
    mask = torch.rand(1, 2, 5, 40, device=DEVICE) > 0.3
    mask[0, 1, 2] = False        # one row sees no key
    mask[0, 0, :, 16:32] = False  # a whole tile / partition masked for head 0
    kw = {"split": 16} if path == "decode" else {}
    out, _ = check(q, k, v, mask=mask, path=path, config=SMALL, **kw)
    assert out[0, 1, 2].abs().max() == 0
    # Additive -inf does the same; finfo.min stays finite, so that row is a plain mean.
    add = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    out, _ = check(q, k, v, mask=add, path=path, config=SMALL, **kw)
    assert out[0, 1, 2].abs().max() == 0
    check(q, k, v, mask=add.clamp(min=torch.finfo(torch.float32).min), path=path, config=SMALL,
          **kw)


def test_causal_more_queries_than_keys():
    """Bottom-right causal with Sq > Skv: the first Sq - Skv queries see nothing."""
    q, k, v = qkv(1, 2, 2, 40, 24, 64, torch.float32)
    out, _ = check(q, k, v, causal=True, config=SMALL)
    assert out[:, :, :16].abs().max() == 0


def test_odd_head_dim():
    q, k, v = qkv(1, 2, 1, 18, 21, 48, torch.float32)
    check(q, k, v, causal=True, config=SMALL)
    check(q[:, :, :1], k, v, path="decode", split=16, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_decode_split_kv_gqa(dtype, d):
    """Sq = 1, Skv = 83 in partitions of 16 keys (6 partitions, the last one ragged), 4
    query heads per KV head folded into one tile."""
    q, k, v = qkv(2, 8, 2, 1, 83, d, dtype)
    check(q, k, v, path="decode", split=16, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_static_cache_mask(dtype):
    """Decode against a StaticCache: bool mask [B, 1, 1, Smax] with a different number of
    filled positions per batch row; whole partitions are masked out."""
    b, smax = 2, 96
    q, k, v = qkv(b, 4, 1, 1, smax, 64, dtype)
    filled = torch.tensor([37, 70], device=DEVICE)
    mask = (torch.arange(smax, device=DEVICE)[None, :] < filled[:, None])[:, None, None, :]
    check(q, k, v, mask=mask, path="decode", split=16, config=SMALL)
    add = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf")).to(dtype)
    check(q, k, v, mask=add, path="decode", split=16, config=SMALL)


@pytest.mark.parametrize("causal", [False, True])
def test_decode_several_queries(causal):
    """Sq = 3 (speculative decoding verifies a few tokens): causal inside the partitions,
    rows = 2 heads x 3 queries split over two 4-row blocks."""
    q, k, v = qkv(1, 4, 2, 3, 50, 64, torch.float32)
    check(q, k, v, causal=causal, path="decode", split=16, config=AttnConfig(4, 16, 4, 1))


def test_decode_default_split_and_single_partition():
    q, k, v = qkv(1, 4, 4, 1, 70, 128, torch.float16)
    check(q, k, v, path="auto")                       # one partition: writes O directly
    check(q, k, v, path="decode", split=32, config=SMALL)


def test_decode_split_sizes():
    # Batch 1, 8 KV heads on 132 SMs: ~2 programs an SM wanted, at least 512 keys each.
    assert attn.decode_split(1, 8, 1, 8192, 64, 132) == 512
    assert attn.decode_split(1, 8, 1, 32768, 64, 132) == 1024
    # Many tiles: ~4 programs an SM; batch 32 at 8k keys gets 3 partitions.
    assert -(-8192 // attn.decode_split(32, 8, 1, 8192, 64, 132)) == 3
    assert attn.decode_split(128, 8, 1, 4096, 64, 132) == 4096
    # Never more than DECODE_MAX_SPLITS partitions; always a multiple of BLOCK_N.
    s = attn.decode_split(1, 1, 1, 10**6, 64, 132)
    assert s % 64 == 0 and -(-10**6 // s) <= attn.DECODE_MAX_SPLITS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [5, 16, 37, 90, 120])
def test_prefill_window_gqa(dtype, causal, window):
    """37 queries over 90 keys (a chunk after 53 cached ones), 16 x 16 tiles: three query
    blocks, each with a left band, unmasked tiles and (causal) a diagonal band; without
    causal the window only bounds the keys from the left. Windows narrower than a tile,
    one tile, wider than a query block, all the keys, more than there are."""
    q, k, v = qkv(1, 4, 2, 37, 90, 64, dtype)
    check(q, k, v, causal=causal, window=window, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_window_wide_tiles_and_more_queries_than_keys(dtype):
    """A 32-row block under a 16-key window (the band spans the whole visible range: no
    tile runs unmasked), the launcher's own tiles, and Sq > Skv where the first queries
    see nothing."""
    q, k, v = qkv(2, 2, 1, 70, 130, 64, dtype)
    check(q, k, v, causal=True, window=16, config=AttnConfig(32, 16, 4, 1))
    check(q, k, v, causal=True, window=16, path="auto")
    q, k, v = qkv(1, 2, 2, 40, 24, 64, dtype)
    out, _ = check(q, k, v, causal=True, window=8, config=SMALL)
    assert out[:, :, :16].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 20, 40, 83, 100])
def test_decode_window_split_kv(dtype, causal, window):
    """Sq = 1 and Sq = 3 over 83 keys in 16-key partitions: the partitions start at the
    window's first tile (the keys before it are poisoned), so a narrow window leaves a
    single partition and a wide one several, the last ragged."""
    q, k, v = qkv(1, 8, 2, 3, 83, 64, dtype)
    check(q[:, :, -1:], k, v, causal=causal, window=window, path="decode", split=16,
          config=SMALL)
    check(q, k, v, causal=causal, window=window, path="decode", split=16,
          config=AttnConfig(8, 16, 4, 1))


def test_decode_window_partitions_cover_only_the_window(monkeypatch):
    """83 keys in 16-key partitions: 6 without a window; under a 20-key window the first
    key seen is 63, in the tile from 48, so 3 partitions cover keys 48..82. The default
    split is chosen from those keys too."""
    grids = record_launches(monkeypatch, attn._attn_decode_kernel)
    assert attn.window_start(83, 1, 20, 16) == 48
    assert attn.window_start(83, 3, 100, 16) == 0
    q, k, v = qkv(1, 4, 1, 1, 83, 64, torch.float32)
    check(q, k, v, causal=True, path="decode", split=16, config=SMALL)
    check(q, k, v, causal=True, window=20, path="decode", split=16, config=SMALL)
    assert [g[0] for g in grids] == [6, 3]
    check(q, k, v, causal=True, window=20, path="auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_window_with_bool_mask(dtype, path):
    """A StaticCache-style bool mask (per-batch fill lengths) and a window together: each
    query sees the keys both allow."""
    b, sq, skv = 2, (19 if path == "prefill" else 2), 48
    q, k, v = qkv(b, 4, 2, sq, skv, 64, dtype)
    j = torch.arange(skv, device=DEVICE)[None, :]
    mask = torch.stack([(j < skv - extra) & (j % 7 != 3) for extra in (0, 5)])[:, None]
    mask = mask.expand(b, 1, sq, skv)
    kw = {"split": 16} if path == "decode" else {}
    for causal in (False, True):
        check(q, k, v, mask=mask, causal=causal, window=21, path=path, config=SMALL, **kw)


def test_out_argument_and_errors():
    q, k, v = qkv(1, 4, 2, 20, 20, 64, torch.float32)
    out = torch.empty(q.shape, device=DEVICE)
    assert attn.attention(q, k, v, None, None, True, out=out) is out
    assert_close(out, kiln_ref.attention(q, k, v, None, 0.125, True), torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        attn.attention(q, k[:, :1].expand(1, 3, 20, 64), v[:, :1].expand(1, 3, 20, 64))
    with pytest.raises(ValueError, match="broadcast"):
        attn.attention(q, k, v, torch.ones(2, 20, 20, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        attn.attention(q, k.half(), v)
    for window in (0, -3, 2.5):
        with pytest.raises(ValueError, match="window"):
            attn.attention(q, k, v, None, None, True, window)


def test_aot_specs_are_well_formed():
    names = [s.name for s in attn.AOT_SPECS]
    assert len(names) == len(set(names))
    for spec in attn.AOT_SPECS:
        assert set(spec.signature) == set(spec.fn.arg_names)
        assert all(spec.signature[c] == "constexpr" for c in spec.constants)
        if "HAS_WINDOW" in spec.constants:
            base = spec.name.removesuffix("_hip")    # a hip tile table's variant of the same kernel
            assert spec.constants["HAS_WINDOW"] == base.endswith("_window"), spec.name
    for dt in ("f16", "bf16"):
        for path in ("prefill", "decode"):
            assert f"attn_{path}_{dt}_d128_causal_window" in names
