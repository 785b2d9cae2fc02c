"""kiln.paged_attention in torch ops (batched matmuls for decodes, SDPA per prefill): the cpu
target's kernel, and the baseline the Triton kernel (backends/triton/paged_attention.py,
used by cuda and hip) is benchmarked against. Must match `kiln.ir.kiln_ref.paged_attention`
(tests check).

Two paths:
- decode (T == N: every sequence has exactly one new token): batched matmuls over each
  sequence's blocks gathered to the batch's block-table width, keys past context_lens
  masked. No host synchronisation and static shapes, so a CUDA graph can capture it for a
  padded decode bucket.
- mixed (prefill chunks, possibly with decodes): reads the metadata on the host; the
  single-token sequences still go through the batched decode path, each longer one through
  its own causal SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ir.kiln_ref import visible_keys


def write_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    nb, bs, hkv, d = k_cache.shape
    k_cache.view(nb * bs, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _decode(q, k_cache, v_cache, block_tables, context_lens, scale, window=None):
    """q: [n, Hq, D], one token per sequence; returns [n, Hq, D]. Plain batched matmuls with
    the query heads of one KV head folded together (no repeat of K/V): at one query per
    sequence these small ops beat SDPA's threaded kernel, which stalls on a busy CPU."""
    n, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    width = block_tables.shape[1] * bs
    blocks = block_tables.reshape(-1).long()
    keys = k_cache.index_select(0, blocks).view(n, width, hkv, d).transpose(1, 2)   # [n, Hkv, L, D]
    values = v_cache.index_select(0, blocks).view(n, width, hkv, d).transpose(1, 2)
    qg = q.view(n, hkv, hq // hkv, d).to(keys.dtype)                                 # [n, Hkv, G, D]
    scores = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale        # [n, Hkv, G, L]
    key = torch.arange(width, device=q.device)[None, :]
    ctx = context_lens[:, None].to(torch.long)
    hidden = key >= ctx
    if window is not None:   # the token at position ctx - 1 sees keys past ctx - 1 - window
        hidden = hidden | (key <= ctx - 1 - window)
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())               # [n, Hkv, G, D]
    return out.reshape(n, hq, d).to(q.dtype)


def paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                    query_start, scale, window=None):
    write_cache(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_seqs = q.shape[0], context_lens.shape[0]
    if num_tokens == num_seqs:
        return _decode(q, k_cache, v_cache, block_tables, context_lens, scale, window)
    bs, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    hq = q.shape[1]
    out = torch.zeros_like(q)
    starts = query_start.tolist()
    lens = context_lens.tolist()
    single = [i for i in range(num_seqs) if starts[i + 1] - starts[i] == 1]
    if single:
        rows = torch.tensor([starts[i] for i in single], device=q.device)
        sel = torch.tensor(single, device=q.device)
        width = -(-max(lens[i] for i in single) // bs)
        out[rows] = _decode(q[rows], k_cache, v_cache, block_tables[sel, :width],
                            context_lens[sel], scale, window)
    for i in range(num_seqs):
        lo, hi = starts[i], starts[i + 1]
        n, length = hi - lo, lens[i]
        if n <= 1:
            continue
        blocks = block_tables[i, : -(-length // bs)].long()
        keys = k_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]    # [1, Hkv, L, D]
        values = v_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]
        qi = q[lo:hi].transpose(0, 1)[None].to(keys.dtype)                      # [1, Hq, n, D]
        if n == length and window is None:
            o = F.scaled_dot_product_attention(qi, keys, values, is_causal=True, scale=scale,
                                               enable_gqa=hq != hkv)
        else:   # bottom-right causal: query j sits at position length - n + j
            keep = visible_keys(n, length, True, window, q.device)
            o = F.scaled_dot_product_attention(qi, keys, values, attn_mask=keep, scale=scale,
                                               enable_gqa=hq != hkv)
        out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)
    return out
