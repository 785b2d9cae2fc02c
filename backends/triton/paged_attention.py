"""Paged attention: `paged_attention` with kiln_ref.paged_attention semantics, in Triton.

Why it is shaped the way it is:

* One launch path for every batch, decided by tensor shapes alone. Decode steps are
  replayed from CUDA graphs (runtime/model_runner.py pads them into buckets), so the
  launcher may not read query_start / context_lens on the host: that would synchronise,
  and a captured graph would freeze whatever it read. The grid is therefore an upper
  bound, and each program finds its own work on the device.
* Query tiles, not sequences, are the unit of work, so that one long prefill chunk in a
  mixed batch is spread over many programs instead of serialising on one. Sequence i owns
  the tiles [query_start[i] // BLOCK_Q + i, query_start[i+1] // BLOCK_Q + i + 1); those
  ranges are disjoint, cover at least cdiv(n_i, BLOCK_Q) tiles each, and all fit below
  T // BLOCK_Q + N, a bound known from shapes. A program binary-searches query_start for
  its sequence and returns at once when its tile holds no token (at most one spare tile a
  sequence, plus the grid's tail). A decode-only batch (T == N) skips the search: program
  i is sequence i.
* The GROUP query heads that share a KV head are folded into the M dimension of the tile
  (row r = token r // GROUP, head r % GROUP), so each K/V tile is read from the cache once
  per KV head rather than once per query head. With BLOCK_M rows a tile holds
  BLOCK_Q = BLOCK_M // GROUP tokens; decode tiles hold one token and BLOCK_M is the
  smallest legal dot size (16) above GROUP.
* K/V are gathered key by key through the block table (a key's block id, then its offset
  in the block), so a KV tile need not match the cache's block size: tiles stay wide
  enough for the tensor cores whatever the block size is.
* Causal limits per tile: keys past the tile's last token are never visited, keys that
  every row of the tile may see run without masks, and only the band in between (and the
  last, ragged tile) is masked. Online softmax in base 2 in fp32, as in attention.py.
* A sliding `window` (a runtime argument behind the HAS_WINDOW constexpr: kernels
  without one compile as before) limits each tile from the left the same way: tiles
  left of what its first token sees are never visited, and the band at the window's
  edge is masked like the causal one, so a long context costs a windowed tile only the
  keys near it. The window is an attribute of the graph, not data, so it may shape the
  launch.
* A mixed batch runs in two launches by query length, since one tile shape serves
  neither well: sequences of at most `BLOCK_Q` tokens of a decode-sized tile (decodes,
  short chunks) in decode tiles, longer ones (prefill chunks) in prefill tiles. In one
  launch of 128-row tiles, a decode row of a GQA group of 4 filled 4 rows of 128 and
  paged attention took 2.5x its decode-only time at 256 sequences (H200, Llama-3.2-1B
  shape). Each launch is again sized from shapes alone and covers every sequence; a
  program whose sequence belongs to the other launch (MIN_N < n <= MAX_N fails) returns
  after the search.
* Split-KV (flash-decoding) for decode batches with too few (sequence, KV head) programs
  to fill the machine: each program takes one of NUM_SPLITS slices of its sequence's
  keys and writes a partial (m, l, acc), and attention.py's reduction kernel combines
  them. NUM_SPLITS is chosen from the block table's width (the padded maximum context), N
  (1 under batch_invariant(): a row's split must not depend on its batch) and Hkv, never
  from context_lens, so it is fixed per captured bucket; but the slices
  cut each sequence's own keys into NUM_SPLITS runs of whole tiles, on the device, so
  every program has work: fixed slices of width / NUM_SPLITS left the second of two
  splits empty for every 200-key context under a 4096-key table. With a window the keys
  start at the tile holding a sequence's first visible key, not at key 0, so a split
  needs only cover window + BLOCK_N - 1 keys, however wide the table.
* The cache write is its own tiny kernel launched first: every attention program reads
  keys that other programs' tokens wrote (a prefill chunk reads its own new tokens), and
  there is no grid-wide barrier inside one launch.
* Keys and values are converted to q's dtype in registers (a no-op when the cache holds
  q's dtype), so an fp32 q over an fp16 cache is computed as the reference does.

Tile sizes are not tuned on a GPU yet: decodes (and a mixed batch's short sequences) take
attention.py's decode tiles, prefill chunks a 128 x 64 tile per head dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.backends import batch_invariance

from .aot import make_spec
from .attention import (DECODE_CONFIGS, LOG2E, REDUCE_BLOCK_S, AttnConfig, _attn_reduce_kernel,
                        _config, _mma, _num_sms, check_window, decode_split)

# Prefill / mixed-batch tiles per head dim (BLOCK_M rows = tokens x folded query heads).
# Shared memory at d=128, 3 stages: Q 32 KB + 3 x (K 16 KB + V 16 KB) = 128 KB. Not swept.
PREFILL_CONFIGS = {
    64: AttnConfig(128, 64, 4, 3),
    128: AttnConfig(128, 64, 8, 3),
    256: AttnConfig(64, 32, 8, 2),
}


# --------------------------------------------------------------------------- kernels

@triton.jit
def _cache_write_kernel(K, V, KC, VC, SLOT,
                        stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                        HKV, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """KC/VC[slot // BLOCK_SIZE, slot % BLOCK_SIZE, h] = K/V[t, h] for every KV head of
    token t = program_id(0). A negative slot writes nothing."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOT + t)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs_d < tl.where(slot >= 0, HEAD_DIM, 0)
    k_src = K + t * stride_kt + offs_d
    v_src = V + t * stride_vt + offs_d
    k_dst = KC + blk * stride_kcb + off * stride_kcs + offs_d
    v_dst = VC + blk * stride_vcb + off * stride_vcs + offs_d
    for h in range(HKV):
        k = tl.load(k_src + h * stride_kh, mask=ok)
        v = tl.load(v_src + h * stride_vh, mask=ok)
        tl.store(k_dst + h * stride_kch, k.to(KC.dtype.element_ty), mask=ok)
        tl.store(v_dst + h * stride_vch, v.to(VC.dtype.element_ty), mask=ok)


@triton.jit
def _paged_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, qpos, offs_n, offs_d,
                 stride_kb, stride_ks, stride_vb, stride_vs, lo, hi, WINDOW, qk_scale,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr,
                 FP32_DOT: tl.constexpr):
    """Online softmax over context keys [lo, hi) in BLOCK_N steps, read through the block
    table row `bt_row`. MASKED: apply the key bound, the causal test (key <= qpos of the
    row) and the window test (qpos - key < WINDOW); tiles every row may see in full skip
    all three."""
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        if MASKED:
            pos_ok = pos < hi
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        off = pos % BLOCK_SIZE
        k_ptrs = k_base + blk[None, :] * stride_kb + off[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + blk[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=pos_ok[None, :] & d_ok[:, None], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = _mma(q, k.to(q.dtype), FP32_DOT) * qk_scale
        if MASKED:
            keep = pos_ok[None, :] & (pos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                keep = keep & (pos[None, :] > qpos[:, None] - WINDOW)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf: subtract 0 instead (no inf - inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + _mma(p.to(q.dtype), v.to(q.dtype), FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_attn_kernel(
        Q, KC, VC, O, BT, CTX, QS, PACC, PML,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        N, GROUP, BLOCK_Q, MIN_N, MAX_N, WINDOW, qk_scale, NUM_SPLITS,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_DECODE: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr, FP32_DOT: tl.constexpr):
    """One query tile (BLOCK_Q tokens x GROUP query heads) of one sequence, for KV head
    program_id(1), over KV slice program_id(2); only sequences of MIN_N < n <= MAX_N new
    tokens (a mixed batch's two launches split them by length).

    Keys are visited from 0, or with a window from the tile holding the first key the
    tile's first token sees; slice s holds the s-th of NUM_SPLITS runs of whole KV tiles
    that cut them (the last may be short or empty).

    DIRECT: one slice; normalise and write O. Otherwise write the slice's partials
    PACC[slot, :] = acc, PML[slot, 0:2] = (m, l) with slot = (token * Hq + head) *
    NUM_SPLITS + split, for attention.py's `_attn_reduce_kernel` (base 2).
    """
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    if IS_DECODE:
        seq = pid
        q0 = 0
    else:
        # The last sequence whose first tile, QS[i] // BLOCK_Q + i, is at or before pid.
        lo = tl.full([], 0, tl.int32)
        hi = lo + N
        while lo < hi:
            mid = (lo + hi) // 2
            first = tl.load(QS + mid) // BLOCK_Q + mid
            go_right = first <= pid
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        seq = lo - 1
        q0 = (pid - (tl.load(QS + seq) // BLOCK_Q + seq)) * BLOCK_Q
    q_start = tl.load(QS + seq)
    n = tl.load(QS + seq + 1) - q_start
    if (q0 >= n) | (n <= MIN_N) | (n > MAX_N):
        return
    ctx = tl.load(CTX + seq)

    r = tl.arange(0, BLOCK_M)
    tok = q0 + r // GROUP
    row_ok = (r // GROUP < BLOCK_Q) & (tok < n)
    head = hk * GROUP + r % GROUP
    qpos = ctx - n + tok          # a row sees keys 0..qpos
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t64 = (q_start + tok).to(tl.int64)
    head64 = head.to(tl.int64)

    q = tl.load(Q + t64[:, None] * stride_qt + head64[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    hk64 = hk.to(tl.int64)
    k_base = KC + hk64 * stride_kh
    v_base = VC + hk64 * stride_vh
    bt_row = BT + seq.to(tl.int64) * stride_bt

    # Keys the tile's last token sees (end) and keys all its tokens see (full).
    end = ctx - n + tl.minimum(q0 + BLOCK_Q, n)
    full = ctx - n + q0 + 1
    lo_k = 0
    if HAS_WINDOW:
        # The tile's first token sees keys from full - WINDOW on, its last from
        # end - WINDOW on: tiles left of the first are skipped, and every token sees
        # those from the last (rounded up to a tile) to `full`.
        lo_k = (tl.maximum(full - WINDOW, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(end - WINDOW, 0), BLOCK_N) * BLOCK_N
    if not DIRECT:
        per_split = tl.cdiv(tl.cdiv(end - lo_k, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo_k += split * per_split
        end = tl.minimum(end, lo_k + per_split)
    full_end = tl.maximum(tl.minimum(end, (full // BLOCK_N) * BLOCK_N), lo_k)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        # The band at the window's edge; it reaches full_end when the window is narrower
        # than the span of the tile's tokens, and then no tile runs unmasked.
        full_lo = tl.minimum(tl.maximum(full_lo, lo_k), full_end)
        acc, l_i, m_i = _paged_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, qpos, offs_n,
                                     offs_d, stride_kb, stride_ks, stride_vb, stride_vs, lo_k,
                                     full_lo, WINDOW, qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                                     BLOCK_N, HAS_WINDOW, True, FP32_DOT)
    else:
        full_lo = lo_k
    acc, l_i, m_i = _paged_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, qpos, offs_n, offs_d,
                                 stride_kb, stride_ks, stride_vb, stride_vs, full_lo, full_end,
                                 WINDOW, qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
                                 HAS_WINDOW, False, FP32_DOT)
    acc, l_i, m_i = _paged_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, qpos, offs_n, offs_d,
                                 stride_kb, stride_ks, stride_vb, stride_vs, full_end, end,
                                 WINDOW, qk_scale, BLOCK_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N,
                                 HAS_WINDOW, True, FP32_DOT)
    if DIRECT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = O + t64[:, None] * stride_ot + head64[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        hq = tl.num_programs(1) * GROUP
        slot = (t64 * hq + head64) * NUM_SPLITS + split
        tl.store(PACC + slot[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(PML + slot * 2, m_i, mask=row_ok)
        tl.store(PML + slot * 2 + 1, l_i, mask=row_ok)


# --------------------------------------------------------------------------- launchers

def write_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k/v [T, Hkv, D] into the caches at slot_mapping (in place), cast to the cache dtype."""
    t, hkv, d = k.shape
    if t == 0:
        return
    k, v = _unit_last(k), _unit_last(v)
    _cache_write_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], hkv,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=1 if d <= 128 else 2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("paged_attention: q/k/v must be [T, H, D] and the caches "
                         "[num_blocks, block_size, Hkv, D]")
    t, hq, d = q.shape
    _, _, hkv, dc = k_cache.shape
    if k.shape != (t, hkv, d) or v.shape != k.shape or v_cache.shape != k_cache.shape or dc != d:
        raise ValueError(f"paged_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)} do not match [T,Hq,D], [T,Hkv,D], [NB,BS,Hkv,D]")
    if hq % hkv:
        raise ValueError(f"paged_attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: the caches need a unit last stride (they are written "
                         "in place, so they are never copied)")
    n = context_lens.shape[0]
    if (query_start.shape != (n + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != n
            or slot_mapping.shape != (t,)):
        raise ValueError(f"paged_attention: metadata shapes slot_mapping {tuple(slot_mapping.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}, context_lens {(n,)}, "
                         f"query_start {tuple(query_start.shape)} do not match T={t}, N={n}")
    for name, x, want in (("slot_mapping", slot_mapping, torch.int64),
                          ("block_tables", block_tables, torch.int32),
                          ("context_lens", context_lens, torch.int32),
                          ("query_start", query_start, torch.int32)):
        if x.dtype != want:
            raise ValueError(f"paged_attention: {name} is {x.dtype}, expected {want}")


def decode_num_splits(n: int, hkv: int, max_keys: int, block_n: int, num_sms: int) -> int:
    """Slices of each sequence's keys for a decode batch of n sequences whose block tables
    span max_keys keys: attention.decode_split's rule (measured on an H100 for contiguous
    decode) applied to the padded maximum context. One when the n * hkv programs already
    fill the machine or the context is short."""
    return max(1, triton.cdiv(max_keys, decode_split(n, hkv, 1, max(max_keys, 1), block_n, num_sms)))


def paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                    query_start, scale, window=None, *, config: AttnConfig | None = None,
                    split: int | None = None):
    """kiln_ref.paged_attention on a GPU (or under TRITON_INTERPRET). Only shapes (and the
    `window` attribute) decide the launch, so a decode step can be captured into a CUDA
    graph. `config` overrides the tile tables (a mixed batch then runs in one launch) and
    `split` (keys per slice of the padded table, a multiple of BLOCK_N; decode batches
    only) the number of slices; tests use both."""
    _check(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start)
    check_window(window, "paged_attention")
    write_cache(k, v, k_cache, v_cache, slot_mapping)
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    n = context_lens.shape[0]
    group = hq // hkv
    decode = t == n
    if t == 0 or n == 0:
        return torch.zeros_like(q)
    q = _unit_last(q)
    block_d = max(16, triton.next_power_of_2(d))
    # The output is contiguous [T, Hq, D] whatever q's strides: q usually is a view of a
    # head-major RoPE output, and an output laid out like it made the model's reshape to
    # [T, Hq * D] before o_proj a copy in every layer (9 us at 256 tokens on the H200).

    def tile_rows(cfg: AttnConfig) -> int:   # BLOCK_M: at least one token's GROUP heads
        return max(cfg.block_m, triton.next_power_of_2(group))

    def launch(cfg: AttnConfig, min_n: int, max_n: int, out, num_splits=1, pacc=None, pml=None):
        """Programs for the sequences of min_n < n <= max_n new tokens."""
        block_q = 1 if decode else tile_rows(cfg) // group   # tokens a tile
        if pacc is None:
            pacc = pml = unused
        _paged_attn_kernel[(n if decode else t // block_q + n, hkv, num_splits)](
            q, k_cache, v_cache, out, block_tables, context_lens, query_start, pacc, pml,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
            n, group, block_q, min_n, max_n, window or 0, float(scale) * LOG2E, num_splits,
            BLOCK_SIZE=bs, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=tile_rows(cfg), BLOCK_N=cfg.block_n,
            IS_DECODE=decode, HAS_WINDOW=window is not None, DIRECT=num_splits == 1,
            FP32_DOT=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    unused = torch.empty(1, dtype=torch.float32, device=q.device)   # partials of a direct launch
    if not decode:
        # Rows past query_start[N] may belong to no sequence, and those must read zero.
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        short_cfg = config or _config(DECODE_CONFIGS, block_d)
        long_cfg = config or _config(PREFILL_CONFIGS, block_d)
        shortest = 0   # sequences of at most this many tokens run in the short launch
        if tile_rows(short_cfg) < tile_rows(long_cfg):
            shortest = tile_rows(short_cfg) // group
            launch(short_cfg, 0, shortest, out)
        launch(long_cfg, shortest, t, out)
        return out

    cfg = config or _config(DECODE_CONFIGS, block_d)
    # Keys the slices must cover: the table's width, or, as with a window they start at the
    # tile holding the token's first visible key, at most the window plus that tile's keys
    # before it.
    span = block_tables.shape[1] * bs
    if window is not None:
        span = min(span, window + cfg.block_n - 1)
    if split is None:
        # Batch-invariant: each row split as in a batch of one, however many rows run.
        rows = 1 if batch_invariance.enabled() else n
        num_splits = decode_num_splits(rows, hkv, span, cfg.block_n, _num_sms(q.device))
    elif split % cfg.block_n:
        raise ValueError(f"paged_attention: split {split} is not a multiple of BLOCK_N "
                         f"{cfg.block_n}")
    else:
        num_splits = max(1, triton.cdiv(span, split))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_splits == 1:
        launch(cfg, 0, 1, out)
        return out
    pacc = torch.empty(t * hq * num_splits * block_d, dtype=torch.float32, device=q.device)
    pml = torch.empty(t * hq * num_splits * 2, dtype=torch.float32, device=q.device)
    launch(cfg, 0, 1, out, num_splits, pacc, pml)
    _attn_reduce_kernel[(t * hq,)](
        pacc, pml, out, out.stride(0), out.stride(1), 0, hq, 1, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=REDUCE_BLOCK_S, USE_EXP2=True,
        num_warps=4 if block_d <= 128 else 8)
    return out


# --------------------------------------------------------------------------- AOT variants

_DT = {"fp16": "f16", "bf16": "bf16"}
AOT_BLOCK_SIZE = 16   # the runtime's default KV block size
_ATTN_STRIDES = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks",
                 "stride_kh", "stride_vb", "stride_vs", "stride_vh"]
_WRITE_STRIDES = ["stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kcb", "stride_kcs",
                  "stride_kch", "stride_vcb", "stride_vcs", "stride_vch"]


def _write_spec(dt: str, d: int):
    p = "*" + dt
    types = {"K": p, "V": p, "KC": p, "VC": p, "SLOT": "*i64", "HKV": "i32"}
    types.update({s: "i32" for s in _WRITE_STRIDES})
    return make_spec(f"paged_cache_write_{_DT[dt]}_d{d}_bs{AOT_BLOCK_SIZE}", _cache_write_kernel,
                     types, {"BLOCK_SIZE": AOT_BLOCK_SIZE, "HEAD_DIM": d, "BLOCK_D": d},
                     num_warps=1, divisible_by_16=("K", "V", "KC", "VC", *_WRITE_STRIDES))


# Kind of launch -> (tile table, IS_DECODE, DIRECT).
_LAUNCH_KINDS = {"decode": (DECODE_CONFIGS, True, True), "decode_split": (DECODE_CONFIGS, True, False),
                 "mixed_short": (DECODE_CONFIGS, False, True), "mixed": (PREFILL_CONFIGS, False, True)}


def _attn_spec(dt: str, d: int, kind: str, window: bool):
    table, decode, direct = _LAUNCH_KINDS[kind]
    cfg = table[d]
    p = "*" + dt
    types = {"Q": p, "KC": p, "VC": p, "O": p, "BT": "*i32", "CTX": "*i32", "QS": "*i32",
             "PACC": "*fp32", "PML": "*fp32", "stride_bt": "i32", "N": "i32", "GROUP": "i32",
             "BLOCK_Q": "i32", "MIN_N": "i32", "MAX_N": "i32", "WINDOW": "i32",
             "qk_scale": "fp32", "NUM_SPLITS": "i32"}
    types.update({s: "i32" for s in _ATTN_STRIDES})
    name = f"paged_attn_{kind}_{_DT[dt]}_d{d}_bs{AOT_BLOCK_SIZE}{'_window' if window else ''}"
    # Decode tiles hold GROUP <= 16 rows: BLOCK_M 16 covers GQA groups 1..16.
    return make_spec(name, _paged_attn_kernel,
                     types, {"BLOCK_SIZE": AOT_BLOCK_SIZE, "HEAD_DIM": d, "BLOCK_D": d,
                             "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "IS_DECODE": decode,
                             "HAS_WINDOW": window, "DIRECT": direct, "FP32_DOT": False},
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     divisible_by_16=("Q", "KC", "VC", "O", "PACC", "PML", *_ATTN_STRIDES))


# The split-KV reduction is attention.py's `attn_decode_reduce_*` spec.
AOT_SPECS = (
    [_write_spec(dt, d) for dt in _DT for d in (64, 128)]
    + [_attn_spec(dt, d, kind, window) for dt in _DT for d in (64, 128) for kind in _LAUNCH_KINDS
       for window in (False, True)]
)
