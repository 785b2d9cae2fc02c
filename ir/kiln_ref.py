"""Reference semantics of the fused `kiln.*` operators, in plain torch.

These functions *are* the definition of each fused op: the op registry uses them as the
reference implementation, the interpreter runs them, and every kernel is tested against
them. They favour clarity over speed and compute in float32 where the models do.
"""
from __future__ import annotations

import math

import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
INT8_MAX = 127.0
# Keeps a per-token scale finite for an all-zero row.
SCALE_FLOOR = 1e-10


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in float32, cast back to x's dtype, then scale by weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + x`, then rms_norm of the sum; returns (normed, sum)."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [B, H, S, D]; cos, sin: [B, S, D] (broadcast over H)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope` of q and of k by the same cos/sin (one launch where kernels are launched)."""
    return rope(q, cos, sin), rope(k, cos, sin)


def rope_pair_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rope_pair` of q and k, with rotated k and v written into the KV cache in place:
    `k_cache[:, :, index[s]] = rope(k)[:, :, s]`, likewise v (a StaticCache's update).
    q, k, v: [B, H, S, D]; caches [B, H, L, D]; index: [S] cache rows. Returns (rotated q,
    k_cache, v_cache), the caches being the updated operands themselves."""
    q_rot, k_rot = rope_pair(q, k, cos, sin)
    k_cache.index_copy_(2, index, k_rot.to(k_cache.dtype))
    v_cache.index_copy_(2, index, v.to(v_cache.dtype))
    return q_rot, k_cache, v_cache


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def rms_norm_mm(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm(x) @ b` with x's leading dims flattened: x [..., K], b [K, N] -> [M, N]
    (a decode step's norm as the prologue of the GEMM that reads it)."""
    return rms_norm(x, weight, eps).reshape(-1, x.shape[-1]) @ b


def fused_add_rms_norm_mm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm` whose normalised value feeds `@ b`: returns ([M, N], the sum)."""
    normed, summed = fused_add_rms_norm(x, residual, weight, eps)
    return normed.reshape(-1, x.shape[-1]) @ b, summed


def silu_mul_mm(gate: torch.Tensor, up: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`silu_mul(gate, up) @ b` with leading dims flattened: [..., I], b [I, N] -> [M, N]."""
    return silu_mul(gate, up).reshape(-1, gate.shape[-1]) @ b


def mm(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`x @ b` with x's leading dims flattened: [..., K], b [K, N] -> [M, N] (fuse.prologue's
    GEMM with nothing in front to fuse; Triton targets run it on the same small-M kernel)."""
    return x.reshape(-1, x.shape[-1]) @ b


def visible_keys(sq: int, skv: int, causal: bool, window: int | None,
                 device=None) -> torch.Tensor | None:
    """[Sq, Skv] bool: which keys each query sees under `causal` and `window` (see
    `attention`); None when it sees all of them."""
    if not causal and window is None:
        return None
    keep = torch.ones(sq, skv, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(skv - sq)
    if window is not None:
        keep = keep.triu(skv - sq - window + 1)
    return keep


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, causal: bool, window: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] with Hq % Hkv == 0 (query head h reads KV
    head h // (Hq // Hkv)). `mask` broadcasts to [B, Hq, Sq, Skv]: bool (True = attend) or
    additive float. Query i sits at position p_i = i + Skv - Sq (the queries are the last
    Sq of the keys' positions). `causal`: query i attends key j only when j <= p_i (the
    diagonal aligned bottom right). `window` (sliding-window attention): only when
    p_i - j < window, i.e. the `window` most recent keys up to its own position. Softmax
    in float32; output in q's dtype.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    sq, skv = q.shape[-2], k.shape[-2]
    keep = visible_keys(sq, skv, causal, window, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    # A row with every key masked attends to nothing (zeros), not NaN.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over experts, top-k, optional renormalisation; (weights, ids)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, renormalize: bool,
              expert_start: int = 0) -> torch.Tensor:
    """Mixture of experts as transformers 5 writes it (Mixtral, Qwen3-MoE).

    x: [T, H]; router_logits: [T, E]; w_gate_up: [E', 2I, H] (gate rows first, then up);
    w_down: [E', H, I]. Each token goes to its top_k of the E experts; expert e computes
    down(silu(gate) * up); outputs are summed weighted by the routing weights.
    The weights hold experts expert_start .. expert_start + E' - 1 (all E of them by
    default): the sum then runs over those experts' contributions only, routing still
    over all E (expert parallelism: each rank holds some experts, an all_reduce adds the
    ranks' sums).
    """
    weights, ids = moe_route(router_logits, top_k, renormalize, x.dtype)
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(ids == expert_start + e)
        if token.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(x[token], w_gate_up[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(silu_mul(gate, up), w_down[e])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


def quant_fp8(x: torch.Tensor, scale: torch.Tensor | None = None,
              fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 quantisation. scale None: dynamic per token (scale [..., 1] = amax / fp8 max).
    scale given: static per tensor (a one-element float32 tensor). Returns (q, scale)."""
    fmax = FP8_MAX[fp8_dtype]
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / fmax).clamp(min=SCALE_FLOOR)
    q = (xf / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale.float()


def quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: scale [..., 1] = amax / 127, q = round(x / scale)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=SCALE_FLOOR)
    q = torch.round(xf / scale).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return q, scale


def quantize(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantisation to `qdtype` (int8 or an fp8 flavour)."""
    if qdtype == torch.int8:
        return quant_int8(x)
    return quant_fp8(x, None, qdtype)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(rms_norm(x, weight, eps), qdtype)


def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float, qdtype: torch.dtype
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q, scale, residual + x)."""
    normed, summed = fused_add_rms_norm(x, residual, weight, eps)
    q, scale = quantize(normed, qdtype)
    return q, scale, summed


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(silu_mul(gate, up), qdtype)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantised linear: (a @ b.T) * a_scale * b_scale.T (+ bias).

    a: [M, K] int8/fp8 with a_scale [M, 1]; b: [N, K] (nn.Linear layout) with b_scale
    [N, 1] per output channel or a one-element per-tensor scale. Accumulates in float32.
    """
    acc = torch.matmul(a.float(), b.float().t())
    out = acc * a_scale.float() * b_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def weight_int8_mm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only int8 linear: x @ (w_q * w_scale).T (+ bias), in x's dtype.

    x: [M, K] floating; w_q: [N, K] int8 (nn.Linear layout); w_scale: [N, 1] per output
    channel (kiln_ref.quant_int8 of the weight). Accumulates in float32."""
    out = torch.matmul(x.float(), (w_q.float() * w_scale.float().reshape(-1, 1)).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantize_weight(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantisation of an nn.Linear weight [N, K]."""
    return quantize(w, qdtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start: torch.Tensor,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """Attention of a flattened batch of sequences over a paged KV cache (writes the cache).

    q: [T, Hq, D]; k, v: [T, Hkv, D]: the new tokens of N sequences laid end to end,
    sequence i owning rows query_start[i] : query_start[i+1] (query_start: [N+1] int32).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D]. First, token t's k/v are written in
    place at slot slot_mapping[t] (block slot // block_size, offset slot % block_size).
    Then sequence i, whose context after this step is its first context_lens[i] tokens
    (block b of it in block block_tables[i, b]), attends: its n new tokens are the last n of
    the context, and each attends every context token up to its own position (causal,
    bottom-right aligned), with query head h reading KV head h // (Hq // Hkv); with a
    `window`, only the `window` most recent of those (`attention`'s window). Softmax in
    float32; output [T, Hq, D] in q's dtype; rows no sequence owns are zero.
    """
    num_blocks, block_size, hkv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    out = torch.zeros_like(q)
    starts = query_start.tolist()
    for i, length in enumerate(context_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        blocks = block_tables[i, : -(-length // block_size)].long()
        keys = k_cache[blocks].reshape(-1, hkv, d)[:length]
        values = v_cache[blocks].reshape(-1, hkv, d)[:length]
        # [n, H, D] -> [1, H, n, D]: one sequence as a batch of one for `attention`.
        o = attention(q[lo:hi].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                      values.transpose(0, 1)[None], None, scale, True, window)
        out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)
    return out


# ---- collectives: the default torch.distributed process group of `world_size` ranks ----

def process_group(world_size: int):
    """The default process group, which must have `world_size` ranks."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"a kiln collective over {world_size} ranks runs, but no torch.distributed process "
            f"group is initialised in this process: call torch.distributed.init_process_group("
            f"backend='nccl' (GPUs) or 'gloo' (CPU), world_size={world_size}, rank=...) in every "
            f"rank before running a graph compiled with tensor_parallel_size={world_size}, or "
            f"start the ranks with torchrun")
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"a kiln collective over {world_size} ranks runs in a process group of "
            f"{dist.get_world_size()}: compile with tensor_parallel_size="
            f"{dist.get_world_size()}, or start {world_size} ranks")
    return dist.group.WORLD


def all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of `x` over the ranks (torch.distributed's functional all_reduce on the
    default group); `x` itself with one rank."""
    if world_size == 1:
        return x
    from torch.distributed import _functional_collectives as fc
    return fc.wait_tensor(fc.all_reduce(x, "sum", process_group(world_size)))


def all_gather(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim` in rank order; `x` itself with one rank."""
    if world_size == 1:
        return x
    from torch.distributed import _functional_collectives as fc
    return fc.wait_tensor(fc.all_gather_tensor(x.contiguous(), dim % x.dim(),
                                               process_group(world_size)))


def reduce_scatter(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """The sum of `x` over the ranks, split along `dim` into world_size equal chunks:
    rank r gets chunk r; `x` itself with one rank."""
    if world_size == 1:
        return x
    from torch.distributed import _functional_collectives as fc
    return fc.wait_tensor(fc.reduce_scatter_tensor(x.contiguous(), "sum", dim % x.dim(),
                                                   process_group(world_size)))


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm` of the ranks' sum of `x`: (rms_norm(residual + sum), residual
    + sum). A row-parallel linear's partial output, the residual add and the next norm."""
    return fused_add_rms_norm(all_reduce(x, world_size), residual, weight, eps)
