"""Triton paged attention against kiln_ref.paged_attention: outputs and the caches it writes.

Run under TRITON_INTERPRET=1 (as `make test` does) on CPU tensors; with a GPU and
TRITON_INTERPRET unset the same tests run the compiled kernels (and bf16 too). Batches are
built like the runtime builds them (runtime/batch.py): blocks handed out in random order,
block tables padded with 0, decode buckets padded with scratch sequences as StepBuffers
pads them. Inputs are fresh random values every run; errors are ‖out − ref‖ / ‖ref‖ in
float64, and the caches must equal the reference's exactly.
"""
from __future__ import annotations

import pytest
import torch

from kiln.backends.triton import paged_attention as pa
from kiln.backends.triton.attention import AttnConfig
from kiln.ir import kiln_ref
from launches import record_launches
from kernel_checks import DEVICE, DTYPES, TOL, require_triton

require_triton()

# The shared bounds (kernel_checks.TOL) hold: in fp32 both sides accumulate in fp32 over
# at most a few hundred keys (summation order and exp2 vs exp differ), well under 1e-5;
# fp16/bf16: P is rounded to the input dtype before the PV product, as in every flash kernel.
SMALL = AttnConfig(16, 16, 4, 1)   # many tiles, query tiles and splits on tiny shapes
HEADS = {"gqa": (4, 2), "mha": (2, 2)}


