"""Batch invariance (backends/batch_invariance.py): under `batch_invariant()` every row of a
decode batch is bit for bit what it is in a batch of one, for the decode GEMMs
(backends/triton/gemv.py) and paged decode attention. Without it both choose by the
batch's shape (torch.mm / cuBLAS above one row, fewer key slices for more sequences), which
is what these tests would see if the mode stopped reaching a launcher.

Run under TRITON_INTERPRET=1 on CPU tensors (fp32, fp16); on a GPU the compiled kernels,
bf16 too (the GPU gate), where a difference in reduction order is a difference in bits."""
from __future__ import annotations

import pytest
import torch

from kiln.backends.batch_invariance import batch_invariant, enabled, invariant_calls
from kiln.backends.triton import gemv
from kiln.backends.triton import paged_attention as pa
from kernel_checks import DEVICE, DTYPES, randn, require_triton
from launches import record_launches

require_triton()

EPS = 1e-6


def launchers(m: int, k: int, n: int, dtype):
    """(name, call(rows) -> tuple of outputs) for each gemv launcher on fresh inputs of m rows
    (x as [1, m, K], the layout of a decode step's hidden states)."""
    x, r, g, u = (randn(1, m, k, dtype=dtype) for _ in range(4))
    w = randn(k, dtype=dtype)
    b = randn(n, k, dtype=dtype, scale=k ** -0.5).permute(1, 0)   # an nn.Linear weight, permuted
    return {
        "rms_norm_mm": lambda s: (gemv.rms_norm_mm(x[:, s], w, b, EPS),),
        "fused_add_rms_norm_mm": lambda s: gemv.fused_add_rms_norm_mm(x[:, s], r[:, s], w, b, EPS),
        "silu_mul_mm": lambda s: (gemv.silu_mul_mm(g[:, s], u[:, s], b),),
        "mm": lambda s: (gemv.mm(x[:, s], b),),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [5, 9])
def test_gemv_rows_equal_one_row_launches(dtype, m, monkeypatch):
    # K = 1536 takes two K chunks of the one-row config; N = 40 a ragged last column block.
    k, n = 1536, 40
    for name, call in launchers(m, k, n, dtype).items():
        alone = [call(slice(i, i + 1)) for i in range(m)]
        launches = record_launches(monkeypatch, gemv._gemv_kernel)
        with batch_invariant():
            together = call(slice(0, m))
        assert len(launches) == 1, f"{name}: {len(launches)} gemv launches for {m} rows"
        for out_batch, *outs_alone in zip(together, *alone):
            rows = out_batch.reshape(m, -1)
            for i, one in enumerate(outs_alone):
                assert torch.equal(rows[i], one.reshape(-1)), f"{name}: row {i} of {m} differs"
        monkeypatch.undo()


def test_without_the_mode_more_rows_take_the_unfused_pair(monkeypatch):
    """The default: above FUSED_MAX_M rows the gemv kernel is not launched at all, so the
    test above sees the mode, not a default that happens to agree."""
    launches = record_launches(monkeypatch, gemv._gemv_kernel)
    for call in launchers(5, 96, 40, torch.float32).values():
        call(slice(0, 5))
    assert launches == []
    with batch_invariant():
        for call in launchers(gemv.MAX_M + 1, 96, 40, torch.float32).values():
            call(slice(0, gemv.MAX_M + 1))   # past MAX_M rows: prefill-sized, unfused
    assert launches == []


def verify_rows(past: int, rows: int, hq: int, hkv: int, d: int, dtype, width_blocks: int, bs=16):
    """A verify step's layout (runtime/spec_decode.py): one sequence with `past` cached
    tokens runs `rows` query rows, row j at position past + j with context past + j + 1,
    every row reading the same block table (`width_blocks` wide, as a captured bucket's
    padded table)."""
    used = -(-(past + rows) // bs)
    table = torch.randperm(width_blocks + 2)[:used].tolist()
    bt = torch.tensor([table + [0] * (width_blocks - used)] * rows, dtype=torch.int32)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past, past + rows)])
    ctx = torch.arange(past + 1, past + rows + 1, dtype=torch.int32)
    qs = torch.arange(rows + 1, dtype=torch.int32)
    q, k, v = (torch.randn(rows, h, d, device=DEVICE).to(dtype) for h in (hq, hkv, hkv))
    kc, vc = (torch.randn(width_blocks + 2, bs, hkv, d, device=DEVICE).to(dtype) for _ in range(2))
    return q, k, v, kc, vc, [t.to(DEVICE) for t in (slots, bt, ctx, qs)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_rows_equal_one_row_steps(dtype):
    hq, hkv, d, bs, rows = 4, 1, 64, 16, 5
    block_n = pa._config(pa.DECODE_CONFIGS, d).block_n
    sms = pa._num_sms(torch.device(DEVICE))
    width = 64
    while (splits := [pa.decode_num_splits(n, hkv, width * bs, block_n, sms) for n in (1, rows)]) \
            and splits[0] == splits[1]:
        width *= 2   # a table wide enough that 1 and 5 rows split differently by default
        assert width <= 1 << 14

    def slice_keys(context, num_splits):   # the kernel's cut: runs of whole tiles
        return -(-(-(-context // num_splits)) // block_n) * block_n
    # a context that those splits also cut differently (the slices must not coincide)
    past = next(c for c in (2000, 8000, 30000)
                if slice_keys(c, splits[0]) != slice_keys(c, splits[1]) and c < width * bs - rows)
    q, k, v, kc, vc, (slots, bt, ctx, qs) = verify_rows(past, rows, hq, hkv, d, dtype, width, bs)
    kc1, vc1 = kc.clone(), vc.clone()
    alone = [pa.paged_attention(q[j:j + 1], k[j:j + 1], v[j:j + 1], kc1, vc1, slots[j:j + 1],
                                bt[j:j + 1], ctx[j:j + 1], qs[:2], 0.125) for j in range(rows)]
    with batch_invariant():
        together = pa.paged_attention(q, k, v, kc, vc, slots, bt, ctx, qs, 0.125)
    for j in range(rows):
        assert torch.equal(together[j], alone[j][0]), f"row {j} differs from its one-row step"
    assert torch.equal(kc, kc1) and torch.equal(vc, vc1)


def test_the_mode_is_scoped_and_wraps_calls():
    assert not enabled()
    with batch_invariant():
        assert enabled()
        with batch_invariant(False):
            assert not enabled()
        assert enabled()
    assert not enabled()
    seen = []
    wrapped = invariant_calls(lambda a, b=0: seen.append((a, b, enabled())) or a + b)
    assert wrapped(1, b=2) == 3 and seen == [(1, 2, True)] and not enabled()
