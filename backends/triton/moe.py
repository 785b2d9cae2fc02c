"""Fused mixture-of-experts: `fused_moe` with kiln_ref.fused_moe semantics.

Steps:
1. Routing in torch (kiln_ref.moe_route: float32 softmax, top-k, optional renormalise),
   so ties and rounding are exactly the reference's.
2. `moe_align` (no host sync, so it can be graph-captured; one small Triton kernel for
   decode-sized inputs, torch ops for large ones): the T * top_k token slots are sorted
   by expert and each expert's group is padded to a multiple of BLOCK_M; `sorted_slots[p]` is the slot at sorted position p (NUM_SLOTS for padding) and
   `block_expert[b]` the expert of block b (-1 for the unused blocks at the end of the
   fixed-size, worst-case-sized buffers).
3. `_moe_gate_up_kernel`: per (block, N tile), x[token rows] @ w_gate_up[e].T for the gate
   rows and the matching up rows of the tile, epilogue silu(gate) * up -> act [pos, I].
4. `_moe_down_kernel`: per (block, N tile), act rows @ w_down[e].T, times the slot's
   routing weight in the epilogue, written to the slot's row of out_slots [T*top_k, H].
5. out = out_slots.view(T, top_k, H).sum(1) (torch; deterministic, no atomics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.ir import kiln_ref

from .aot import make_spec
from .tiles import on_hip, variants


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (largest average slots per expert, config). Few tokens per expert (decode) is bound by
# reading expert weights: a thin M tile and long K tiles keep many weight bytes in flight.
# Many tokens per expert (prefill) is bound by the tensor cores: square-ish 64/128 tiles.
# H100, bf16, 8 experts, H 4096, I 7168, top-2 (graph-replayed): 1 token 154 us (of it
# 20 us routing + align), 16 tokens 512 us (91% of copy bandwidth over the weights read),
# 4096 tokens 3.3 ms (438 TFLOP/s). The decode row's alternatives (16x32x128, 16x64x256,
# 16x128x128, 16x32x256) were all within 3%; the middle rows are not tuned.
MOE_CONFIGS = (
    (16, MoeConfig(16, 64, 128, 4, 4)),
    (64, MoeConfig(32, 64, 128, 4, 4)),
    (256, MoeConfig(64, 128, 64, 4, 3)),
    (None, MoeConfig(128, 128, 64, 8, 3)),
)


# hip (tiles.py): 3-4 stages ask gfx942 for 96-108 KiB of LDS; two fit its 64 KiB (36-48
# KiB compiled). Not tuned on an AMD GPU.
HIP_MOE_CONFIGS = tuple((limit, MoeConfig(c.block_m, c.block_n, c.block_k, c.num_warps,
                                          min(c.num_stages, 2)))
                        for limit, c in MOE_CONFIGS)


def moe_config(num_slots: int, num_experts: int, hip: bool | None = None) -> MoeConfig:
    """The tiles for an average of num_slots / num_experts rows per expert, on hip
    (default: this torch's) or cuda."""
    avg = num_slots / max(num_experts, 1)
    for limit, cfg in HIP_MOE_CONFIGS if (on_hip() if hip is None else hip) else MOE_CONFIGS:
        if limit is None or avg <= limit:
            return cfg
    raise AssertionError("unreachable")


# The one-program align kernel walks the slots in chunks of ALIGN_TILE // E_PAD; above
# this many (slots x padded experts) the torch ops (a few more launches) are faster.
ALIGN_TILE = 4096
ALIGN_KERNEL_MAX_WORK = 1 << 18


def _align_sizes(n: int, num_experts: int, block_m: int) -> tuple[int, int]:
    # Each non-empty expert wastes less than one block: sum ceil(c/bm) < n/bm + experts.
    max_blocks = triton.cdiv(n, block_m) + min(num_experts, n)
    return max_blocks, max_blocks * block_m


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int, impl: str | None = None):
    """Sort slots by expert and pad each expert's group to block_m.

    ids: [T, top_k] expert ids. Returns (sorted_slots int32 [max_blocks * block_m],
    block_expert int32 [max_blocks]); both sized for the worst case, so no host sync.
    Slot s (token s // top_k) appears once, at a position inside its expert's blocks, in
    slot order within the expert; every other position holds T * top_k (padding).
    impl: "triton" (one small kernel; the default for decode-sized inputs) or "torch".
    """
    n = ids.numel()
    e_pad = triton.next_power_of_2(num_experts)
    if impl is None:
        impl = "triton" if n * e_pad <= ALIGN_KERNEL_MAX_WORK else "torch"
    if impl == "torch":
        return _moe_align_torch(ids, num_experts, block_m)
    max_blocks, max_len = _align_sizes(n, num_experts, block_m)
    sorted_slots = torch.empty(max_len, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    _moe_align_kernel[(1,)](ids.reshape(-1), sorted_slots, block_expert, n, max_blocks,
                            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=max(16, ALIGN_TILE // e_pad),
                            num_warps=4)
    return sorted_slots, block_expert


def _moe_align_torch(ids: torch.Tensor, num_experts: int, block_m: int):
    flat = ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + torch.arange(n, device=dev) - cnt_start[sorted_e]
    max_blocks, max_len = _align_sizes(n, num_experts, block_m)
    sorted_slots = torch.full((max_len,), n, dtype=torch.int32, device=dev)
    sorted_slots[dest] = order.to(torch.int32)
    starts = torch.arange(max_blocks, device=dev, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True)
    block_expert = torch.where(starts < pad_end[-1], block_expert, -1).to(torch.int32)
    return sorted_slots, block_expert


@triton.jit
def _moe_align_kernel(IDS, SORTED, BLOCK_EXPERT, N, MAX_BLOCKS,
                      BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """moe_align in one program: count slots per expert, pad to BLOCK_M, prefix-sum the
    padded sizes, write each block's expert, then place every slot at its expert's start
    plus its rank among that expert's slots (a stable counting sort, CHUNK slots a step,
    ranks within a chunk from a cumulative sum over one-hot rows)."""
    experts = tl.arange(0, E_PAD)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, N, CHUNK):
        idx = c0 + offs
        e = tl.load(IDS + idx, mask=idx < N, other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    # Every position starts as padding (N); each block gets the expert whose padded range
    # holds its first row: the number of experts ending at or before it.
    for p0 in range(0, MAX_BLOCKS * BLOCK_M, CHUNK):
        p = p0 + offs
        tl.store(SORTED + p, tl.zeros([CHUNK], dtype=tl.int32) + N, mask=p < MAX_BLOCKS * BLOCK_M)
    for b0 in range(0, MAX_BLOCKS, CHUNK):
        blk = b0 + offs
        start = blk * BLOCK_M
        e_of = tl.sum((pad_end[None, :] <= start[:, None]).to(tl.int32), 1)
        e_of = tl.where(start < total, e_of, -1)
        tl.store(BLOCK_EXPERT + blk, e_of, mask=blk < MAX_BLOCKS)
    # The padding stores above must land before the slot stores below (other threads).
    tl.debug_barrier()
    running = pad_end - padded
    for c0 in range(0, N, CHUNK):
        idx = c0 + offs
        valid = idx < N
        e = tl.load(IDS + idx, mask=valid, other=-1)
        hit = (e[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(hit, 0) - hit
        pos = tl.sum(hit * (rank + running[None, :]), 1)
        tl.store(SORTED + pos, idx, mask=valid)
        running += tl.sum(hit, 0)


@triton.jit
def _moe_gate_up_kernel(X, W, ACT, SORTED, BLOCK_EXPERT,
                        stride_xt, stride_we, stride_wn, stride_am,
                        NUM_SLOTS, TOP_K, HIDDEN, INTER,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FP32_DOT: tl.constexpr):
    """ACT[pos, n] = silu(x[tok] . Wg[e, n]) * (x[tok] . Wu[e, n]) for the block's rows."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_b)
    # Unused trailing blocks (e = -1) run no K iterations and store nothing.
    k_end = tl.where(e >= 0, HIDDEN, 0)
    e = tl.maximum(e, 0).to(tl.int64)
    offs_m = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SORTED + offs_m)
    row_ok = slot < NUM_SLOTS  # unused blocks hold only padding slots
    tok = (slot // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = X + tok[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = W + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + INTER * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = offs_k < HIDDEN - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:
            acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, wu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    act_ptrs = ACT + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(act_ptrs, act.to(ACT.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(ACT, W, OUT, SORTED, BLOCK_EXPERT, TOPW,
                     stride_am, stride_we, stride_wn, stride_om,
                     NUM_SLOTS, HIDDEN, INTER,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     FP32_DOT: tl.constexpr):
    """OUT[slot, n] = topw[slot] * (ACT[pos] . Wd[e, n]) for the block's rows."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_b)
    k_end = tl.where(e >= 0, INTER, 0)
    e = tl.maximum(e, 0).to(tl.int64)
    offs_m = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SORTED + offs_m)
    row_ok = slot < NUM_SLOTS  # unused blocks hold only padding slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = ACT + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = W + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = offs_k < INTER - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    topw = tl.load(TOPW + slot, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * topw[:, None]
    out_ptrs = OUT + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, renormalize: bool, expert_start: int = 0, *,
              config: MoeConfig | None = None) -> torch.Tensor:
    """kiln_ref.fused_moe: x [T, H], router_logits [T, E], w_gate_up [E', 2I, H] (gate rows
    then up rows), w_down [E', H, I] for experts expert_start .. expert_start + E' - 1;
    returns [T, H] in x's dtype. `config` overrides the tile table (tests use it).

    With fewer experts than the router's (expert parallelism), the slots routed to other
    experts go to one more group, E', whose blocks are marked unused: the kernels compute
    nothing for them and write zeros to their output rows."""
    if x.dim() != 2 or router_logits.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("fused_moe: expected x [T, H], router_logits [T, E], "
                         "w_gate_up [E, 2I, H], w_down [E, H, I]")
    t, hidden = x.shape
    e_num, two_i, h2 = w_gate_up.shape
    e_all = router_logits.shape[1]
    inter = two_i // 2
    if (h2 != hidden or two_i % 2 or tuple(w_down.shape) != (e_num, hidden, inter)
            or router_logits.shape[0] != t or not 0 <= expert_start <= e_all - e_num):
        raise ValueError(f"fused_moe: shapes x {tuple(x.shape)}, router_logits "
                         f"{tuple(router_logits.shape)}, w_gate_up {tuple(w_gate_up.shape)}, "
                         f"w_down {tuple(w_down.shape)} (experts from {expert_start}) do not agree")
    if not 1 <= top_k <= e_all:
        raise ValueError(f"fused_moe: top_k {top_k} not in [1, {e_all}]")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"fused_moe: dtypes x {x.dtype}, w_gate_up {w_gate_up.dtype}, "
                         f"w_down {w_down.dtype} differ")
    if t == 0:
        return torch.zeros_like(x)
    weights, ids = kiln_ref.moe_route(router_logits, top_k, renormalize, x.dtype)
    num_slots = t * top_k
    cfg = config or moe_config(num_slots, e_num)
    if e_num == e_all:
        sorted_slots, block_expert = moe_align(ids, e_num, cfg.block_m)
    else:   # local ids; the other experts' slots grouped as expert e_num, then dropped
        local = ids - expert_start
        local = torch.where((local < 0) | (local >= e_num), e_num, local)
        sorted_slots, block_expert = moe_align(local, e_num + 1, cfg.block_m)
        block_expert = torch.where(block_expert == e_num, -1, block_expert)
    max_blocks = block_expert.numel()
    # Unit stride along K for x and both weights (vectorised loads; no K stride argument).
    x, w_gate_up, w_down = (w if w.stride(-1) == 1 else w.contiguous()
                            for w in (x, w_gate_up, w_down))
    act = torch.empty(sorted_slots.numel(), inter, dtype=x.dtype, device=x.device)
    out_slots = torch.empty(num_slots, hidden, dtype=x.dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    _moe_gate_up_kernel[(max_blocks, triton.cdiv(inter, cfg.block_n))](
        x, w_gate_up, act, sorted_slots, block_expert,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0),
        num_slots, top_k, hidden, inter,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, FP32_DOT=fp32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _moe_down_kernel[(max_blocks, triton.cdiv(hidden, cfg.block_n))](
        act, w_down, out_slots, sorted_slots, block_expert, weights.reshape(-1).contiguous(),
        act.stride(0), w_down.stride(0), w_down.stride(1), out_slots.stride(0),
        num_slots, hidden, inter,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, FP32_DOT=fp32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if top_k == 1:
        return out_slots
    return out_slots.view(t, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


# --------------------------------------------------------------------------- AOT variants

_DT = {"fp16": "f16", "bf16": "bf16"}


def _moe_specs(dt: str, cfg: MoeConfig, tag: str, targets=("cuda", "hip")):
    p = "*" + dt
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "FP32_DOT": False}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "targets": targets}
    gate_up = make_spec(
        f"moe_gate_up_{_DT[dt]}_{tag}", _moe_gate_up_kernel,
        {"X": p, "W": p, "ACT": p, "SORTED": "*i32", "BLOCK_EXPERT": "*i32",
         "stride_xt": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_am": "i32", "NUM_SLOTS": "i32", "TOP_K": "i32",
         "HIDDEN": "i32", "INTER": "i32"}, consts,
        divisible_by_16=("X", "W", "ACT", "SORTED", "BLOCK_EXPERT", "stride_xt", "stride_we",
                         "stride_wn", "stride_am", "HIDDEN", "INTER"), **opts)
    down = make_spec(
        f"moe_down_{_DT[dt]}_{tag}", _moe_down_kernel,
        {"ACT": p, "W": p, "OUT": p, "SORTED": "*i32", "BLOCK_EXPERT": "*i32", "TOPW": p,
         "stride_am": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_om": "i32", "NUM_SLOTS": "i32", "HIDDEN": "i32", "INTER": "i32"}, consts,
        divisible_by_16=("ACT", "W", "OUT", "SORTED", "BLOCK_EXPERT", "TOPW", "stride_am",
                         "stride_we", "stride_wn", "stride_om", "HIDDEN", "INTER"), **opts)
    return [gate_up, down]


def _align_spec(num_experts: int, block_m: int):
    e_pad = triton.next_power_of_2(num_experts)
    return make_spec(f"moe_align_e{e_pad}_m{block_m}", _moe_align_kernel,
                     {"IDS": "*i64", "SORTED": "*i32", "BLOCK_EXPERT": "*i32", "N": "i32",
                      "MAX_BLOCKS": "i32"},
                     {"BLOCK_M": block_m, "E_PAD": e_pad, "CHUNK": max(16, ALIGN_TILE // e_pad)},
                     num_warps=4)


# Decode-sized and prefill-sized tiles, fp16 and bf16; the align kernel for decode tiles
# and 8 (Mixtral), 64 and 128 (Qwen3-MoE) experts.
AOT_SPECS = ([s for dt in _DT
              for tag, row in (("decode", 0), ("prefill", -1))
              for pair in variants(lambda cfg, targets, suffix: _moe_specs(dt, cfg, tag + suffix, targets),
                                   MOE_CONFIGS[row][1], HIP_MOE_CONFIGS[row][1])
              for s in pair]
             + [_align_spec(e, MOE_CONFIGS[0][1].block_m) for e in (8, 64, 128)])