def make_batch(seqs, hq, hkv, d, dtype, bs=16, spare_blocks=3, extra_width=0, qkv_views=False):
    """seqs: (tokens already cached, new tokens) per sequence. Returns (q, k, v, k_cache,
    v_cache, slot_mapping, block_tables, context_lens, query_start)."""
    nb = sum(-(-(past + new) // bs) for past, new in seqs) + spare_blocks
    free = torch.randperm(nb).tolist()
    tables, slots, qstart, ctx = [], [], [0], []
    for past, new in seqs:
        table = [free.pop() for _ in range(-(-(past + new) // bs))]
        tables.append(table)
        slots += [table[p // bs] * bs + p % bs for p in range(past, past + new)]
        qstart.append(qstart[-1] + new)
        ctx.append(past + new)
    width = max(len(t) for t in tables) + extra_width
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    t = qstart[-1]
    if qkv_views:   # slices of one fused projection, as a model's q/k/v are
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEVICE).to(dtype)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    else:
        q, k, v = (torch.randn(t, h, d, device=DEVICE).to(dtype) for h in (hq, hkv, hkv))
    kc, vc = (torch.randn(nb, bs, hkv, d, device=DEVICE).to(dtype) for _ in range(2))
    meta = [torch.tensor(slots), bt, torch.tensor(ctx, dtype=torch.int32),
            torch.tensor(qstart, dtype=torch.int32)]
    return [q, k, v, kc, vc] + [m.to(DEVICE) for m in meta]


def poison_left_of_window(caches, meta, window, block_n):
    """NaN in each sequence's cached keys and values before the tile holding the first key
    its first new token sees: a kernel that visits such a tile at all (even masked:
    0 * NaN) outputs NaN. Those are old tokens, which this step does not write."""
    _, bt, ctx, qs = meta
    starts = qs.tolist()
    for i, length in enumerate(ctx.tolist()):
        n = starts[i + 1] - starts[i]
        for cache in caches:
            bs = cache.shape[1]
            for pos in range(max(length - n - window + 1, 0) // block_n * block_n):
                cache[bt[i, pos // bs], pos % bs] = float("nan")


def check(args, scale=0.3, window=None, **kw):
    """Run the kernel and the reference on copies of the caches; compare both. With a
    window and an explicit tile config, the kernel's copies and the reference's written
    caches are then poisoned left of the window (the same slots in both), so skipping
    those tiles is checked too."""
    q, k, v, kc, vc, *meta = args
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = kiln_ref.paged_attention(q, k, v, kc_ref, vc_ref, *meta, scale=scale, window=window)
    if window is not None and "config" in kw:
        kc, vc = kc.clone(), vc.clone()
        poison_left_of_window((kc, vc, kc_ref, vc_ref), meta, window, kw["config"].block_n)
    got = pa.paged_attention(q, k, v, kc, vc, *meta, scale=scale, window=window, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all(), "non-finite values in kernel output"
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < TOL[q.dtype], f"relative error {err:.3g} >= {TOL[q.dtype]}"
    assert torch.equal(kc.nan_to_num(), kc_ref.nan_to_num()), "k cache differs from the reference"
    assert torch.equal(vc.nan_to_num(), vc_ref.nan_to_num()), "v cache differs from the reference"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_decode_batch(dtype, d, heads):
    # One token each; contexts of one token, within a block, and over several blocks.
    hq, hkv = HEADS[heads]
    check(make_batch([(0, 1), (6, 1), (40, 1), (16, 1)], hq, hkv, d, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_mixed_batch(dtype, d, heads):
    # A prefill chunk after cached tokens (chunked prefill / prefix hit), a fresh prompt and
    # decodes, laid end to end in one flat batch.
    hq, hkv = HEADS[heads]
    check(make_batch([(5, 1), (20, 30), (0, 7), (2, 1)], hq, hkv, d, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 6])
def test_mixed_batch_splits_sequences_by_length(dtype, window, monkeypatch):
    """With its own tiles a mixed batch runs in two launches: sequences of at most 8 new
    tokens (16-row decode tiles / a group of 2) in the first, longer ones in 128-row tiles
    (64 tokens) in the second. Lengths on both sides of each boundary, and batches with
    only short or only long sequences: a sequence neither launch takes would read zero."""
    grids = record_launches(monkeypatch, pa._paged_attn_kernel)
    seqs = [(3, 8), (10, 9), (0, 1), (20, 64), (7, 65), (40, 1), (0, 2)]
    args = make_batch(seqs, 4, 2, 64, dtype)
    check(args, window=window)
    t, n = args[0].shape[0], len(seqs)
    assert [g[0] for g in grids] == [t // 8 + n, t // 64 + n]
    check(make_batch([(3, 2), (9, 1), (0, 8)], 4, 2, 64, dtype), window=window)
    check(make_batch([(3, 9), (0, 70)], 4, 2, 64, dtype), window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_small_tiles_group_of_three(dtype):
    # 16-row tiles hold 5 tokens x 3 heads: a 41-token chunk spans 9 query tiles, its
    # keys 4 KV tiles with causal bands inside; a non-power-of-two group and block size 4.
    check(make_batch([(3, 1), (9, 41), (0, 1), (0, 12), (30, 2)], 6, 2, 64, dtype, bs=4),
          config=SMALL)


def test_padded_decode_bucket_like_decode_buffers():
    """A bucket of 8 rows holding 5 live sequences; rows past 5 are scratch sequences
    (context 1, slot and block table all in the scratch block), and every table is padded
    to the runner's width with the scratch block, as StepBuffers.fill leaves them."""
    bs, hq, hkv, d, width, bucket = 16, 4, 2, 64, 8, 8
    live = [(10, 1), (0, 1), (47, 1), (15, 1), (33, 1)]
    q, k, v, kc, vc, slots, bt, ctx, qs = make_batch(live, hq, hkv, d, torch.float32, bs=bs)
    nb = kc.shape[0]
    scratch = nb   # the runner allocates one block past those the engine hands out
    kc = torch.cat([kc, torch.randn(1, bs, hkv, d, device=DEVICE)])
    vc = torch.cat([vc, torch.randn(1, bs, hkv, d, device=DEVICE)])
    n, pad = len(live), bucket - len(live)
    # Scratch rows run token 0 at position 0: the same k/v in every one of them.
    def pad_rows(x):
        return torch.cat([x, torch.randn(1, *x.shape[1:], device=DEVICE).expand(pad, -1, -1)])
    q, k, v = pad_rows(q), pad_rows(k), pad_rows(v)
    table = torch.full((bucket, width), scratch, dtype=torch.int32, device=DEVICE)
    table[:n, : bt.shape[1]] = bt
    for i, (past, new) in enumerate(live):   # entries past each sequence's blocks: scratch
        table[i, -(-(past + new) // bs):] = scratch
    slots = torch.cat([slots, torch.full((pad,), scratch * bs, device=DEVICE)])
    ctx = torch.cat([ctx, torch.ones(pad, dtype=torch.int32, device=DEVICE)])
    qs = torch.arange(bucket + 1, dtype=torch.int32, device=DEVICE)
    check([q, k, v, kc, vc, slots, table, ctx, qs])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 2), (3, 3)])
def test_split_kv_forced(dtype, heads):
    # 32-key slices of a table 7 blocks wide: 4 slices, each cutting its sequence's own
    # keys in runs of whole 16-key tiles (a one-key context leaves 3 empty, 100 keys make
    # runs of 32); the reduction combines them.
    hq, hkv = heads
    check(make_batch([(100, 1), (3, 1), (40, 1), (0, 1)], hq, hkv, 64, dtype, extra_width=1),
          config=SMALL, split=32)


def test_split_kv_chosen_from_shapes():
    # Batch 1 over a table padded well past the context (a captured bucket's width): the
    # number of slices comes from the table width, their keys from the context.
    hq, hkv, d, bs = 3, 1, 64, 16
    args = make_batch([(700, 1)], hq, hkv, d, torch.float32, bs=bs, extra_width=40)
    max_keys = args[6].shape[1] * bs
    block_n = pa._config(pa.DECODE_CONFIGS, d).block_n
    splits = pa.decode_num_splits(1, hkv, max_keys, block_n, pa._num_sms(args[0].device))
    assert splits > 1
    check(args)


# Windows of one key, part of a 16-key tile, a tile and a bit, two tiles, and more than
# any context below.
WINDOWS = [1, 7, 17, 32, 120]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_decode_window_split_kv(dtype, window):
    """Decode under a window in 16-key slices over blocks of 8 (half a tile), 4 query heads
    a KV head: the slices start at each sequence's first visible tile, so the short
    sequences leave slices empty and a long context costs only the window."""
    args = make_batch([(100, 1), (3, 1), (40, 1), (0, 1), (63, 1)], 8, 2, 64, dtype, bs=8,
                      extra_width=1)
    check(args, window=window, config=SMALL, split=16)
    check(args, window=window, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_mixed_batch_window(dtype, window):
    """Chunked prefill under a window: chunks after long cached contexts (n < ctx), a fresh
    prompt and decodes, 5-token query tiles x 3 heads over 16-key tiles in blocks of 4; a
    window narrower than a query tile leaves no tile unmasked."""
    check(make_batch([(3, 1), (9, 41), (0, 1), (60, 12), (30, 2), (47, 20)], 6, 2, 64, dtype,
                     bs=4), window=window, config=SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_default_tiles_and_split(dtype, monkeypatch):
    """The launcher's own tiles and split under a window, for a decode bucket (a 700-key
    context over a table padded to 1024 keys: 2 slices of 512 without a window, while the
    slices need only cover a 100-key window and the tile before it) and a mixed batch with
    chunks longer than the window."""
    grids = record_launches(monkeypatch, pa._paged_attn_kernel)
    decode = make_batch([(700, 1), (5, 1), (90, 1)], 4, 2, 64, dtype, extra_width=20)
    check(decode)
    check(decode, window=100)
    assert [g[2] for g in grids] == [2, 1]
    check(make_batch([(5, 1), (120, 30), (0, 90), (2, 1)], 4, 2, 64, dtype), window=40)


def test_window_errors():
    args = make_batch([(4, 1)], 4, 2, 64, torch.float32)
    for window in (0, -1, 3.0):
        with pytest.raises(ValueError, match="window"):
            pa.paged_attention(*args, 0.3, window)


@pytest.mark.parametrize("d", [8, 80])
def test_head_dims_below_16_and_not_powers_of_two(d):
    # Tiny test models use d=8 (padded to a 16-wide tile); 80 pads to 128.
    check(make_batch([(7, 1), (3, 9), (0, 1)], 4, 1, d, torch.float32, bs=4), config=SMALL)
    check(make_batch([(7, 1), (3, 1), (0, 1)], 4, 1, d, torch.float32, bs=4))


@pytest.mark.parametrize("seqs", [[(5, 1), (9, 1)], [(5, 1), (4, 20)]], ids=["decode", "mixed"])
def test_head_major_queries_give_a_contiguous_output(seqs):
    # q as RoPE leaves it, [T, Hq, D] viewing head-major memory: the output is still
    # contiguous, so the model's reshape to [T, Hq * D] before o_proj is a view.
    q, *rest = make_batch(seqs, 4, 2, 64, torch.float32)
    q = q.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not q.is_contiguous()
    assert check([q, *rest]).is_contiguous()


def test_qkv_views_of_a_fused_projection():
    check(make_batch([(5, 1), (4, 20), (1, 1)], 4, 2, 64, torch.float32, qkv_views=True),
          config=SMALL)


def test_fp32_queries_over_fp16_cache():
    q, k, v, kc, vc, *meta = make_batch([(20, 1), (4, 9)], 4, 2, 64, torch.float32)
    check([q, k, v, kc.half(), vc.half(), *meta])


def test_rows_no_sequence_owns_are_zero():
    # query_start ends before T (a mixed batch with a spare row): that row reads zero.
    q, k, v, kc, vc, slots, bt, ctx, qs = make_batch([(4, 5), (2, 1)], 4, 2, 64, torch.float32)
    spare = torch.randn(1, *q.shape[1:], device=DEVICE)
    extra_slot = torch.tensor([kc.shape[0] * kc.shape[1] - 1], device=DEVICE)  # a spare block
    args = [torch.cat([q, spare]), torch.cat([k, k[:1]]), torch.cat([v, v[:1]]), kc, vc,
            torch.cat([slots, extra_slot]), bt, ctx, qs]
    out = check(args)
    assert (out[-1] == 0).all()


def test_launch_reads_no_metadata_on_the_host(monkeypatch):
    """Capture safety: the launcher decides everything from shapes. Reading a tensor's
    values on the host would go through one of the methods forbidden here; the kernel
    launches themselves (which the interpreter runs on the host) are let through."""
    kernel_class = type(pa._paged_attn_kernel)
    launch = kernel_class.__getitem__

    def forbid():
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "cpu", "numpy"):
            def read(self, *a, _name=name, **k):
                raise AssertionError(f"the launcher called Tensor.{_name}")
            monkeypatch.setattr(torch.Tensor, name, read)
        monkeypatch.setattr(kernel_class, "__getitem__", allowed_launch)

    def allowed_launch(self, grid):
        def run(*a, **kw):
            monkeypatch.undo()
            try:
                return launch(self, grid)(*a, **kw)
            finally:
                forbid()
        return run

    for seqs in ([(30, 1), (3, 1)], [(30, 4), (3, 1)]):   # decode, mixed
        for window in (None, 8):
            q, k, v, kc, vc, *meta = make_batch(seqs, 4, 2, 64, torch.float32)
            forbid()
            try:
                pa.paged_attention(q, k, v, kc, vc, *meta, scale=0.3, window=window)
            finally:
                monkeypatch.undo()


@pytest.mark.skipif(DEVICE != "cpu", reason="tests/serving/test_serving_cuda.py covers a GPU")
def test_cuda_serving_graph_launches_it_through_the_interpreter():
    """The cuda target's serving graph calls this kernel; on the CPU, under the interpreter,
    a prefill step and a padded decode bucket give HF eager's last-token logits."""
    import models
    from kiln.runtime.batch import build_batch
    from kiln.runtime.model_runner import PagedModelRunner
    from kiln.serving import compile_serving, model_weights
    model = models.tiny_llama_gqa()
    vocab = model.config.vocab_size
    cuda = compile_serving(model, target="cuda", block_size=16)
    assert "kiln.backends.triton.paged_attention" in cuda.source
    runner = PagedModelRunner(cuda.fn, cuda.graph, model_weights(model, cuda.graph), num_blocks=16,
                              max_model_len=64, vocab_size=vocab, pad_batches=True)
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 19, 3)]
    tables = [[2 * i, 2 * i + 1] for i in (2, 0, 1)]
    for step in ("prefill", "decode"):   # the decode step runs in bucket 4, one scratch row
        if step == "decode":
            for p in prompts:
                p.append(int(torch.randint(0, vocab, ())))
        done = [0 if step == "prefill" else len(p) - 1 for p in prompts]
        batch = build_batch([(p, c, len(p) - c, t) for p, c, t in zip(prompts, done, tables)], 16)
        got = runner.execute(batch).double()
        with torch.no_grad():
            want = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts]).double()
        assert ((got - want).norm() / want.norm()).item() < 1e-5
